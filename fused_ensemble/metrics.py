"""Classification, calibration and uncertainty metrics for ensembles.

Every metric takes probabilities ``probs`` of shape ``[..., B, K]`` (B examples, K classes) and integer
``targets`` of shape ``[B]`` (or ``[..., B]``) and returns a tensor of shape ``[...]``: pass ensemble
probabilities ``[B, K]`` for one number, member probabilities ``[N, B, K]`` for one number per member.
Math runs in float64 (float32 inputs are upcast) so results do not depend on summation order at fp32.

Calibration (``ece``, ``reliability_diagram``) bins the confidence (the max probability) into ``n_bins``
equal-width bins over (0, 1] (15 by default): bin b holds the confidences c with ``b / n_bins < c <= (b + 1) /
n_bins``, so a confidence on a boundary falls in the bin below it (the one it closes) and a confidence of 1 in the
last bin. The edges are ``torch.linspace(0, 1, n_bins + 1)`` in float64, compared with the float64 confidence: a
float32 confidence near an edge counts by its float32 value (float32 0.2 is a little above float64 0.2).

Disagreement between members: ``pairwise_disagreement`` is the fraction of member pairs whose predictions differ;
``fused_ensemble.ensemble_stats`` gives the variation-ratio style ``disagreement``, the fraction of members whose
prediction differs from the ensemble's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["accuracy", "nll", "brier", "ece", "reliability_diagram", "ReliabilityDiagram", "predictive_entropy",
           "mutual_information", "pairwise_disagreement", "auroc", "ood_auroc"]


def _check(probs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(probs, torch.Tensor) or not probs.is_floating_point() or probs.dim() < 2:
        raise TypeError("probs must be a floating-point tensor of shape [..., B, K]")
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32, torch.uint8):
        raise TypeError("targets must be an integer tensor of class indices, shape [B]")
    if targets.shape != probs.shape[-targets.dim() - 1:-1]:
        raise ValueError(f"targets of shape {tuple(targets.shape)} do not match probs of shape "
                         f"{tuple(probs.shape)} (expected [..., B] against [..., B, K])")
    if probs.shape[-2] == 0:
        raise ValueError("metrics need at least one example (B = 0)")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= probs.shape[-1]):
        raise ValueError(f"targets must lie in [0, {probs.shape[-1] - 1}] (K = {probs.shape[-1]} classes)")
    targets = targets.long().expand(probs.shape[:-1])
    return probs.to(torch.float64), targets


def accuracy(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Fraction of examples whose argmax class (first index on ties) is the target."""
    probs, targets = _check(probs, targets)
    return (probs.argmax(-1) == targets).to(torch.float64).mean(-1)


