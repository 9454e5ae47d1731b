"""pytest-benchmark suite of one training step (forward + backward + optimizer step) of N members.

Run with ``pytest bench/test_bench_train.py --benchmark-enable --benchmark-group-by=group`` (skipped otherwise:
the default options carry ``--benchmark-disable``). Members: CIFAR ResNet-18, N in {4, 8, 16}; batch per member
128 on CUDA (the GPU training target: fused at least 2x the loop at N=8), 2 on the CPU (a 2-core machine). Each group
(one N) compares the three steps of ``train_steps.py`` (the member loop, torch.func vmap, FusedEnsemble) in one
process on one device.

``extra_info`` records member-images/s (N * B per step).
"""

from __future__ import annotations

import pytest
import torch

from fused_ensemble import cpu_memory
from fused_ensemble.cli.workloads import settle_cpu_allocator

from train_steps import BUILDERS, IMPLEMENTATIONS, build_members

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCH = 128 if DEVICE == "cuda" else 2
MEMBERS = (4, 8, 16)


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
    settle_cpu_allocator(DEVICE)
    step = BUILDERS[name](build_members(n, DEVICE))
    x = torch.randn(n, BATCH, 3, 32, 32, device=DEVICE)
    y = torch.randint(0, 10, (n, BATCH), device=DEVICE)
    benchmark.group = f"train step resnet18-cifar N={n} B={BATCH} {DEVICE}"
    benchmark.extra_info.update(implementation=name, device=DEVICE, members=n, batch_per_member=BATCH,
                                threads=torch.get_num_threads(), cpu_allocator=cpu_memory.outcome())
    benchmark.pedantic(_synchronized(step, x, y), rounds=10 if DEVICE == "cpu" else 20, warmup_rounds=2)
    benchmark.extra_info["member_images_per_s"] = n * BATCH / benchmark.stats.stats.median
