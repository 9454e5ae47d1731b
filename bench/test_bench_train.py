"""pytest-benchmark suite of one training step (forward + backward + optimizer step) of N members.

Run with ``pytest bench/test_bench_train.py --benchmark-enable --benchmark-group-by=group`` (skipped otherwise:
the default options carry ``--benchmark-disable``). Members: CIFAR ResNet-18, N in {4, 8, 16}; batch per member
128 on CUDA (the issue's GPU target: fused >= 2x the loop at N=8), 2 on the CPU (a 2-core machine). Each group
(one N) compares, in one process on one device:

- ``loop``: the members one after another, summed loss, one backward, one ``torch.optim.SGD(fused=True)`` over
  every member's parameters (torch's one-pass kernel: over 4 ResNet-18 members on the 2-core CPU 14.3 ms against
  20-26 for its foreach and for-loop versions): the strongest plain-PyTorch loop;
- ``vmap``: ``torch.func.stack_module_state`` + ``functional_call`` under ``torch.vmap``, ``torch.optim.SGD`` on
  the stacked leaves. vmap cannot update BatchNorm running statistics in place, so its BatchNorm layers run
  without them (``replace_all_batch_norm_modules_``): it does a little less work than the others (its
  optimizer: ``torch.optim.SGD(fused=True)`` too);
- ``fused``: ``FusedEnsemble(..., reduction="none", member_inputs=True)`` + ``fused_ensemble.optim.SGD``.

``extra_info`` records member-images/s (N * B per step).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fused_ensemble import FusedEnsemble, cpu_memory, optim
from fused_ensemble.models import build_model
from fused_ensemble.train import member_cross_entropy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCH = 128 if DEVICE == "cuda" else 2
MEMBERS = (4, 8, 16)
IMPLEMENTATIONS = ("loop", "vmap", "fused")
SGD_ARGS = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)


def _members(n: int) -> list[torch.nn.Module]:
    torch.manual_seed(0)
    return [build_model("resnet18-cifar", 10).to(DEVICE).train() for _ in range(n)]


def _loop_step(members):
    opt = torch.optim.SGD([p for m in members for p in m.parameters()], **SGD_ARGS, fused=True)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = sum(F.cross_entropy(m(x[i]), y[i]) for i, m in enumerate(members))
        loss.backward()
        opt.step()
    return step


def _vmap_step(members):
    members = [copy.deepcopy(m) for m in members]
    for m in members:
        torch.func.replace_all_batch_norm_modules_(m)
    params, buffers = torch.func.stack_module_state(members)
    base = copy.deepcopy(members[0]).to("meta")
    opt = torch.optim.SGD(list(params.values()), **SGD_ARGS, fused=True)

    def member_loss(p, b, xi, yi):
        return F.cross_entropy(torch.func.functional_call(base, (p, b), (xi,)), yi)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        torch.vmap(member_loss)(params, buffers, x, y).sum().backward()
        opt.step()
    return step


def _fused_step(members):
    fused = FusedEnsemble(members, reduction="none", member_inputs=True).train()
    opt = optim.SGD(fused.parameters(), **SGD_ARGS)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        member_cross_entropy(fused(x), y).backward()
        opt.step()
    return step


BUILDERS = {"loop": _loop_step, "vmap": _vmap_step, "fused": _fused_step}


def _synchronized(step, x, y):
    if DEVICE == "cuda":
        def run():
            step(x, y)
            torch.cuda.synchronize()
        return run
    return lambda: step(x, y)


# N outermost, so the three implementations of one group run back to back (CPU load drifts over minutes).
@pytest.mark.parametrize("name", IMPLEMENTATIONS)
@pytest.mark.parametrize("n", MEMBERS, ids=lambda n: f"N{n}")
def test_bench_train_step(benchmark, name, n):
    if benchmark.disabled:
        pytest.skip("benchmarks run with --benchmark-enable")
    torch.backends.cudnn.benchmark = True
    if DEVICE == "cpu":
        # The fused module settles the CPU allocator on its first forward (fused_ensemble.cpu_memory); settling it
        # before anything is timed gives the loop and vmap the same allocator.
        cpu_memory.retain_freed_cpu_memory()
    step = BUILDERS[name](_members(n))
    x = torch.randn(n, BATCH, 3, 32, 32, device=DEVICE)
    y = torch.randint(0, 10, (n, BATCH), device=DEVICE)
    benchmark.group = f"train step resnet18-cifar N={n} B={BATCH} {DEVICE}"
    benchmark.extra_info.update(implementation=name, device=DEVICE, members=n, batch_per_member=BATCH,
                                threads=torch.get_num_threads(), cpu_allocator=cpu_memory.outcome())
    benchmark.pedantic(_synchronized(step, x, y), rounds=10 if DEVICE == "cpu" else 20, warmup_rounds=2)
    benchmark.extra_info["member_images_per_s"] = n * BATCH / benchmark.stats.stats.median