def nll(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood ``-log p[target]`` (nats).

    A target probability of exactly 0 is clamped to the smallest normal float of the input dtype (fp32:
    NLL 87.3), so one overconfident mistake gives a large, finite number rather than inf.
    """
    tiny = torch.finfo(probs.dtype).tiny if isinstance(probs, torch.Tensor) and probs.is_floating_point() else 0
    probs, targets = _check(probs, targets)
    target_probs = probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return -target_probs.clamp_min(tiny).log().mean(-1)


def brier(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Multi-class Brier score: mean over examples of ``sum_k (p_k - onehot_k)^2`` (0 is perfect, 2 worst)."""
    probs, targets = _check(probs, targets)
    onehot = torch.nn.functional.one_hot(targets, probs.shape[-1]).to(probs.dtype)
    return (probs - onehot).square().sum(-1).mean(-1)


class ReliabilityDiagram(NamedTuple):
    """Equal-width confidence bins: bin b holds confidences in ``(edges[b], edges[b + 1]]`` (a confidence on an
    edge belongs to the bin below it; a confidence of exactly 0, impossible for a max probability, to bin 0).

    ``confidence``/``accuracy``: mean confidence and accuracy of the examples in each bin (0 for empty bins);
    ``count``: examples per bin; all of shape ``[..., n_bins]``.
    """

    edges: torch.Tensor
    confidence: torch.Tensor
    accuracy: torch.Tensor
    count: torch.Tensor


def reliability_diagram(probs: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> ReliabilityDiagram:
    """Bins the examples by confidence (max probability) into ``n_bins`` equal-width bins over (0, 1]: bin b holds
    ``edges[b] < confidence <= edges[b + 1]`` (see the module doc for the boundaries)."""
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    probs, targets = _check(probs, targets)
    confidence, prediction = probs.max(-1)
    correct = (prediction == targets).to(torch.float64)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64, device=probs.device)
    # right=False: index b with edges[b] < c <= edges[b + 1]; a confidence of exactly 0 goes to bin 0.
    bins = torch.bucketize(confidence, edges[1:-1], right=False)
    shape = (*confidence.shape[:-1], n_bins)
    ones = torch.ones_like(correct)
    count = torch.zeros(shape, dtype=torch.float64, device=probs.device).scatter_add_(-1, bins, ones)
    conf_sum = torch.zeros(shape, dtype=torch.float64, device=probs.device).scatter_add_(-1, bins, confidence)
    correct_sum = torch.zeros(shape, dtype=torch.float64, device=probs.device).scatter_add_(-1, bins, correct)
    safe = count.clamp_min(1)
    return ReliabilityDiagram(edges, conf_sum / safe, correct_sum / safe, count.long())


def ece(probs: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> torch.Tensor:
    """Expected calibration error: ``sum_b |B_b| / B * |accuracy_b - confidence_b|`` over ``n_bins`` (default 15)
    equal-width confidence bins over (0, 1], bin b holding the confidences c with ``b / n_bins < c <= (b + 1) /
    n_bins``: a confidence on a boundary counts in the bin below it, a confidence of 1 in the last bin."""
    diagram = reliability_diagram(probs, targets, n_bins)
    weight = diagram.count.to(torch.float64) / diagram.count.sum(-1, keepdim=True)
    return (weight * (diagram.accuracy - diagram.confidence).abs()).sum(-1)


def predictive_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy ``-sum_k p_k log p_k`` (nats) of ``probs [..., K]``, with ``0 log 0 = 0``; shape ``[...]``."""
    probs = probs.to(torch.float64)
    return -torch.special.xlogy(probs, probs).sum(-1)


def mutual_information(member_probs: torch.Tensor) -> torch.Tensor:
    """Mutual information between prediction and member (epistemic uncertainty) of ``[N, B, K]`` member
    probabilities: entropy of the mean minus the mean of member entropies; shape ``[B]``."""
    if member_probs.dim() < 3:
        raise ValueError(f"member_probs must be [N, B, K], got shape {tuple(member_probs.shape)}")
    return predictive_entropy(member_probs.mean(0)) - predictive_entropy(member_probs).mean(0)


def pairwise_disagreement(member_probs: torch.Tensor) -> torch.Tensor:
    """Pairwise disagreement of the members' predictions, per example: the fraction of the N(N-1)/2 member pairs
    whose argmax classes (first index on ties) differ, ``1 - sum_c C(n_c, 2) / C(N, 2)`` with n_c the number of
    members that predict class c; 0 for a single member. ``member_probs``: ``[N, B, K]`` member probabilities (or
    logits: only the argmax counts); returns ``[B]``, float64.

    ``ensemble_stats(...).disagreement`` is the variation ratio instead: the fraction of members whose prediction
    differs from the ensemble's. Two members out of four predicting class a and two class b give 2/3 here (4 of
    the 6 pairs differ) and 1/2 there.
    """
    if not isinstance(member_probs, torch.Tensor) or member_probs.dim() != 3:
        shape = tuple(member_probs.shape) if isinstance(member_probs, torch.Tensor) else type(member_probs).__name__
        raise ValueError(f"member_probs must be [N, B, K] (members, examples, classes), got {shape}")
    n, _, k = member_probs.shape
    if n < 2:
        return torch.zeros(member_probs.shape[1], dtype=torch.float64, device=member_probs.device)
    counts = torch.nn.functional.one_hot(member_probs.argmax(-1), k).sum(0).to(torch.float64)  # [B, K]
    agreeing_pairs = (counts * (counts - 1) / 2).sum(-1)
    return 1 - agreeing_pairs / (n * (n - 1) / 2)


def auroc(scores_in: torch.Tensor, scores_out: torch.Tensor) -> float:
    """Area under the ROC curve for telling out-of-distribution examples (``scores_out``, the positives) from
    in-distribution ones by a higher score: the probability that a random OOD example scores higher than a
    random in-distribution one, ties counting one half (Mann-Whitney U from average ranks)."""
    scores_in = scores_in.detach().flatten().to(torch.float64)
    scores_out = scores_out.detach().flatten().to(torch.float64)
    n_in, n_out = scores_in.numel(), scores_out.numel()
    if n_in == 0 or n_out == 0:
        raise ValueError("auroc needs at least one in-distribution and one out-of-distribution score")
    scores = torch.cat([scores_in, scores_out])
    if not torch.isfinite(scores).all():
        raise ValueError("auroc scores must be finite")
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    # Average rank of each distinct value (1-based): the ranks of a run of ties are averaged.
    ends = counts.cumsum(0).to(torch.float64)
    average_rank = ends - (counts.to(torch.float64) - 1) / 2
    rank_sum_out = average_rank[inverse[n_in:]].sum()
    u = rank_sum_out - n_out * (n_out + 1) / 2
    return float(u / (n_in * n_out))


def ood_auroc(member_probs_in: torch.Tensor, member_probs_out: torch.Tensor, score: str = "mutual_info") -> float:
    """AUROC of detecting OOD inputs by an ensemble uncertainty score.

    ``member_probs_*``: member probabilities ``[N, B, K]`` on in-distribution and OOD inputs. ``score``:
    ``"mutual_info"`` (epistemic: members disagree) or ``"entropy"`` (predictive entropy of the mean).
    """
    scorers = {"mutual_info": mutual_information, "entropy": lambda p: predictive_entropy(p.mean(0))}
    if score not in scorers:
        raise ValueError(f"unknown score {score!r}; expected one of {', '.join(map(repr, scorers))}")
    return auroc(scorers[score](member_probs_in), scorers[score](member_probs_out))
