"""Which kernel backend runs an ensemble reduction: availability checks, the ``"auto"`` choice, and failure memory.

Backends: ``"torch"`` (fused_ensemble.reference, autograd through it), ``"triton"`` (fused_ensemble.kernels, CUDA
tensors, or CPU tensors under ``TRITON_INTERPRET=1``) and ``"cpp"`` (the compiled extension: C++ kernels for CPU
tensors, CUDA C++ kernels for CUDA tensors). ``"auto"`` prefers triton, then cpp, then torch on CUDA, and cpp, then
torch on CPU. A kernel backend that raised once under ``"auto"`` is not chosen again in this process (with a
warning, the way xformers remembers a failed Triton kernel); an explicitly named backend is never second-guessed.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "torch", "triton", "cpp")
KERNEL_BACKENDS = ("triton", "cpp")

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

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


@torch.compiler.assume_constant_result
def _auto_choice(device_type: str, dtype: torch.dtype) -> str:
    # Evaluated once at trace time under torch.compile: the choice is a constant of the compiled graph.
    preference = ("triton", "cpp") if device_type == "cuda" else ("cpp",)
    for backend in preference:
        failed = (backend, device_type) in _failed_under_auto
        if not failed and unavailable_reason(backend, device_type, dtype) is None:
            return backend
    return "torch"


def resolve_backend(backend: str, device_type: str, dtype: torch.dtype) -> str:
    """The concrete backend for ``backend`` (which may be ``"auto"``); raises if an explicit one is unavailable."""
    check_backend(backend)
    if backend == "auto":
        return _auto_choice(device_type, dtype)
    problem = unavailable_reason(backend, device_type, dtype)
    if problem is not None:
        raise RuntimeError(f"backend={backend!r} is unavailable: {problem}")
    return backend


def note_auto_failure(backend: str, device_type: str, exc: BaseException) -> None:
    """Remembers that ``backend`` raised ``exc`` under ``"auto"`` so that ``"auto"`` stops choosing it."""
    _failed_under_auto.add((backend, device_type))
    warnings.warn(f"fused_ensemble: the {backend} ensemble-reduction kernels failed on a {device_type} tensor "
                  f"({type(exc).__name__}: {exc}); backend='auto' falls back to the next backend from now on",
                  RuntimeWarning, stacklevel=3)
