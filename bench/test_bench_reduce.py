"""pytest-benchmark suites of the ensemble reduction: every reduction and ensemble_stats x implementation x shape.

Run with ``pytest bench/test_bench_reduce.py --benchmark-enable`` (skipped otherwise: the default options carry
``--benchmark-disable``). On a CUDA machine the shapes are the GPU matrix of reduce_workloads.gpu_shapes (inputs >= 64
MB); on the CPU, a few shapes a 2-core machine runs in reasonable time. Each group (one workload at one shape) holds
the eager reference, torch.compile of the reference and our kernels, so ``--benchmark-group-by=group`` compares them
in one table; ``extra_info`` records GB/s (logits read once + outputs written once) and the error against eager.
"""

from __future__ import annotations

import pytest
import torch

from fused_ensemble import cpu_memory
from fused_ensemble.cli.workloads import settle_cpu_allocator

import reduce_workloads as rw

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = rw.gpu_shapes() if DEVICE == "cuda" else rw.CPU_SHAPES

_compiled: dict[str, object] = {}


def _callable(name: str, workload: str):
    if name == "compile":
        # One torch.compile object per workload; it specializes (recompiles) on each shape.
        if workload not in _compiled:
            _compiled[workload] = rw.implementation(name, workload, DEVICE)[0]
        return _compiled[workload]
    fn, problem = rw.implementation(name, workload, DEVICE)
    if fn is None:
        pytest.skip(problem)
    return fn


def _synchronized(fn, x):
    if DEVICE == "cuda":
        def run():
            out = fn(x)
            torch.cuda.synchronize()
            return out
        return run
    return lambda: fn(x)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-B{}-K{}".format(*s))
@pytest.mark.parametrize("workload", rw.WORKLOADS)
@pytest.mark.parametrize("name", rw.IMPLEMENTATIONS)
def test_bench_reduce(benchmark, name, workload, shape):
    if benchmark.disabled:
        pytest.skip("benchmarks run with --benchmark-enable")
    if rw.shape_problem(name, shape):
        pytest.skip(rw.shape_problem(name, shape))
    # Without it eager's temporaries (a 131 MB softmax at 8 x 4096 x 1000) page-fault on every call and its times
    # swing with the cost of the faults (12-48 ms for mean_probs there, run to run).
    settle_cpu_allocator(DEVICE)
    fn = _callable(name, workload)
    x = torch.randn(shape, device=DEVICE)
    error = rw.check_against_eager(workload, fn(x), rw.reference(workload)(x))
    benchmark.group = f"{workload} N={shape[0]} B={shape[1]} K={shape[2]} {DEVICE}"
    benchmark.extra_info.update(implementation=name, device=DEVICE, max_abs_error_vs_eager=error,
                                threads=torch.get_num_threads(), cpu_allocator=cpu_memory.outcome())
    benchmark.pedantic(_synchronized(fn, x), rounds=10 if DEVICE == "cpu" else 50, warmup_rounds=2)
    benchmark.extra_info["GB/s"] = rw.bytes_moved(workload, shape) / benchmark.stats.stats.median / 1e9
