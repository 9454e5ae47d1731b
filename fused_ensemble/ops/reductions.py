"""The ensemble reductions and their contract, written once for every backend and for ``FusedEnsemble``.

Every reduction takes logits with a member dim (anywhere but last) and the class dim last, accumulates in float32
(float64 stays float64) whatever the input dtype, and returns float32 (or float64). The kernels see the logits as
``[N, R, K]`` (members, rows, classes) with any strides.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

REDUCTIONS = ("mean", "mean_probs", "softmax_of_mean", "log_mean_probs")
"""Reductions over the member dim, shared by ``ensemble_reduce``, ``ensemble_linear_reduce`` and ``FusedEnsemble``:

- ``"mean"``: mean of the raw outputs (any output, regression too).
- ``"mean_probs"``: mean over members of ``softmax(logits)``: the deep-ensemble predictive distribution.
- ``"softmax_of_mean"``: ``softmax`` of the member-averaged logits.
- ``"log_mean_probs"``: ``log(mean_probs)``, computed stably as ``logsumexp_n(log_softmax) - log N``.
"""

MEMBER_INDEPENDENT_GRAD = ("mean", "softmax_of_mean")
"""Reductions whose gradient is the same for every member: the backward kernels return it once, ``[R, K]``."""

SAVES_MEMBER_LSE = ("mean_probs", "log_mean_probs")
"""Reductions whose forward kernels save the log-sum-exp of every member row, ``[N, R]``, for the backward pass."""

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class EnsembleStats(NamedTuple):
    """Predictive distribution and uncertainty statistics of an ensemble, per row (all but the class dim).

    ``probs``: mean of member softmaxes ``[..., K]``; ``entropy``: predictive entropy of ``probs`` (nats);
    ``expected_entropy``: mean of member entropies (aleatoric part); ``mutual_info``: ``entropy -
    expected_entropy`` (epistemic part; may be a rounding error below zero); ``confidence``: max of ``probs``;
    ``prediction``: argmax of ``probs`` (int64, first index on ties); ``disagreement``: fraction of members
    whose own argmax differs from ``prediction``.
    """

    probs: torch.Tensor
    entropy: torch.Tensor
    expected_entropy: torch.Tensor
    mutual_info: torch.Tensor
    confidence: torch.Tensor
    prediction: torch.Tensor
    disagreement: torch.Tensor


def check_reduction(reduction: str) -> None:
    """Raises a ValueError unless ``reduction`` is one of ``REDUCTIONS``."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {', '.join(map(repr, REDUCTIONS))}")


def check_float_tensor(t, name: str) -> None:
    """Raises unless ``t`` is a float16/bfloat16/float32/float64 tensor (``name`` says which argument)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                        f"got {t.dtype}")


def normalize_member_dim(logits: torch.Tensor, dim: int) -> int:
    """Checks ``logits`` and returns ``dim`` as a non-negative index of the member dim."""
    check_float_tensor(logits, "logits")
    if logits.dim() < 2:
        raise ValueError(f"logits must have a member dim and a class dim (at least 2 dims), "
                         f"got shape {tuple(logits.shape)}")
    if not -logits.dim() <= dim < logits.dim():
        raise ValueError(f"dim={dim} is out of range for logits with {logits.dim()} dims")
    dim = dim % logits.dim()
    if dim == logits.dim() - 1:
        raise ValueError(f"dim={dim} is the class dim (the last one); the member dim must be another dim")
    if logits.shape[dim] == 0:
        raise ValueError("the ensemble has no members: logits.shape[dim] == 0")
    return dim


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
