"""pytest-benchmark suite of ensemble throughput: the workloads of bench/ensemble_throughput.py and the CLI.

Run with ``pytest bench/test_bench_ensemble.py --benchmark-enable --benchmark-group-by=group`` (the default options
carry ``--benchmark-disable``, so a plain run only checks that every method runs). Each group is one workload
(model, N, B, dtype) and holds the member loop, torch.func vmap, torch.compile of that vmap (timed runs only:
compiling takes tens of seconds), FusedEnsemble and its optimize()d module;
``extra_info`` records images/s, TFLOP/s (FLOPs counted by torch.utils.flop_counter) and the error against the loop.
"""

from __future__ import annotations

import os

import pytest
import torch
from ensemble_throughput import PRESETS, flops_per_sample

from fused_ensemble.cli.workloads import Workload, relative_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# FUSED_ENSEMBLE_BENCH_PRESET picks another preset of bench/ensemble_throughput.py (e.g. gpu-full, smoke).
POINTS = PRESETS[os.environ.get("FUSED_ENSEMBLE_BENCH_PRESET", "gpu" if DEVICE == "cuda" else "cpu")]
METHODS = ("loop", "vmap", "vmap_compiled", "fused", "optimized")
_workloads: dict[tuple, Workload] = {}


def _workload(point) -> Workload:
    if point not in _workloads:
        model, dtype, members, batch = point
        _workloads.clear()  # one workload alive at a time
        _workloads[point] = Workload.build(model, members, batch, DEVICE, getattr(torch, dtype))
    return _workloads[point]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("point", POINTS, ids=lambda p: f"{p[0]}-{p[1]}-N{p[2]}-B{p[3]}")
def test_ensemble_forward(benchmark, point, method):
    if method == "vmap_compiled" and benchmark.disabled:
        pytest.skip("torch.compile of vmap compiles for tens of seconds: timed runs only (--benchmark-enable)")
    workload = _workload(point)
    run = getattr(workload, method)()
    with torch.no_grad():
        reference = workload.loop()()
        error = relative_error(run(), reference)

        def timed():
            out = run()
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            return out

        benchmark.group = f"{point[0]} {point[1]} N={point[2]} B={point[3]}"
        benchmark.pedantic(timed, rounds=5 if DEVICE == "cpu" else 30, warmup_rounds=1)
    flops = flops_per_sample(point[0]) * point[2] * point[3]
    if benchmark.stats is not None:
        seconds = benchmark.stats.stats.median
        benchmark.extra_info.update(images_per_s=point[3] / seconds, tflops=flops / seconds / 1e12)
    benchmark.extra_info["relative_error_vs_loop"] = error
    assert error < (1e-4 if point[1] == "float32" else 3e-2)
