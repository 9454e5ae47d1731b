"""Out-of-distribution and selective-prediction scores of an ensemble, from its member logits.

Every score is oriented the same way: **higher means more uncertain** (more likely out of distribution, more likely
a wrong prediction), so each can go straight into ``metrics.auroc``, ``metrics.aupr``, ``metrics.fpr_at_95_tpr``
(out-of-distribution examples are the positives) or ``metrics.aurc`` (as ``uncertainty``).

- ``neg_max_prob``: ``-max_k p_k`` of the ensemble's mean probabilities ``p`` (the maximum softmax probability
  baseline of Hendrycks & Gimpel, 2017, negated).
- ``energy``: ``-logsumexp_k(mean_n logits_n)``, the free energy (Liu et al., 2020, temperature 1) of the
  member-averaged logits: the logits are averaged, not the probabilities, and the energy sees their scale, which
  softmax forgets.
- ``entropy``: predictive entropy of ``p`` (nats): total uncertainty.
- ``mutual_info``: predictive entropy minus the mean of the member entropies (nats): the members' disagreement,
  epistemic uncertainty (Depeweg et al., 2018).
- ``variation_ratio``: ``1 - (number of members voting for the modal class) / N``, each member voting for its own
  argmax (Freeman, 1965). The modal class is the most voted one (the class ``ensemble_reduce(logits, "vote")``
  picks), which need not be the ensemble's prediction; a tie for the mode counts once.
  ``ensemble_stats(...).disagreement`` counts the members that differ from the ensemble's prediction (the argmax
  of the mean probabilities) instead, as torch-uncertainty's ``VariationRatio(probabilistic=False)`` does; it is
  never below this score, and equal to it wherever the modal class is the ensemble's prediction.

``neg_max_prob``, ``entropy`` and ``mutual_info`` come from one ``ensemble_stats`` pass; the energy needs the mean
logits (one ``ensemble_reduce(logits, "mean")`` pass), the variation ratio the members' argmaxes (one pass).

Non-finite logits follow the rule of the reductions: ``-inf`` is a probability of 0, and a row in which some
member's logits hold a NaN or a ``+inf``, or are ``-inf`` in every class, is NaN in every score (such a member has
no softmax, hence no prediction to vote with and no energy that means anything). Metrics refuse NaN scores, so
drop those rows first (``scores.entropy.isnan()`` finds them).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from fused_ensemble.ops.ensemble_reduce import ensemble_reduce, ensemble_stats
from fused_ensemble.ops.reductions import normalize_member_dim
from fused_ensemble.ops.reference import undefined_rows

__all__ = ["SCORES", "UncertaintyScores", "uncertainty_scores", "variation_ratio"]

SCORES = ("neg_max_prob", "energy", "entropy", "mutual_info", "variation_ratio")
"""The score names, in the order of ``UncertaintyScores``'s fields."""


class UncertaintyScores(NamedTuple):
    """Per-row uncertainty scores of an ensemble (``logits.shape`` without the member and class dims), each higher
    for more uncertain rows; float32 (float64 for float64 logits). See the module doc for the definitions."""

    neg_max_prob: Tensor
    energy: Tensor
    entropy: Tensor
    mutual_info: Tensor
    variation_ratio: Tensor


def variation_ratio(logits: Tensor, dim: int = 0) -> Tensor:
    """``1 - (members voting for the modal class) / N`` per row of member logits (or probabilities: only each
    member's argmax counts) with the member dim ``dim`` and the class dim last; float32 (float64 for float64). NaN
    in a row in which some member has no softmax (NaN or ``+inf`` logits, or ``-inf`` in every class)."""
    dim = normalize_member_dim(logits, dim)
    votes = logits.argmax(-1).movedim(dim, -1)  # [..., N]: each member's class
    members, classes = votes.shape[-1], logits.shape[-1]
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    counts = torch.zeros((*votes.shape[:-1], classes), dtype=dtype, device=logits.device)
    counts.scatter_add_(-1, votes, torch.ones(votes.shape, dtype=dtype, device=logits.device))
    return (1 - counts.amax(-1) / members).masked_fill(undefined_rows(logits, dim), math.nan)


def uncertainty_scores(logits: Tensor, dim: int = 0, backend: str = "auto") -> UncertaintyScores:
    """The ensemble's uncertainty scores from its member logits (member dim ``dim``, class dim last), each higher
    for more uncertain rows: ``neg_max_prob``, ``energy`` (of the mean logits), ``entropy``, ``mutual_info`` and
    ``variation_ratio``, as defined in the module doc. ``backend``: as for ``ensemble_stats``.

    Example::

        >>> scores = uncertainty_scores(member_logits)                 # [N, B, K] -> five [B] tensors
        >>> metrics.auroc(scores_in.mutual_info, scores_out.mutual_info)
    """
    dim = normalize_member_dim(logits, dim)
    stats = ensemble_stats(logits, dim, backend)
    mean_logits = ensemble_reduce(logits, "mean", dim, backend)
    # "mean" averages element by element; the other scores are NaN where a member has no softmax, and so is this.
    energy = (-torch.logsumexp(mean_logits, -1)).masked_fill(undefined_rows(logits, dim), math.nan)
    return UncertaintyScores(neg_max_prob=-stats.confidence, energy=energy,
                             entropy=stats.entropy, mutual_info=stats.mutual_info,
                             variation_ratio=variation_ratio(logits, dim))
