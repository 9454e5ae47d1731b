"""Evaluating a sharded ensemble: ``fused_ensemble.evaluate``'s report, from statistics of each rank's members.

The per-member metrics are computed where the members are and gathered (four numbers a member). The ensemble's
metrics need the ensemble probabilities, the mutual information the mean of the member entropies, and the pairwise
disagreement how many members predict each class: each rank sums those over its members and one all-reduce of
``[M, 2K + 1]`` (M test examples) combines them. No rank sees another's member probabilities.
"""

from __future__ import annotations

import torch

from fused_ensemble import metrics
from fused_ensemble.distributed.collectives import all_reduce
from fused_ensemble.distributed.partial import vote_counts
from fused_ensemble.distributed.sharded import ShardedEnsemble
from fused_ensemble.training.loop import member_probabilities

__all__ = ["evaluate", "pairwise_disagreement_from_votes"]

MEMBER_METRICS = ("accuracy", "nll", "brier", "ece")


def pairwise_disagreement_from_votes(votes: torch.Tensor, num_members: int) -> torch.Tensor:
    """``metrics.pairwise_disagreement`` from the vote counts ``[B, K]`` of ``num_members`` members (how many predict
    each class): ``1 - sum_c C(n_c, 2) / C(N, 2)``; 0 for a single member. Float64 ``[B]``."""
    votes = votes.to(torch.float64)
    if num_members < 2:
        return torch.zeros(votes.shape[:-1], dtype=torch.float64, device=votes.device)
    agreeing_pairs = (votes * (votes - 1) / 2).sum(-1)
    return 1 - agreeing_pairs / (num_members * (num_members - 1) / 2)


def _options(metric: str, n_bins: int) -> dict:
    return {"n_bins": n_bins} if metric == "ece" else {}


@torch.no_grad()
def evaluate(sharded: ShardedEnsemble, x: torch.Tensor, y: torch.Tensor, n_bins: int = 15,
             batch_size: int = 512) -> dict:
    """``fused_ensemble.evaluate`` of all N members, on every rank: per-member and ensemble (mean of member
    probabilities) accuracy, NLL, Brier and ECE on ``(x, y)``, and the mean over the examples of the ensemble's
    mutual information and of its members' pairwise disagreement (and ``"_ensemble_probs"``, ``[M, K]``). The
    ranks along a ``"data"`` dimension each evaluate all of ``x``."""
    device = next(sharded.local.parameters()).device
    member_probs = member_probabilities(sharded.local, x, batch_size)  # [n_local, M, K], CPU
    y = y.cpu()
    n = sharded.num_members
    local_metrics = torch.stack([getattr(metrics, name)(member_probs, y, **_options(name, n_bins))
                                 for name in MEMBER_METRICS], dim=1)  # [n_local, 4], float64
    all_metrics = sharded.gather(local_metrics.to(device)).cpu()
    classes = member_probs.shape[-1]
    sums = torch.cat([member_probs.to(torch.float64).sum(0),
                      metrics.predictive_entropy(member_probs).sum(0).unsqueeze(-1),
                      vote_counts(member_probs).to(torch.float64)], dim=-1).to(device)
    sums = all_reduce(sums, "sum", sharded.member_group).cpu()
    ensemble_probs = (sums[:, :classes] / n).to(member_probs.dtype)
    mean_member_entropy = sums[:, classes] / n
    votes = sums[:, classes + 1:]
    result = {}
    for column, name in enumerate(MEMBER_METRICS):
        result[f"member_{name}"] = all_metrics[:, column].tolist()
        result[f"ensemble_{name}"] = getattr(metrics, name)(ensemble_probs, y, **_options(name, n_bins)).item()
        result[f"mean_member_{name}"] = sum(result[f"member_{name}"]) / n
    mutual_info = metrics.predictive_entropy(ensemble_probs) - mean_member_entropy
    result["ensemble_mutual_info"] = mutual_info.mean().item()
    result["ensemble_pairwise_disagreement"] = pairwise_disagreement_from_votes(votes, n).mean().item()
    result["_ensemble_probs"] = ensemble_probs
    return result
