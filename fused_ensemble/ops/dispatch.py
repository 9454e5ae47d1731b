"""Which backend runs an ensemble op: one dispatch for ``ensemble_reduce``, ``ensemble_stats`` and
``ensemble_linear_reduce``.

Backends: ``"torch"`` (``fused_ensemble.ops.reference``, autograd through PyTorch ops; runs everything),
``"triton"`` (``fused_ensemble.kernels``: CUDA tensors, or CPU tensors when triton runs interpreted) and ``"cpp"``
(the compiled extension: C++ kernels for CPU tensors, CUDA C++ kernels for CUDA tensors; for
``ensemble_linear_reduce`` one GEMM and then the C++ reduction kernels).

- Each backend says why it cannot run an input (``unavailable_reason``): the package, the device, the dtype, the
  op, or a call it does not implement (``input_problem``: a reduction the kernels lack, such as ``"vote"``, or an
  input that needs a gradient the kernels do not have).
- ``"auto"`` walks a priority list per device (``auto_priority``): on CPU tensors cpp, then torch (never triton,
  even interpreted); on CUDA tensors triton, then cpp, then torch, except where the CUDA C++ kernels measured
  faster (``CUDA_CPP_FIRST``, ``CUDA_CPP_FIRST_ANY_K``, ``CUDA_CPP_MANY_ROWS``), which then come first.
- The public functions check their inputs before they call ``run`` (layout, dtype, shapes, devices), so that a
  caller's mistake raises its own clear error and never reaches a kernel. Under ``"auto"``, a kernel backend that
  still raises has failed by itself: it is remembered (``note_auto_failure``, with one warning, the way xformers
  remembers a failed Triton kernel), not chosen again for that op and device in this process, and the next backend
  answers. An out-of-memory error (``torch.OutOfMemoryError``, or the CPU allocator's ``RuntimeError``) says
  nothing about the kernel: it passes through and disables nothing (``is_out_of_memory``). An explicitly named
  backend is never second-guessed: if it cannot run, the error gives every backend's reason.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.utils.checkpoint

from fused_ensemble import config, extension
from fused_ensemble.ops.reductions import KERNEL_REDUCTIONS

BACKENDS = ("auto", "torch", "triton", "cpp")
KERNEL_BACKENDS = ("triton", "cpp")
OPS = ("reduce", "stats", "linear_reduce")
"""The ensemble ops: ``ensemble_reduce`` (differentiable on every backend), ``ensemble_stats`` and
``ensemble_linear_reduce`` (differentiable on the torch backend and, for ``linear_reduce``, on cpp)."""

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_MODULES = {"reduce": "fused_ensemble.kernels.ensemble_reduce",
                   "stats": "fused_ensemble.kernels.ensemble_reduce",
                   "linear_reduce": "fused_ensemble.kernels.ensemble_head"}

CUDA_CPP_MAX_CLASSES = 64
"""On CUDA, rows of at most this many classes go to the CUDA C++ kernels first for ``CUDA_CPP_FIRST``: on an H100
they measured faster than Triton at K=10 for these (several rows per warp against Triton's 2D tiles), Triton as fast
or faster for the other reductions there and mostly faster from K=1000 up (docs/performance.md, bench/NOTES.md)."""
CUDA_CPP_FIRST = ("mean_probs", "log_mean_probs", "stats")
CUDA_CPP_FIRST_ANY_K = ("mean",)
"""Reductions that go to the CUDA C++ kernels first on CUDA whatever K is: for ``mean`` they read closer to a
device copy's bandwidth than Triton at every shape measured on an H100; a mean has no per-member softmax to fuse,
so a copy-speed kernel is all there is to gain."""
CUDA_CPP_MANY_ROWS = ("mean_probs", "softmax_of_mean", "stats")
CUDA_CPP_MANY_ROWS_CLASSES = (4096, 32768)
"""On CUDA, rows of more than 4096 and at most 32768 classes go to the CUDA C++ kernels first for
``CUDA_CPP_MANY_ROWS`` when there are at least as many rows as the GPU has multiprocessors: they run one block per
row with its accumulators in shared memory, where the Triton ones split rows that long over several programs and
read them twice. On an H100 that won once every multiprocessor had a row, tied at half of them and lost below;
``log_mean_probs`` needs a second accumulator row and was slower through CUDA C++ at every such shape."""

# (backend, device type, op) triples whose kernels raised under "auto"; filled by note_auto_failure.
_failed_under_auto: set[tuple[str, str, str]] = set()
# Why a Triton kernel module cannot be imported (None: it can), by module name; checked once each.
_triton_import_problems: dict[str, str | None] = {}

T = TypeVar("T")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(map(repr, BACKENDS))}")


def check_op(op: str) -> None:
    if op not in OPS:
        raise ValueError(f"unknown ensemble op {op!r}; expected one of {', '.join(map(repr, OPS))}")


def _triton_import_problem(op: str) -> str | None:
    module = _TRITON_MODULES[op]
    if module not in _triton_import_problems:
        problem = None
        if importlib.util.find_spec("triton") is None:
            problem = "triton is not installed"
        else:
            try:
                importlib.import_module(module)
            except Exception as exc:  # a broken kernel module must not break the package
                problem = f"the Triton kernels failed to import: {type(exc).__name__}: {exc}"
        _triton_import_problems[module] = problem
    return _triton_import_problems[module]


def _extension_problem(device_type: str) -> str | None:
    # Asked each time (the extension module caches the load): build_jit() may register the ops later.
    if not extension.load_extension():
        return f"the C++ extension is not built: {extension.extension_status()}"
    if device_type == "cuda" and not extension.has_cuda_kernels():
        return ("the C++ extension was built without CUDA kernels (no CUDA toolkit at build time, or "
                "FUSED_ENSEMBLE_NO_CUDA=1); fused_ensemble.extension.build_jit() builds them")
    return None


@torch.compiler.assume_constant_result
def unavailable_reason(backend: str, device_type: str, dtype: torch.dtype, op: str = "reduce") -> str | None:
    """Why kernel ``backend`` cannot run ``op`` on a ``dtype`` tensor on ``device_type``, or None when it can
    (whether an input needs a gradient is ``input_problem``'s part).

    Under torch.compile this runs once at trace time (imports and the extension check are not traceable) and its
    answer is a constant of the graph."""
    if backend == "torch":
        return None
    if device_type not in ("cpu", "cuda"):
        return f"the {backend} kernels take CPU or CUDA tensors, got a {device_type} tensor"
    if backend == "cpp":
        return _extension_problem(device_type)
    problem = _triton_import_problem(op)
    if problem is not None:
        return problem
    if device_type == "cpu" and not config.settings.triton_interpret:
        return "triton kernels need a CUDA tensor (or TRITON_INTERPRET=1)"
    if dtype not in _TRITON_DTYPES:
        return f"the triton kernels take float16, bfloat16 or float32 inputs, got {dtype}"
    return None


def input_problem(backend: str, op: str, requires_grad: bool, reduction: str | None = None) -> str | None:
    """Why ``backend`` cannot run this call of ``op`` although it runs such tensors: a ``reduction`` its kernels do
    not implement, or a gradient it cannot give."""
    if backend == "torch":
        return None
    if op in ("reduce", "linear_reduce") and reduction is not None and reduction not in KERNEL_REDUCTIONS:
        return (f"the {backend} kernels do not implement reduction {reduction!r} (they implement "
                f"{', '.join(map(repr, KERNEL_REDUCTIONS))}; the torch backend runs every reduction)")
    if not requires_grad:
        return None
    if op == "stats":
        return f"ensemble_stats on the {backend} backend is not differentiable but the logits require grad"
    if op == "linear_reduce" and backend == "triton":
        return "the Triton ensemble head is inference only (no backward) but an input requires grad"
    return None


@torch.compiler.assume_constant_result  # outermost: under torch.compile the cached lookup runs eagerly, once
@functools.cache
def _multiprocessors(device_index: int | None) -> int:
    """The streaming multiprocessor count of a CUDA device (the current one for None)."""
    return torch.cuda.get_device_properties(torch.cuda.current_device() if device_index is None
                                            else device_index).multi_processor_count


def auto_priority(device_type: str, op: str = "reduce", reduction: str | None = None, classes: int | None = None,
                  rows: int | None = None, device_index: int | None = None) -> tuple[str, ...]:
    """The backends ``"auto"`` tries, in order, for ``op`` (with ``reduction``) on ``rows`` rows of ``classes``
    classes on ``device_type`` (see the module docstring); the list always ends with ``"torch"``."""
    if device_type != "cuda":
        return ("cpp", "torch")
    if op == "linear_reduce":
        return ("triton", "cpp", "torch")
    workload = "stats" if op == "stats" else reduction
    # Plain bools: under torch.compile a symbolic K or R becomes a guard, and the choice a constant.
    cpp_first = bool(workload in CUDA_CPP_FIRST_ANY_K or (
        classes is not None and classes <= CUDA_CPP_MAX_CLASSES and workload in CUDA_CPP_FIRST))
    low, high = CUDA_CPP_MANY_ROWS_CLASSES
    if (not cpp_first and workload in CUDA_CPP_MANY_ROWS and classes is not None and rows is not None
            and low < classes <= high):
        cpp_first = bool(rows >= _multiprocessors(device_index))
    return ("cpp", "triton", "torch") if cpp_first else ("triton", "cpp", "torch")


@torch.compiler.assume_constant_result
def _first_runnable(priority: tuple[str, ...], device_type: str, dtype: torch.dtype, op: str) -> str:
    # Evaluated once at trace time under torch.compile: the choice is a constant of the compiled graph.
    for backend in priority:
        failed = (backend, device_type, op) in _failed_under_auto
        if not failed and unavailable_reason(backend, device_type, dtype, op) is None:
            return backend
    return "torch"


def resolve_backend(backend: str, device_type: str, dtype: torch.dtype, op: str = "reduce",
                    reduction: str | None = None, classes: int | None = None, rows: int | None = None,
                    device_index: int | None = None, requires_grad: bool = False) -> str:
    """The concrete backend for ``backend`` (which may be ``"auto"``) running ``op``; raises a RuntimeError that
    gives every backend's reason if an explicitly named one cannot run this input."""
    check_backend(backend)
    check_op(op)
    if backend == "auto":
        priority = tuple(name for name in auto_priority(device_type, op, reduction, classes, rows, device_index)
                         if input_problem(name, op, requires_grad, reduction) is None)
        return _first_runnable(priority, device_type, dtype, op)
    reasons = {name: unavailable_reason(name, device_type, dtype, op)
               or input_problem(name, op, requires_grad, reduction) for name in BACKENDS[1:]}
    if reasons[backend] is not None:
        others = "; ".join(f"{name}: {reason or 'can run it'}" for name, reason in reasons.items()
                           if name != backend)
        raise RuntimeError(f"backend={backend!r} is unavailable: {reasons[backend]} (the other backends: {others})")
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

_CPU_OUT_OF_MEMORY = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")
"""What the CPU allocator's plain ``RuntimeError`` says when an allocation fails."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` reports an allocation that failed: ``torch.OutOfMemoryError`` (a CUDA device, or any
    allocator that raises it), or the CPU allocator's ``RuntimeError``."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(words in str(exc) for words in _CPU_OUT_OF_MEMORY)


def note_auto_failure(backend: str, device_type: str, op: str, exc: BaseException) -> None:
    """Remembers that ``backend`` raised ``exc`` running ``op`` under ``"auto"`` so that ``"auto"`` stops choosing
    it for that op and device type, and says so once, with a warning."""
    key = (backend, device_type, op)
    if key in _failed_under_auto:
        return
    _failed_under_auto.add(key)
    warnings.warn(f"fused_ensemble: the {backend} kernels of {op} failed on a {device_type} tensor "
                  f"({type(exc).__name__}: {exc}); backend='auto' uses the next backend for {op} on {device_type} "
                  f"tensors from now on in this process", RuntimeWarning, stacklevel=4)


def run(backend: str, op: str, x: torch.Tensor, run_backend: Callable[[str], T], *,
        reduction: str | None = None, classes: int | None = None, rows: int | None = None,
        requires_grad: bool = False) -> T:
    """``run_backend(name)`` with the backend ``backend`` resolves to for ``op`` on tensors like ``x`` (which the
    caller has checked). Under ``"auto"`` a kernel backend that raises is remembered (with one warning) and the next
    one is tried, down to ``"torch"``, which always runs; an out-of-memory error passes through and disables
    nothing."""
    device_type = x.device.type
    while True:
        chosen = resolve_backend(backend, device_type, x.dtype, op, reduction, classes, rows, x.device.index,
                                 requires_grad)
        if chosen == "torch" or backend != "auto" or torch.compiler.is_compiling():
            return run_backend(chosen)
        try:
            return run_backend(chosen)
        except NOT_KERNEL_FAILURES:
            raise
        except Exception as exc:
            if is_out_of_memory(exc):
                raise
            note_auto_failure(chosen, device_type, op, exc)
