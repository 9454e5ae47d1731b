"""Ensemble reductions of members spread over ranks, from per-rank sufficient statistics of the result's size.

Each rank holds the logits ``L_r`` ``[n_r, ..., K]`` of its own members (member dim first); ``N = sum_r n_r``. No rank
sends its logits: it reduces them to statistics shaped like the result (``[..., K]``, the size of one member's
output), the ranks combine those with all-reduces, and every rank computes the result from the combination:

================== ============================================== ===================== ==============================
reduction          rank r contributes                             combined by           result
================== ============================================== ===================== ==============================
``mean``           ``S_r = sum_n L``                              sum                   ``S / N``
``softmax_of_mean`` ``S_r``                                       sum                   ``softmax(S / N)``
``mean_probs``     ``P_r = sum_n softmax(L)``                     sum                   ``P / N``
``log_mean_probs`` ``A_r = logsumexp_n log_softmax(L)``           max, giving ``M``;    ``M + log E - log N``
                                                                  then the sum ``E`` of
                                                                  ``exp(A_r - M)``
``vote``           ``C_r``: per class, the members whose argmax   sum                   one-hot of ``argmax C`` (the
                   it is                                                                lowest class on tied counts)
stats              ``[P_r, H_r, C_r]``, ``H_r`` the sum of the    sum (one all-reduce)  see ``finish_stats``
                   members' entropies
================== ============================================== ===================== ==============================

Non-finite logits follow ``fused_ensemble.REDUCTIONS``' rule: a row in which some member has no softmax (a NaN or
``+inf`` logit, or ``-inf`` in every class) is NaN on the rank that holds that member (in the vote counts as well),
and the sums carry the NaN to every rank's result; ``"mean"`` sums raw outputs element by element.

``log_mean_probs`` takes two rounds so that it stays exact: the maximum first, then sums of exponentials shifted by
it, as ``torch.logsumexp`` does over all N members at once (summing the probabilities and taking their log would
lose every log-probability below float32's smallest number, about -103). The per-rank statistics come from the
ensemble ops on the rank's members (``ensemble_reduce``, ``ensemble_stats``: the fused kernels, which never hold the
``[n_r, ..., K]`` member softmaxes) and a little torch code.

The functions are pure: ``reduce_sharded`` and ``stats_sharded`` take the all-reduce as an argument (the sharded
ensemble passes ``torch.distributed``'s), and the tests combine the statistics of simulated ranks by hand.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from fused_ensemble.ops.ensemble_reduce import ensemble_reduce, ensemble_stats
from fused_ensemble.ops.reductions import EnsembleStats, compute_dtype
from fused_ensemble.ops.reference import undefined_rows

__all__ = ["AllReduce", "ONE_ROUND", "sum_statistics", "finish_reduce", "log_probability_maxima",
           "shifted_exponential_sums", "finish_log_mean_probs", "stats_statistics", "finish_stats", "reduce_sharded",
           "stats_sharded"]

AllReduce = Callable[[Tensor, str], Tensor]
"""``all_reduce(tensor, op)``: ``tensor`` combined over the ranks with ``op``, ``"sum"`` or ``"max"``."""

ONE_ROUND = ("mean", "softmax_of_mean", "mean_probs", "vote")
"""The reductions whose statistics combine in one summing all-reduce (``log_mean_probs`` takes two rounds)."""


def vote_counts(local: Tensor) -> Tensor:
    """Per row and class, how many of the members ``local [n, ..., K]`` have that class as their argmax (first index
    on ties), in the reductions' float dtype; NaN in every class of a row where some member has no softmax."""
    counts = torch.zeros(local.shape[1:], dtype=compute_dtype(local.dtype), device=local.device)
    member_argmax = local.argmax(-1).movedim(0, -1)  # [..., n]
    counts.scatter_add_(-1, member_argmax, torch.ones(member_argmax.shape, dtype=counts.dtype, device=counts.device))
    return counts.masked_fill(undefined_rows(local, 0).unsqueeze(-1), math.nan)


def sum_statistics(local: Tensor, reduction: str) -> Tensor:
    """What a rank contributes for a reduction of ``ONE_ROUND`` (summed over the ranks): the sum over its members
    ``local [n, ..., K]`` of the logits (``"mean"``, ``"softmax_of_mean"``), of the softmaxes (``"mean_probs"``), or
    the vote counts (``"vote"``)."""
    if reduction in ("mean", "softmax_of_mean"):
        return local.sum(0, dtype=compute_dtype(local.dtype))
    if reduction == "mean_probs":
        return ensemble_reduce(local, "mean_probs") * local.shape[0]
    if reduction == "vote":
        return vote_counts(local)
    raise ValueError(f"reduction {reduction!r} does not combine in one sum; expected one of {ONE_ROUND}")


