"""pytest-benchmark suite of one optimizer step over N members' parameters (CIFAR ResNet-18, 11.2M parameters per
member), ``fused_ensemble.optim`` against torch.optim.

Run with ``pytest bench/test_bench_optim.py --benchmark-enable --benchmark-group-by=group`` (skipped otherwise).
Each group (one optimizer) compares, on the same random gradients:

- ``fused_ensemble``: ``fused_ensemble.optim.SGD`` / ``AdamW`` on the stacked ``[N, ...]`` parameters, default
  ``fused=None`` (the one-pass C++ kernels on the CPU, CUDA kernels on CUDA);
- ``fused_ensemble_foreach``: the same with ``fused=False``;
- ``torch_fused``: ``torch.optim`` with ``fused=True`` over the N members' own parameters (what a member loop's
  strongest optimizer does);
- ``torch_default``: ``torch.optim`` with its defaults over the members' parameters.

Every optimizer has its state before timing (the first step, which allocates it, is a warm-up round).

Two more groups time what may run between backward and step, per member against torch's on each member:
``clip_grad_norm`` (``fused_ensemble.clip_grad.clip_grad_norm_`` on the stacks vs N calls of
``torch.nn.utils.clip_grad_norm_``) and ``unscale`` (``MemberGradScaler.unscale_`` + ``update`` vs N
``torch.amp.GradScaler``s; scale 1, so repeated rounds keep the gradients' values).
"""

from __future__ import annotations

import pytest
import torch

from fused_ensemble import optim
from fused_ensemble.cli.models import build_model
from fused_ensemble.cli.workloads import settle_cpu_allocator
from fused_ensemble.training.amp import MemberGradScaler
from fused_ensemble.training.clip_grad import clip_grad_norm_

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MEMBERS = 8 if DEVICE == "cuda" else 4
IMPLEMENTATIONS = ("fused_ensemble", "fused_ensemble_foreach", "torch_fused", "torch_default")
OPTIMIZERS = {
    "sgd": (optim.SGD, torch.optim.SGD, dict(lr=0.01, momentum=0.9, weight_decay=5e-4)),
    "adamw": (optim.AdamW, torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2)),
}

_parameters: dict[str, tuple[list, list]] = {}


def _member_and_stacked_parameters():
    """The members' parameters and their [N, ...] stacks, with random gradients (built once per test run)."""
    if "resnet" not in _parameters:
        torch.manual_seed(0)
        members = [build_model("resnet18-cifar", 10).to(DEVICE) for _ in range(MEMBERS)]
        member_params = [p for m in members for p in m.parameters()]
        stacked = [torch.stack([p.detach() for p in group]).requires_grad_()
                   for group in zip(*[m.parameters() for m in members])]
        for p in member_params + stacked:
            p.grad = torch.randn_like(p)
        _parameters["resnet"] = (member_params, stacked)
    return _parameters["resnet"]


def _optimizer(name: str, implementation: str):
    ours, theirs, kwargs = OPTIMIZERS[name]
    member_params, stacked = _member_and_stacked_parameters()
    if implementation == "fused_ensemble":
        return ours(stacked, **kwargs)
    if implementation == "fused_ensemble_foreach":
        return ours(stacked, **kwargs, fused=False)
    if implementation == "torch_fused":
        return theirs(member_params, **kwargs, fused=True)
    return theirs(member_params, **kwargs)


def _members(member_params: list) -> list[list]:
    """The flat list of every member's parameters, one list per member."""
    per_member = len(member_params) // MEMBERS
    return [member_params[i * per_member:(i + 1) * per_member] for i in range(MEMBERS)]


def _bench(benchmark, group: str, implementation: str, call) -> None:
    """Times ``call()`` (synchronized on CUDA) as one implementation of ``group``."""
    benchmark.group = f"{group}, {MEMBERS} x resnet18-cifar, {DEVICE}"
    benchmark.extra_info.update(members=MEMBERS, device=DEVICE, implementation=implementation,
                                threads=torch.get_num_threads(),
                                card=torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU")

    def timed():
        call()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=20, warmup_rounds=2)


@pytest.fixture
def enabled_benchmark(benchmark):
    """pytest-benchmark's fixture, with these tests skipped unless --benchmark-enable and the CPU allocator settled
    before anything is timed."""
    if benchmark.disabled:
        pytest.skip("benchmarks run with --benchmark-enable")
    settle_cpu_allocator(DEVICE)
    return benchmark


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_bench_optimizer_step(enabled_benchmark, name, implementation):
    _bench(enabled_benchmark, f"{name} step", implementation, _optimizer(name, implementation).step)


@pytest.mark.parametrize("implementation", ["fused_ensemble", "torch_per_member"])
def test_bench_clip_grad_norm(enabled_benchmark, implementation):
    member_params, stacked = _member_and_stacked_parameters()
    members = _members(member_params)

    def clip():
        if implementation == "fused_ensemble":
            clip_grad_norm_(stacked, 1.0)
        else:
            for params in members:
                torch.nn.utils.clip_grad_norm_(params, 1.0)

    _bench(enabled_benchmark, "clip_grad_norm", implementation, clip)


@pytest.mark.parametrize("implementation", ["fused_ensemble", "torch_per_member"])
def test_bench_unscale(enabled_benchmark, implementation):
    member_params, stacked = _member_and_stacked_parameters()
    if implementation == "fused_ensemble":
        pairs = [(MemberGradScaler(MEMBERS, DEVICE, init_scale=1.0), optim.SGD(stacked, lr=0.0))]
    else:
        pairs = [(torch.amp.GradScaler(DEVICE, init_scale=1.0), torch.optim.SGD(params, lr=0.0))
                 for params in _members(member_params)]
        for scaler, _ in pairs:
            scaler.scale(torch.ones((), device=DEVICE))  # torch's scaler makes its scale here

    def unscale():
        for scaler, opt in pairs:
            scaler.unscale_(opt)
            scaler.update()

    _bench(enabled_benchmark, "unscale", implementation, unscale)
