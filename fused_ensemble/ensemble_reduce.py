"""Public API of the fused ensemble reduction: ``ensemble_reduce`` and ``ensemble_stats``.

Both take logits with a member dim ``dim`` and the class dim last, move the member dim first and collapse the
rest into rows, so every kernel sees ``x`` of shape [N, R, K] (a view of the input whenever strides allow: the
kernels take any strides, zero strides from ``expand()`` included), then reshape the results back.

Kernel contract (the Triton launchers in fused_ensemble.kernels.ensemble_reduce and the C++/CUDA ops
``torch.ops.fused_ensemble_ext.*`` implement the same three functions):
``reduce_forward(x, reduction) -> (out [R, K], aux)``, ``reduce_backward(grad_out, x, out, aux, reduction)
-> grad`` and ``stats_forward(x) -> 7 tensors``; the ops in fused_ensemble.reduce_ops register them with
torch.library.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fused_ensemble import backends, reduce_ops
from fused_ensemble.reference import (EnsembleStats, check_reduction, normalize_member_dim, reduce_reference,
                                      stats_reference)

__all__ = ["ensemble_reduce", "ensemble_stats"]


def _members_rows_classes(logits: Tensor, dim: int) -> Tensor:
    """``logits`` as [N, R, K]: a view (no copy) unless the non-member dims cannot be merged by strides."""
    x = logits.movedim(dim, 0)
    # R is computed, not -1: reshape cannot infer -1 when the batch is empty.
    rows = math.prod(x.shape[1:-1])
    return x.reshape(x.shape[0], rows, x.shape[-1])


def _check_classes(logits: Tensor) -> None:
    if logits.shape[-1] == 0:
        raise ValueError(f"logits have no classes: the last dim of shape {tuple(logits.shape)} is empty")


def _run_with_fallback(run_kernel, run_reference, backend: str, logits: Tensor, dim: int, workload: str):
    """Runs ``run_kernel(concrete_backend)``; under ``backend="auto"`` a kernel that raises is remembered (with a
    warning) and the next backend is tried, down to ``run_reference()``. ``workload`` (a reduction or "stats")
    and the row and class counts refine the automatic choice."""
    device_type = logits.device.type
    rows = math.prod(logits.shape[:dim] + logits.shape[dim + 1:-1])
    while True:
        chosen = backends.resolve_backend(backend, device_type, logits.dtype, logits.shape[-1], workload, rows,
                                          logits.device.index)
        if chosen == "torch":
            return run_reference()
        if backend != "auto" or torch.compiler.is_compiling():
            return run_kernel(chosen)
        try:
            return run_kernel(chosen)
        except backends.NOT_KERNEL_FAILURES:
            raise
        except Exception as exc:
            backends.note_auto_failure(chosen, device_type, exc)


def ensemble_reduce(logits: Tensor, reduction: str = "mean_probs", dim: int = 0, backend: str = "auto",
                    out_dtype: torch.dtype | None = None) -> Tensor:
    """Reduces the member dim of ensemble logits in one fused pass.

    Args:
        logits: float32, float16 or bfloat16 tensor (float64 too with ``backend="torch"`` or ``"cpp"``) holding
            the outputs of N members along ``dim`` and K classes along the last dim, e.g. [N, B, K]. Any
            strides: non-contiguous and expanded (zero-stride) views are read in place.
        reduction: ``"mean"`` (mean of the raw outputs), ``"mean_probs"`` (mean over members of
            ``softmax(logits)``, the deep-ensemble predictive distribution), ``"softmax_of_mean"`` (softmax of
            the averaged logits) or ``"log_mean_probs"`` (``log(mean_probs)``, computed stably).
        dim: the member dim; any dim but the last (class) one, negative values count from the end.
        backend: ``"auto"`` (CUDA tensors: Triton, else the CUDA C++ kernels, else PyTorch, except ``"mean"``,
            rows of at most 64 classes for ``"mean_probs"``/``"log_mean_probs"``, and at least one row per
            multiprocessor of 4097-32768 classes for ``"mean_probs"``/``"softmax_of_mean"``, where the CUDA C++
            kernels come first as they measured faster there; CPU tensors: the C++ kernels if the extension is built,
            else PyTorch), ``"torch"`` (fused_ensemble.reference, autograd through PyTorch ops), ``"triton"``
            (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``) or ``"cpp"`` (C++ kernels for CPU
            tensors, CUDA C++ kernels for CUDA tensors). A kernel that fails
            under ``"auto"`` is reported once with a warning and not used again in the process.
        out_dtype: dtype of the result; by default float32 (float64 for float64 logits), whatever the input
            dtype: accumulation is always in float32 (float64).

    Returns:
        Tensor of shape ``logits.shape`` without ``dim``, e.g. [B, K]. Differentiable: the kernel backends run
        fused backward kernels (for ``"mean"`` and ``"softmax_of_mean"`` every member's gradient is one [.., K]
        tensor expanded over the members with a zero stride).

    Raises:
        TypeError: ``logits`` is not a floating-point tensor, or ``out_dtype`` is not a floating-point dtype.
        ValueError: unknown ``reduction`` or ``backend``, ``dim`` out of range or equal to the class dim, no
            members or no classes.
        RuntimeError: an explicitly named backend cannot run here (the message says why: extension not built,
            no CUDA tensor, triton not installed, unsupported dtype).

    Example::

        >>> logits = torch.randn(8, 64, 1000)            # 8 members, batch 64, 1000 classes
        >>> probs = ensemble_reduce(logits, "mean_probs")  # [64, 1000], rows sum to 1
    """
    check_reduction(reduction)
    dim = normalize_member_dim(logits, dim)
    _check_classes(logits)
    if out_dtype is not None and not out_dtype.is_floating_point:
        raise TypeError(f"out_dtype must be a floating-point dtype, got {out_dtype}")
    out_shape = logits.shape[:dim] + logits.shape[dim + 1:]

    def run_kernel(chosen: str) -> Tensor:
        out, _aux = reduce_ops.reduce(_members_rows_classes(logits, dim), reduction, chosen)
        return out.reshape(out_shape)

    out = _run_with_fallback(run_kernel, lambda: reduce_reference(logits, reduction, dim), backend, logits, dim,
                             reduction)
    return out if out_dtype is None else out.to(out_dtype)


def ensemble_stats(logits: Tensor, dim: int = 0, backend: str = "auto") -> EnsembleStats:
    """Predictive distribution and uncertainty statistics of an ensemble, in one pass over the logits.

    Args:
        logits: as for :func:`ensemble_reduce`: N members along ``dim``, K classes along the last dim, float32,
            float16 or bfloat16 (float64 with ``backend="torch"`` or ``"cpp"``), any strides.
        dim: the member dim (not the last one).
        backend: as for :func:`ensemble_reduce`. The kernels never materialize the [N, ..., K] member
            probabilities; ``"torch"`` (the reference) does.

    Returns:
        :class:`~fused_ensemble.reference.EnsembleStats` with, per row (``logits.shape`` without ``dim`` and
        the class dim): ``probs`` (mean of member softmaxes, with the class dim), ``entropy`` (predictive
        entropy of ``probs``, nats), ``expected_entropy`` (mean of member entropies), ``mutual_info``
        (``entropy - expected_entropy``), ``confidence`` (max of ``probs``), ``prediction`` (argmax of
        ``probs``, int64, first index on ties) and ``disagreement`` (fraction of members whose own argmax
        differs from ``prediction``). Floats are float32 (float64 for float64 logits).

    The kernel backends are not differentiable: when ``logits`` requires grad (and grad mode is on),
    ``backend="auto"`` uses the PyTorch reference and an explicit ``"triton"``/``"cpp"`` raises.

    Example::

        >>> s = ensemble_stats(torch.randn(8, 64, 10))
        >>> s.mutual_info.shape, s.prediction.dtype
        (torch.Size([64]), torch.int64)
    """
    dim = normalize_member_dim(logits, dim)
    _check_classes(logits)
    if torch.is_grad_enabled() and logits.requires_grad:
        if backend in backends.KERNEL_BACKENDS:
            raise RuntimeError(f"ensemble_stats with backend={backend!r} is not differentiable but logits "
                               f"require grad; use backend='torch' (or 'auto'), or pass logits.detach()")
        backends.check_backend(backend)
        backend = "torch"
    probs_shape = logits.shape[:dim] + logits.shape[dim + 1:]
    row_shape = probs_shape[:-1]

    def run_kernel(chosen: str) -> EnsembleStats:
        probs, *per_row = reduce_ops.stats(_members_rows_classes(logits, dim), chosen)
        return EnsembleStats(probs.reshape(probs_shape), *(t.reshape(row_shape) for t in per_row))

    return _run_with_fallback(run_kernel, lambda: stats_reference(logits, dim), backend, logits, dim, "stats")