def finish_reduce(total: Tensor, reduction: str, num_members: int) -> Tensor:
    """The result of a ``ONE_ROUND`` reduction from the sum of every rank's ``sum_statistics``."""
    if reduction == "mean":
        return total / num_members
    if reduction == "softmax_of_mean":
        return torch.softmax(total / num_members, -1)
    if reduction == "mean_probs":
        return total / num_members
    if reduction == "vote":
        winner = torch.nn.functional.one_hot(total.argmax(-1), total.shape[-1]).to(total.dtype)
        return winner.masked_fill(torch.isnan(total).any(-1, keepdim=True), math.nan)
    raise ValueError(f"reduction {reduction!r} does not combine in one sum; expected one of {ONE_ROUND}")


def log_probability_maxima(local: Tensor) -> Tensor:
    """``log_mean_probs``, first round: ``logsumexp`` over the members ``local [n, ..., K]`` of their log-softmaxes
    (combined over the ranks by their maximum)."""
    return ensemble_reduce(local, "log_mean_probs") + math.log(local.shape[0])


def shifted_exponential_sums(local_maxima: Tensor, maximum: Tensor) -> Tensor:
    """``log_mean_probs``, second round: ``exp(A_r - M)`` for this rank's ``A_r`` (``log_probability_maxima``) and
    the maximum ``M`` over the ranks (summed over the ranks). Where ``M`` is ``-inf`` (no member gives the class any
    probability) the shift is 0, so that the sum is 0 rather than NaN."""
    return torch.exp(local_maxima - _finite_or_zero(maximum))


def _finite_or_zero(maximum: Tensor) -> Tensor:
    return torch.where(maximum == -math.inf, torch.zeros_like(maximum), maximum)


def finish_log_mean_probs(maximum: Tensor, exponential_sum: Tensor, num_members: int) -> Tensor:
    """``log_mean_probs`` from the maximum ``M`` and the sum ``E`` of the shifted exponentials over the ranks."""
    return _finite_or_zero(maximum) + torch.log(exponential_sum) - math.log(num_members)


def stats_statistics(local: Tensor) -> Tensor:
    """What a rank contributes to ``ensemble_stats`` (summed over the ranks): ``[..., 2K + 1]`` holding the sum over
    its members ``local [n, ..., K]`` of their softmaxes (``K``), of their entropies (1) and their vote counts
    (``K``, see ``vote_counts``)."""
    n = local.shape[0]
    stats = ensemble_stats(local)
    return torch.cat([stats.probs * n, (stats.expected_entropy * n).unsqueeze(-1), vote_counts(local)], dim=-1)


def finish_stats(total: Tensor, num_members: int) -> EnsembleStats:
    """``EnsembleStats`` from the sum of every rank's ``stats_statistics``: ``probs`` and ``expected_entropy`` are the
    sums over N; ``entropy``, ``confidence`` and ``prediction`` follow from ``probs`` as in ``ensemble_stats``;
    ``disagreement`` is ``(N - votes[prediction]) / N``, the fraction of members whose argmax is not the prediction.
    A row where some member has no softmax predicts 0 with NaN disagreement."""
    classes = (total.shape[-1] - 1) // 2
    probs = total[..., :classes] / num_members
    expected_entropy = total[..., classes] / num_members
    votes = total[..., classes + 1:]
    entropy = -torch.special.xlogy(probs, probs).sum(-1)
    confidence, prediction = probs.max(-1)
    undefined = torch.isnan(probs).any(-1) | torch.isnan(votes).any(-1)
    prediction = prediction.masked_fill(undefined, 0)
    agreeing = votes.gather(-1, prediction.unsqueeze(-1)).squeeze(-1)
    disagreement = (num_members - agreeing) / num_members
    mutual_info = (entropy - expected_entropy).clamp_min(0)  # as ensemble_stats: never below 0; NaN stays NaN
    return EnsembleStats(probs, entropy, expected_entropy, mutual_info, confidence, prediction, disagreement)


def reduce_sharded(local: Tensor, reduction: str, num_members: int, all_reduce: AllReduce) -> Tensor:
    """``reduction`` of all ``num_members`` members, from this rank's ``local [n, ..., K]`` and ``all_reduce``: one
    all-reduce of the result's size (two for ``log_mean_probs``)."""
    if reduction == "log_mean_probs":
        local_maxima = log_probability_maxima(local)
        maximum = all_reduce(local_maxima.clone(), "max")
        exponential_sum = all_reduce(shifted_exponential_sums(local_maxima, maximum), "sum")
        return finish_log_mean_probs(maximum, exponential_sum, num_members)
    return finish_reduce(all_reduce(sum_statistics(local, reduction), "sum"), reduction, num_members)


def stats_sharded(local: Tensor, num_members: int, all_reduce: AllReduce) -> EnsembleStats:
    """``ensemble_stats`` of all ``num_members`` members from this rank's ``local [n, ..., K]``: one all-reduce of
    ``[..., 2K + 1]``."""
    return finish_stats(all_reduce(stats_statistics(local), "sum"), num_members)
