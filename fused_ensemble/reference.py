"""Pure-PyTorch ensemble reductions: the CPU fallback, the test oracle and the benchmark baseline.

Every reduction takes logits with a member dim ``dim`` (anywhere but last) and the class dim last. The math
runs in float32 (float64 stays float64), whatever the input dtype, and the result is float32 (or float64).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

REDUCTIONS = ("mean", "mean_probs", "softmax_of_mean", "log_mean_probs")
"""Reductions over the member dim, shared by ``ensemble_reduce`` and ``FusedEnsemble``:

- ``"mean"``: mean of the raw outputs (any output, regression too).
- ``"mean_probs"``: mean over members of ``softmax(logits)``: the deep-ensemble predictive distribution.
- ``"softmax_of_mean"``: ``softmax`` of the member-averaged logits.
- ``"log_mean_probs"``: ``log(mean_probs)``, computed stably as ``logsumexp_n(log_softmax) - log N``.
"""

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {', '.join(map(repr, REDUCTIONS))}")


def check_float_tensor(t, name: str) -> None:
    """Raises unless ``t`` is a float16/bfloat16/float32/float64 tensor (``name`` says which argument)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
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


def reduce_reference(logits: torch.Tensor, reduction: str = "mean_probs", dim: int = 0) -> torch.Tensor:
    """Reference for ``ensemble_reduce``: reduces the member dim ``dim`` of ``logits`` (class dim last)."""
    check_reduction(reduction)
    dim = normalize_member_dim(logits, dim)
    x = logits.to(compute_dtype(logits.dtype))
    if reduction == "mean":
        return x.mean(dim)
    if reduction == "mean_probs":
        return torch.softmax(x, -1).mean(dim)
    if reduction == "softmax_of_mean":
        return torch.softmax(x.mean(dim), -1)
    return torch.logsumexp(torch.log_softmax(x, -1), dim) - math.log(x.shape[dim])


def stats_reference(logits: torch.Tensor, dim: int = 0) -> EnsembleStats:
    """Reference for ``ensemble_stats`` (materializes the member softmaxes; the kernels do not)."""
    dim = normalize_member_dim(logits, dim)
    x = logits.to(compute_dtype(logits.dtype))
    member_log_probs = torch.log_softmax(x, -1)
    member_probs = member_log_probs.exp()
    # 0 * log 0 = 0 for classes with -inf logits.
    plogp = torch.where(member_probs > 0, member_probs * member_log_probs, torch.zeros_like(member_probs))
    expected_entropy = -plogp.sum(-1).mean(dim)
    probs = member_probs.mean(dim)
    entropy = -torch.special.xlogy(probs, probs).sum(-1)
    confidence, prediction = probs.max(-1)
    member_prediction = x.argmax(-1)
    disagreement = (member_prediction != prediction.unsqueeze(dim)).to(x.dtype).mean(dim)
    return EnsembleStats(probs, entropy, expected_entropy, entropy - expected_entropy, confidence,
                         prediction, disagreement)
