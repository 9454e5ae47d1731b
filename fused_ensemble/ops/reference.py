"""Pure-PyTorch ensemble reductions: the CPU fallback, the test oracle and the benchmark baseline.

Written once: the ``"torch"`` backend of ``ensemble_reduce``, ``ensemble_stats`` and ``ensemble_linear_reduce``
runs these functions, the tests compare every kernel with them (in float64), and the benchmarks time them.
"""

from __future__ import annotations

import math

import torch

from fused_ensemble.ops.reductions import EnsembleStats, check_reduction, compute_dtype, normalize_member_dim


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
    if reduction == "vote":
        return vote_reference(x.detach(), dim)
    return torch.logsumexp(torch.log_softmax(x, -1), dim) - math.log(x.shape[dim])


def undefined_rows(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The rows of logits ``x`` (member dim ``dim``, class dim last; shape ``x.shape`` without both) in which some
    member has no softmax: its logits hold a NaN or a ``+inf``, or are ``-inf`` in every class."""
    no_softmax = (torch.isnan(x) | (x == math.inf)).any(-1) | (x == -math.inf).all(-1)
    return no_softmax.any(dim)


def vote_reference(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Hard vote: the one-hot of the class most members pick as their argmax (first index on ties; the lowest
    class on tied counts), NaN in the rows that ``undefined_rows`` names; ``x``'s dtype, never requiring grad."""
    classes = x.shape[-1]
    votes = torch.nn.functional.one_hot(x.argmax(-1), classes).sum(dim)
    winner = votes.argmax(-1)  # torch.argmax takes the first of equal maxima: the lowest class
    one_hot = torch.nn.functional.one_hot(winner, classes).to(x.dtype)
    return one_hot.masked_fill(undefined_rows(x, dim).unsqueeze(-1), math.nan)


def stats_reference(logits: torch.Tensor, dim: int = 0) -> EnsembleStats:
    """Reference for ``ensemble_stats`` (materializes the member softmaxes; the kernels do not). Rows in which some
    member has no softmax are NaN in every float field and predict 0 (see ``EnsembleStats``)."""
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
    undefined = undefined_rows(x, dim)
    nan = torch.tensor(math.nan, dtype=x.dtype, device=x.device)
    probs = torch.where(undefined.unsqueeze(-1), nan, probs)
    entropy, expected_entropy, confidence, disagreement = (
        torch.where(undefined, nan, t) for t in (entropy, expected_entropy, confidence, disagreement))
    prediction = prediction.masked_fill(undefined, 0)
    mutual_info = (entropy - expected_entropy).clamp_min(0)  # clamp_min keeps NaN
    return EnsembleStats(probs, entropy, expected_entropy, mutual_info, confidence, prediction, disagreement)


def member_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """The members' Linear outputs for ``ensemble_linear_reduce`` and their member dim: ``x [B, F]`` (shared) gives
    ``[B, N, K]`` from one dense GEMM (member dim 1), ``x [N, B, F]`` gives ``[N, B, K]`` from a batched one (member
    dim 0). Computed in float32 (float64 stays float64), so that fp16/bf16 logits are not rounded before the
    softmax."""
    compute = compute_dtype(weight.dtype)
    x, weight = x.to(compute), weight.to(compute)
    bias = None if bias is None else bias.to(compute)
    members, classes, features = weight.shape
    if x.dim() == 2:
        flat_weight = weight.reshape(members * classes, features).t()
        logits = x @ flat_weight if bias is None else torch.addmm(bias.reshape(members * classes), x, flat_weight)
        return logits.view(x.shape[0], members, classes), 1
    weight_t = weight.transpose(1, 2)
    logits = torch.bmm(x, weight_t) if bias is None else torch.baddbmm(bias.unsqueeze(1), x, weight_t)
    return logits, 0


def linear_reduce_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            reduction: str = "mean_probs") -> torch.Tensor:
    """Reference for ``ensemble_linear_reduce``: the member logits (one GEMM), then ``reduce_reference``."""
    logits, member_dim = member_logits(x, weight, bias)
    return reduce_reference(logits, reduction, dim=member_dim)
