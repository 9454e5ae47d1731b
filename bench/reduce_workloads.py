"""Ensemble-reduction benchmark workloads shared by bench/test_bench_reduce.py and bench/reduce_gpu.py.

A workload is one of the reductions that the kernels implement (``KERNEL_REDUCTIONS``; ``"vote"`` runs on the
PyTorch reference only) or ``"stats"`` (ensemble_stats) on logits [N, B, K] (float32 unless a
caller asks for another dtype). Each is run
by four implementations: ``eager`` (fused_ensemble.reference, the test oracle), ``compile`` (torch.compile of
that reference), and our kernels through the public API, ``triton`` and ``cpp`` (C++ on CPU, CUDA C++ on GPU).
Bandwidth counts the logits read once and the outputs written once: what a one-pass kernel must move.
"""

from __future__ import annotations

import math

import torch

from fused_ensemble import EnsembleStats, ensemble_reduce, ensemble_stats
from fused_ensemble.ops import dispatch
from fused_ensemble.ops.reductions import KERNEL_REDUCTIONS
from fused_ensemble.ops.reference import reduce_reference, stats_reference

# Every static compile of a reference (one per workload and shape) hangs off the same lambda's code object:
# past dynamo's default of 8 recompiles it would silently run eager, and "compile" would time eager.
torch._dynamo.config.cache_size_limit = 1024
torch._dynamo.config.accumulated_cache_size_limit = 1024

WORKLOADS = KERNEL_REDUCTIONS + ("stats",)
IMPLEMENTATIONS = ("eager", "compile", "triton", "cpp", "cpp_short_rows")
"""``cpp_short_rows``: the CUDA C++ ops called with ``short_rows=True``, which asks for the opt-in short-row kernel
(K <= 16)."""

# Small enough for a 2-core CPU; the first two are the CPU shapes the reduction targets were set on.
CPU_SHAPES = [(8, 4096, 1000), (4, 64, 32000), (16, 1024, 10), (4, 16, 128256)]
SMOKE_SHAPES = [(4, 64, 10), (2, 8, 1000)]
GPU_INPUT_BYTES = 64 * 2**20   # every GPU input is at least this big (more than the H100's 50 MB of L2)


def gpu_shapes(itemsize: int = 4) -> list[tuple[int, int, int]]:
    """The GPU matrix: N in {4, 8, 16} x K in {10, 1000, 32000, 128256}, B making the input (``itemsize``
    bytes per logit) >= 64 MB, plus N=16, B=65536, K=10 (where torch.compile of the reference is known to be
    slow)."""
    shapes = [(n, math.ceil(GPU_INPUT_BYTES / (n * k * itemsize)), k)
              for k in (10, 1000, 32000, 128256) for n in (4, 8, 16)]
    return shapes + [(16, 65536, 10)]


def reference(workload: str):
    if workload == "stats":
        return lambda x: stats_reference(x)
    return lambda x: reduce_reference(x, workload)


def kernel(workload: str, backend: str):
    if workload == "stats":
        return lambda x: ensemble_stats(x, backend=backend)
    return lambda x: ensemble_reduce(x, workload, backend=backend)


def implementation(name: str, workload: str, device: str, dynamic_compile: bool = False,
                   dtype: torch.dtype = torch.float32):
    """(callable x -> outputs, None), or (None, why it cannot run on ``device`` for ``dtype`` logits)."""
    if name == "eager":
        return reference(workload), None
    if name == "compile":
        return torch.compile(reference(workload), dynamic=dynamic_compile), None
    if name == "triton" and device == "cpu":
        return None, "the Triton interpreter is a test tool, not a benchmark"
    if name == "cpp_short_rows":
        if device != "cuda" or workload == "mean":
            return None, "the CUDA short-row kernel (mean_probs, softmax_of_mean, log_mean_probs, stats)"
        fn, problem = implementation("cpp", workload, device, dtype=dtype)
        return (None, problem) if fn is None else (_short_rows_op(workload), None)
    problem = dispatch.unavailable_reason(name, device, dtype)
    if problem is not None:
        return None, problem
    return kernel(workload, name), None


def shape_problem(name: str, shape: tuple[int, int, int]) -> str | None:
    """Why implementation ``name`` has nothing to time at ``shape`` (None: it has)."""
    if name == "cpp_short_rows" and shape[2] > 16:
        return "K > 16: the short-row kernel does not apply"
    return None


def _short_rows_op(workload: str):
    # The extension's ops directly: the public API asks for the short-row kernel only in a process started with
    # FUSED_ENSEMBLE_CUDA_SHORT_ROWS=1. On [N, B, K] logits the "cpp" column runs the same ops, plus the public
    # API's host-side checks (a few microseconds a call).
    ops = torch.ops.fused_ensemble_ext
    if workload == "stats":
        return lambda x: EnsembleStats(*ops.stats_forward(x, short_rows=True))
    return lambda x: ops.reduce_forward(x, workload, short_rows=True)[0]


def bytes_moved(workload: str, shape: tuple[int, int, int], itemsize: int = 4) -> int:
    n, b, k = shape
    out = b * k * 4
    if workload == "stats":
        out += b * (6 * 4 + 8)  # five float rows + the int64 prediction
    return n * b * k * itemsize + out


def first_tensor(result):
    return result[0] if isinstance(result, tuple) else result


def check_against_eager(workload: str, result, expected) -> float:
    """Largest absolute difference to the eager reference (raises when it is beyond float32 noise).

    For ``stats``, a row whose prediction differs from eager's must be a tie (its two candidate classes' mean
    probabilities equal within float32 noise); such rows' disagreement is not compared, since it counts members
    against the prediction (a tie flips it by whole members: a sweep once read that as a kernel bug).
    """
    results = result if isinstance(result, tuple) else (result,)
    expecteds = expected if isinstance(expected, tuple) else (expected,)
    compared = torch.ones(())
    if workload == "stats":
        compared = _rows_without_ties(results, expecteds)
    worst = 0.0
    for index, (got, want) in enumerate(zip(results, expecteds)):
        if got.dtype == torch.int64:
            continue  # checked through the ties above
        if workload == "stats" and index == len(results) - 1:  # disagreement
            got, want = got[compared], want[compared]
        finite = torch.isfinite(want)
        diff = (got[finite].double() - want[finite].double()).abs().max().item() if finite.any() else 0.0
        scale = want[finite].abs().max().item() if finite.any() else 1.0
        assert diff <= 1e-4 * max(1.0, scale), f"{workload}: max |ours - eager| = {diff:.3g}"
        worst = max(worst, diff)
    return worst


def _rows_without_ties(results, expecteds) -> torch.Tensor:
    """Mask of the rows whose predictions agree; raises if any other row is not a tie of mean probabilities."""
    probs, prediction = expecteds[0].double(), expecteds[5]
    got_prediction = results[5]
    differ = got_prediction != prediction
    if differ.any():
        rows = differ.nonzero().flatten()
        ours = probs[rows, got_prediction[rows]]
        theirs = probs[rows, prediction[rows]]
        gap = (theirs - ours).abs().max().item()
        assert gap <= 1e-6, (f"stats: {rows.numel()} predictions differ from eager, not by ties "
                             f"(mean-probability gap up to {gap:.3g})")
    return ~differ
