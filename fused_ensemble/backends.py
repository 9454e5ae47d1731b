"""Which kernel backend runs an ensemble reduction: availability checks, the ``"auto"`` choice, and failure memory.

Backends: ``"torch"`` (fused_ensemble.reference, autograd through it), ``"triton"`` (fused_ensemble.kernels, CUDA
tensors, or CPU tensors under ``TRITON_INTERPRET=1``) and ``"cpp"`` (the compiled extension: C++ kernels for CPU
tensors, CUDA C++ kernels for CUDA tensors). ``"auto"`` prefers triton, then cpp, then torch on CUDA, and cpp, then
torch on CPU; except on CUDA for ``"mean"``, for tiny rows (at most ``CUDA_CPP_MAX_CLASSES`` classes) of the
reductions that take a softmax per member, and for many rows of 4097-32768 classes, where the CUDA C++ kernels
come first (measured, see ``CUDA_CPP_MAX_CLASSES``, ``CUDA_CPP_FIRST_ANY_K`` and ``CUDA_CPP_MANY_ROWS_CLASSES``).
A kernel backend that raised once under ``"auto"`` is not chosen again in this process (with a warning, the way
xformers remembers a failed Triton kernel); an explicitly named backend is never second-guessed.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings

import torch
import torch.utils.checkpoint

BACKENDS = ("auto", "torch", "triton", "cpp")
KERNEL_BACKENDS = ("triton", "cpp")

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

CUDA_CPP_MAX_CLASSES = 64
"""On CUDA, rows of at most this many classes go to the CUDA C++ kernels first for ``CUDA_CPP_FIRST``: an H100
(2026-11-27, fp32, bench/results/reduce-h100-2026-11-27.json) at K=10 read 1.1-1.3x faster through them for
mean_probs and log_mean_probs and 2.0-2.2x for ensemble_stats (several rows per warp vs Triton's 2D tiles), while
Triton was as fast for mean and 1.15-1.25x faster for softmax_of_mean there, and mostly faster from K=1000 up."""
CUDA_CPP_FIRST = ("mean_probs", "log_mean_probs", "stats")
CUDA_CPP_FIRST_ANY_K = ("mean",)
"""Reductions that go to the CUDA C++ kernels first on CUDA whatever K is. ``mean``, same H100 run: CUDA C++ read
0.90-0.96 of copy and 0.96-1.05x eager's ``torch.mean`` at all 11 shapes, Triton 0.81-0.94 and 0.89-1.03x (slower
than eager at 6); a mean has no per-member softmax to fuse, so a copy-speed kernel is all there is to gain."""
CUDA_CPP_MANY_ROWS = ("mean_probs", "softmax_of_mean", "stats")
CUDA_CPP_MANY_ROWS_CLASSES = (4096, 32768)
"""On CUDA, rows of more than 4096 and at most 32768 classes go to the CUDA C++ kernels first for
``CUDA_CPP_MANY_ROWS`` when there are at least as many rows as the GPU has multiprocessors. The CUDA C++ kernels run
one block per row with its accumulators in shared memory, the Triton ones split rows that long over several
programs and read them twice. On an H100 (132 SMs; bench/results/reduce-h100-2026-11-27-session4.json, and the
session-1 run alike) at 132 rows of K=32000 CUDA C++ was 1.4x faster for ``mean_probs`` (2.59x eager vs 1.81x),
1.24x for ``softmax_of_mean`` and 2.0x for stats; at 66 rows (half the SMs busy) the two tied, at 33 Triton won.
``log_mean_probs`` needs a second accumulator row and was slower through CUDA C++ at every such shape; at K=1000 the
two backends traded places by a few percent."""

# (backend, device type) pairs whose kernels raised under "auto"; filled by note_auto_failure.
_failed_under_auto: set[tuple[str, str]] = set()
# Whether triton and our Triton kernels import: checked once (a failed import is not retried on every call).
_import_problems: dict[str, str | None] = {}


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(map(repr, BACKENDS))}")


def _triton_import_problem() -> str | None:
    if "triton" not in _import_problems:
        problem = None
        if importlib.util.find_spec("triton") is None:
            problem = "triton is not installed"
        else:
            try:
                importlib.import_module("fused_ensemble.kernels.ensemble_reduce")
            except Exception as exc:  # a broken kernel module must not break the package
                problem = f"the Triton kernels failed to import: {type(exc).__name__}: {exc}"
        _import_problems["triton"] = problem
    return _import_problems["triton"]


def _extension_problem(device_type: str) -> str | None:
    # Asked each time (fused_ensemble._extension caches the load): build_jit() may register the ops later.
    try:
        from fused_ensemble import _extension
    except ImportError as exc:
        return f"the C++ extension is not built: {exc}"
    if not _extension.load_extension():
        return f"the C++ extension is not built: {_extension.extension_status()}"
    if device_type == "cuda" and not _extension.has_cuda_kernels():
        return ("the C++ extension was built without CUDA kernels (no CUDA toolkit at build time, or "
                "FUSED_ENSEMBLE_NO_CUDA=1); fused_ensemble._extension.build_jit() builds them")
    return None


@torch.compiler.assume_constant_result
def unavailable_reason(backend: str, device_type: str, dtype: torch.dtype) -> str | None:
    """Why kernel ``backend`` cannot reduce a ``dtype`` tensor on ``device_type``, or None when it can.

    Under torch.compile this runs once at trace time (imports and the extension check are not traceable) and
    its answer is a constant of the graph."""
    if backend == "torch":
        return None
    if device_type not in ("cpu", "cuda"):
        return f"the {backend} kernels take CPU or CUDA tensors, got a {device_type} tensor"
    if backend == "cpp":
        return _extension_problem(device_type)
    problem = _triton_import_problem()
    if problem is not None:
        return problem
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "triton kernels need a CUDA tensor (or TRITON_INTERPRET=1)"
    if dtype not in _TRITON_DTYPES:
        return f"the triton kernels take float16, bfloat16 or float32 logits, got {dtype}"
    return None


@torch.compiler.assume_constant_result  # outermost: under torch.compile the cached lookup runs eagerly, once
@functools.cache
def _multiprocessors(device_index: int | None) -> int:
    """The streaming multiprocessor count of a CUDA device (the current one for None)."""
    return torch.cuda.get_device_properties(torch.cuda.current_device() if device_index is None
                                            else device_index).multi_processor_count


@torch.compiler.assume_constant_result
def _auto_choice(device_type: str, dtype: torch.dtype, cpp_first: bool) -> str:
    # Evaluated once at trace time under torch.compile: the choice is a constant of the compiled graph.
    if device_type == "cuda":
        preference = ("cpp", "triton") if cpp_first else ("triton", "cpp")
    else:
        preference = ("cpp",)
    for backend in preference:
        failed = (backend, device_type) in _failed_under_auto
        if not failed and unavailable_reason(backend, device_type, dtype) is None:
            return backend
    return "torch"


def resolve_backend(backend: str, device_type: str, dtype: torch.dtype, classes: int | None = None,
                    workload: str | None = None, rows: int | None = None, device_index: int | None = None) -> str:
    """The concrete backend for ``backend`` (which may be ``"auto"``); raises if an explicit one is unavailable.

    ``classes`` (K), ``workload`` (a reduction name or ``"stats"``) and ``rows`` (R, on the CUDA device
    ``device_index``) refine ``"auto"`` on CUDA (see ``CUDA_CPP_MAX_CLASSES`` and ``CUDA_CPP_MANY_ROWS_CLASSES``)."""
    check_backend(backend)
    if backend == "auto":
        # A plain bool before the constant-folded choice (under torch.compile a symbolic K or R becomes a guard).
        cpp_first = bool(workload in CUDA_CPP_FIRST_ANY_K or (
            classes is not None and classes <= CUDA_CPP_MAX_CLASSES and workload in CUDA_CPP_FIRST))
        low, high = CUDA_CPP_MANY_ROWS_CLASSES
        if (not cpp_first and device_type == "cuda" and workload in CUDA_CPP_MANY_ROWS and classes is not None
                and rows is not None and low < classes <= high):
            cpp_first = bool(rows >= _multiprocessors(device_index))
        return _auto_choice(device_type, dtype, cpp_first)
    problem = unavailable_reason(backend, device_type, dtype)
    if problem is not None:
        raise RuntimeError(f"backend={backend!r} is unavailable: {problem}")
    return backend


def _not_kernel_failures() -> tuple[type[BaseException], ...]:
    kinds: list[type[BaseException]] = [torch.cuda.OutOfMemoryError]  # a full device is the caller's problem
    # Non-reentrant activation checkpointing stops a recomputed forward by raising this from the saved-tensor hook
    # (inside our op's autograd setup): swallowed, the recomputation fails and the backend would be dropped.
    stop = getattr(torch.utils.checkpoint, "_StopRecomputationError", None)
    if stop is not None:
        kinds.append(stop)
    return tuple(kinds)


NOT_KERNEL_FAILURES = _not_kernel_failures()
"""Exceptions that pass through ``"auto"``'s fallback: they say nothing about the kernel, which must not be dropped."""


def note_auto_failure(backend: str, device_type: str, exc: BaseException) -> None:
    """Remembers that ``backend`` raised ``exc`` under ``"auto"`` so that ``"auto"`` stops choosing it."""
    _failed_under_auto.add((backend, device_type))
    warnings.warn(f"fused_ensemble: the {backend} ensemble-reduction kernels failed on a {device_type} tensor "
                  f"({type(exc).__name__}: {exc}); backend='auto' falls back to the next backend from now on",
                  RuntimeWarning, stacklevel=3)
