"""The fused ensemble reductions: ``ensemble_reduce``, ``ensemble_stats``, and ``reduce_members`` (``FusedEnsemble``'s).

Both take logits with a member dim ``dim`` and the class dim last, move the member dim first and collapse the
rest into rows, so every kernel sees ``x`` of shape [N, R, K] (a view of the input whenever strides allow: the
kernels take any strides, zero strides from ``expand()`` included), then reshape the results back. Which kernel
runs is ``fused_ensemble.ops.dispatch``'s choice; the ops of ``fused_ensemble.ops.library`` run it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fused_ensemble.ops import dispatch, library
from fused_ensemble.ops.reductions import EnsembleStats, check_reduction, normalize_member_dim
from fused_ensemble.ops.reference import reduce_reference, stats_reference

__all__ = ["ensemble_reduce", "ensemble_stats", "reduce_members"]


def members_rows_classes(logits: Tensor, dim: int) -> Tensor:
    """``logits`` as [N, R, K]: a view (no copy) unless the non-member dims cannot be merged by strides."""
    x = logits.movedim(dim, 0)
    # R is computed, not -1: reshape cannot infer -1 when the batch is empty.
    rows = math.prod(x.shape[1:-1])
    return x.reshape(x.shape[0], rows, x.shape[-1])


def _check_classes(logits: Tensor) -> None:
    if logits.shape[-1] == 0:
        raise ValueError(f"logits have no classes: the last dim of shape {tuple(logits.shape)} is empty")


def _rows(logits: Tensor, dim: int) -> int:
    return math.prod(logits.shape[:dim] + logits.shape[dim + 1:-1])


def ensemble_reduce(logits: Tensor, reduction: str = "mean_probs", dim: int = 0, backend: str = "auto",
                    out_dtype: torch.dtype | None = None) -> Tensor:
    """Reduces the member dim of ensemble logits in one fused pass.

    Args:
        logits: float32, float16 or bfloat16 tensor (float64 too with ``backend="torch"`` or ``"cpp"``) holding
            the outputs of N members along ``dim`` and K classes along the last dim, e.g. [N, B, K]. Any
            strides: non-contiguous and expanded (zero-stride) views are read in place.
        reduction: ``"mean"`` (mean of the raw outputs), ``"mean_probs"`` (mean over members of
            ``softmax(logits)``, the deep-ensemble predictive distribution), ``"softmax_of_mean"`` (softmax of
            the averaged logits), ``"log_mean_probs"`` (``log(mean_probs)``, computed stably) or ``"vote"`` (hard
            voting: the one-hot of the class most members predict, not differentiable; see
            ``fused_ensemble.REDUCTIONS``). Non-finite logits follow one rule on every backend: ``-inf`` is a
            probability of 0, and a row in which some member's logits hold a NaN or ``+inf`` (or are all ``-inf``)
            is NaN in every class, for every reduction but ``"mean"``, which averages element by element.
        dim: the member dim; any dim but the last (class) one, negative values count from the end.
        backend: ``"auto"``: the fastest backend that can run this input (``fused_ensemble.ops.dispatch``): on CPU
            tensors the C++ kernels if the extension is built, else PyTorch; on CUDA tensors Triton or the CUDA C++
            kernels, whichever measured faster for this reduction and shape, else PyTorch (``"vote"`` always runs on
            PyTorch). Inputs are checked first, so a caller's mistake raises and disables nothing; a kernel that
            fails by itself under ``"auto"`` is reported once with a warning and not used again for this op and
            device in the process, while an out-of-memory error passes through and disables nothing. ``"torch"``
            (``fused_ensemble.ops.reference``, autograd through PyTorch ops), ``"triton"`` (CUDA tensors, or CPU
            tensors under ``TRITON_INTERPRET=1``) or ``"cpp"`` (C++ kernels for CPU tensors, CUDA C++ kernels for
            CUDA tensors) insist on that backend.
        out_dtype: dtype of the result; by default float32 (float64 for float64 logits), whatever the input
            dtype: accumulation is always in float32 (float64).

    Returns:
        Tensor of shape ``logits.shape`` without ``dim``, e.g. [B, K]. Differentiable (but for ``"vote"``, whose
        result never requires grad): the kernel backends run fused backward kernels (for ``"mean"`` and
        ``"softmax_of_mean"`` every member's gradient is one [.., K] tensor expanded over the members with a zero
        stride).

    Raises:
        TypeError: ``logits`` is not a dense (strided) floating-point tensor, or ``out_dtype`` is not a
            floating-point dtype.
        ValueError: unknown ``reduction`` or ``backend``, ``dim`` out of range or equal to the class dim, no
            members or no classes.
        RuntimeError: an explicitly named backend cannot run here (the message gives every backend's reason:
            extension not built, no CUDA tensor, triton not installed, unsupported dtype or reduction).

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

    def run_backend(chosen: str) -> Tensor:
        if chosen == "torch":
            return reduce_reference(logits, reduction, dim)
        out, _aux = library.reduce(members_rows_classes(logits, dim), reduction, chosen)
        return out.reshape(out_shape)

    out = dispatch.run(backend, "reduce", logits, run_backend, reduction=reduction, classes=logits.shape[-1],
                       rows=_rows(logits, dim))
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
        :class:`~fused_ensemble.EnsembleStats` with, per row (``logits.shape`` without ``dim`` and
        the class dim): ``probs`` (mean of member softmaxes, with the class dim), ``entropy`` (predictive
        entropy of ``probs``, nats), ``expected_entropy`` (mean of member entropies), ``mutual_info``
        (``max(entropy - expected_entropy, 0)``), ``confidence`` (max of ``probs``), ``prediction`` (argmax of
        ``probs``, int64, first index on ties) and ``disagreement`` (the share of members whose own argmax
        differs from ``prediction``: the variation ratio). Floats are float32 (float64 for float64 logits). A
        row in which some member's logits hold a NaN or ``+inf`` (or are all ``-inf``) is NaN in every float
        field and predicts 0, on every backend (see :class:`~fused_ensemble.EnsembleStats`).

    The kernel backends are not differentiable: when ``logits`` requires grad (and grad mode is on),
    ``backend="auto"`` uses the PyTorch reference and an explicit ``"triton"``/``"cpp"`` raises.

    Example::

        >>> s = ensemble_stats(torch.randn(8, 64, 10))
        >>> s.mutual_info.shape, s.prediction.dtype
        (torch.Size([64]), torch.int64)
    """
    dim = normalize_member_dim(logits, dim)
    _check_classes(logits)
    probs_shape = logits.shape[:dim] + logits.shape[dim + 1:]
    row_shape = probs_shape[:-1]

    def run_backend(chosen: str) -> EnsembleStats:
        if chosen == "torch":
            return stats_reference(logits, dim)
        probs, *per_row = library.stats(members_rows_classes(logits, dim), chosen)
        return EnsembleStats(probs.reshape(probs_shape), *(t.reshape(row_shape) for t in per_row))

    return dispatch.run(backend, "stats", logits, run_backend, classes=logits.shape[-1], rows=_rows(logits, dim),
                        requires_grad=torch.is_grad_enabled() and logits.requires_grad)


def reduce_members(outputs, reduction: str):
    """``FusedEnsemble``'s reduction of its member outputs ``[N, B, ...]`` (dim 0 = member): the outputs as they are
    for ``"none"``, else ``ensemble_reduce(outputs, reduction, dim=0)``, so that ``"mean"`` has one contract: a
    float32 mean (float64 for float64 outputs), accumulated in float32 whatever the output dtype. Members that
    return one number each (``[N]``) are averaged too."""
    if reduction == "none":
        return outputs
    if not isinstance(outputs, torch.Tensor):
        raise TypeError(f"reduction={reduction!r} needs the members to return one tensor, got "
                        f"{type(outputs).__name__}; use reduction='none'")
    if reduction == "mean" and outputs.dim() == 1:
        return ensemble_reduce(outputs.unsqueeze(-1), reduction, dim=0).squeeze(-1)
    return ensemble_reduce(outputs, reduction, dim=0)
