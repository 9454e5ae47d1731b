"""The loop helpers of fused training: N members trained at once as one ``FusedEnsemble``, and their evaluation.

Each member gets its own batch (``member_inputs=True``, ``x`` of shape ``[N, B, ...]``), the loss is the sum
of the members' mean cross-entropies (so member i's gradient is exactly its own loss's gradient), and a
``fused_ensemble.optim`` optimizer applies per-member hyperparameters: this is N independent trainings, run
as one network.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from fused_ensemble import metrics
from fused_ensemble.training.amp import MemberGradScaler
from fused_ensemble.training.batches import member_batches
from fused_ensemble.training.clip_grad import clip_grad_norm_
from fused_ensemble.training.member_values import MemberValue

if TYPE_CHECKING:
    from fused_ensemble.fused import FusedEnsemble

__all__ = ["member_cross_entropy", "train_epoch", "train_step", "member_logits", "member_probabilities", "evaluate"]


def member_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Each member's mean cross-entropy, summed over members (``reduction="sum"``: the loss whose backward is N
    independent trainings) or one per member (``"none"``: ``[N]``, what ``amp.MemberGradScaler.scale`` takes).

    ``logits [N, B, K]``; ``targets [N, B]`` (each member's own labels, as ``member_batches`` gives them) or ``[B]``
    (the same labels for every member, when all members see the same batch). Other shapes raise a ``ValueError``.
    """
    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction must be 'sum' or 'none', got {reduction!r}")
    if logits.dim() != 3:
        raise ValueError(f"logits must be [N, B, K] (members, examples, classes), got shape {tuple(logits.shape)}")
    n, b = logits.shape[:2]
    if targets.shape == (b,):
        targets = targets.expand(n, b)
    elif targets.shape != (n, b):
        raise ValueError(f"targets must be [B] = [{b}] (the same labels for every member) or [N, B] = [{n}, {b}] "
                         f"(each member's own labels) for logits of shape {tuple(logits.shape)}, got shape "
                         f"{tuple(targets.shape)}")
    per_example = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    per_member = per_example.view(n, b).mean(1)
    return per_member.sum() if reduction == "sum" else per_member


def train_epoch(fused: FusedEnsemble, optimizer, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                sampling: str = "shuffle", generator: torch.Generator | None = None, progress=None,
                clip_grad_norm: MemberValue | None = None, autocast_dtype: torch.dtype | None = None,
                scaler: MemberGradScaler | None = None) -> int:
    """One epoch: every member sees its own shuffle/bootstrap of ``(x, y)``; returns the steps taken.

    ``fused`` must have ``reduction="none"`` and ``member_inputs=True``. ``progress``: an optional tqdm bar,
    advanced once per step with the mean member loss as its postfix. ``clip_grad_norm``: clip each member's
    gradient norm to this (a number, or one per member; ``fused_ensemble.clip_grad``). ``autocast_dtype``: run the
    forward under ``torch.autocast`` in this dtype; ``scaler``: a ``MemberGradScaler`` (for float16), which then
    unscales before clipping and steps the members whose gradients are finite.
    """
    if fused.reduction != "none" or not fused.member_inputs:
        raise ValueError("train_epoch needs FusedEnsemble(..., reduction='none', member_inputs=True), got "
                         f"reduction={fused.reduction!r}, member_inputs={fused.member_inputs}")
    device = next(fused.parameters()).device
    fused.train()
    steps = 0
    for xb, yb in member_batches(x, y, fused.num_members, batch_size, sampling, generator):
        losses = train_step(fused, optimizer, xb.to(device, non_blocking=True), yb.to(device, non_blocking=True),
                            clip_grad_norm, autocast_dtype, scaler)
        steps += 1
        if progress is not None:
            progress.update(1)
            if steps % 10 == 1:  # .item() waits for the device: not every step
                progress.set_postfix(loss=f"{losses.sum().item() / fused.num_members:.3f}", refresh=False)
    return steps


def train_step(fused: FusedEnsemble, optimizer, xb: torch.Tensor, yb: torch.Tensor,
               clip_grad_norm: MemberValue | None = None, autocast_dtype: torch.dtype | None = None,
               scaler: MemberGradScaler | None = None,
               reduce_gradients: Callable[[], None] | None = None) -> torch.Tensor:
    """One step of ``train_epoch`` on every member's batch ``xb [N, B, ...]``, ``yb [N, B]`` (on the members' device);
    returns the members' losses ``[N]`` (detached). ``reduce_gradients``: called after the backward pass, before the
    gradients are unscaled, clipped or applied (a sharded ensemble averages them over its data-parallel copies)."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(xb.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = fused(xb)
    losses = member_cross_entropy(logits.float(), yb, reduction="none")
    (losses if scaler is None else scaler.scale(losses)).sum().backward()
    if reduce_gradients is not None:
        reduce_gradients()
    if clip_grad_norm is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        clip_grad_norm_(fused.parameters(), clip_grad_norm)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    return losses.detach()


@torch.no_grad()
def member_logits(fused: FusedEnsemble, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Member logits ``[N, M, K]`` (float32, on the CPU) for inputs ``x [M, ...]``, eval mode: what
    ``fused_ensemble.calibration.TemperatureScaling`` fits on."""
    device = next(fused.parameters()).device
    was_training = fused.training
    fused.eval()
    chunks = []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(device)
        logits = fused(xb.expand(fused.num_members, *xb.shape))  # every member sees the same examples
        chunks.append(logits.float().cpu())
    fused.train(was_training)
    return torch.cat(chunks, dim=1)


def member_probabilities(fused: FusedEnsemble, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Member softmax probabilities ``[N, M, K]`` (float32, on the CPU) for inputs ``x [M, ...]``, eval mode."""
    return member_logits(fused, x, batch_size).softmax(-1)


def evaluate(fused: FusedEnsemble, x: torch.Tensor, y: torch.Tensor, n_bins: int = 15,
             batch_size: int = 512) -> dict:
    """Per-member and ensemble (mean of member probabilities) accuracy, NLL, Brier and ECE on ``(x, y)``, and the
    mean over the examples of the ensemble's mutual information and of its members' pairwise disagreement."""
    member_probs = member_probabilities(fused, x, batch_size)
    ensemble_probs = member_probs.mean(0)
    y = y.cpu()
    result = {}
    for name in ("accuracy", "nll", "brier", "ece"):
        metric = getattr(metrics, name)
        kwargs = {"n_bins": n_bins} if name == "ece" else {}
        result[f"member_{name}"] = metric(member_probs, y, **kwargs).tolist()
        result[f"ensemble_{name}"] = metric(ensemble_probs, y, **kwargs).item()
        result[f"mean_member_{name}"] = sum(result[f"member_{name}"]) / fused.num_members
    result["ensemble_mutual_info"] = metrics.mutual_information(member_probs).mean().item()
    result["ensemble_pairwise_disagreement"] = metrics.pairwise_disagreement(member_probs).mean().item()
    result["_ensemble_probs"] = ensemble_probs
    return result
