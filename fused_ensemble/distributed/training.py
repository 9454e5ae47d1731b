"""Training a sharded ensemble: every rank trains its block of members as one process trains all of them.

Member i sees the batches it would see in one process: every rank draws all N members' data order from a generator
seeded alike (``member_index_batches``, a few bytes per example) and keeps its block's rows, and a rank of the
``"data"`` dimension keeps its share of each batch. The loss of a member involves that member alone, so no gradient
crosses the member dimension; the copies of a block along ``"data"`` average their gradients (one all-reduce of the
block's gradients per step), which equals the gradient of the whole batch's mean loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from fused_ensemble.distributed.collectives import all_reduce
from fused_ensemble.distributed.faults import FailTogether
from fused_ensemble.distributed.sharded import ShardedEnsemble
from fused_ensemble.training.amp import MemberGradScaler
from fused_ensemble.training.batches import member_index_batches
from fused_ensemble.training.loop import train_step
from fused_ensemble.training.member_values import MemberValue

__all__ = ["member_batches", "average_gradients", "train_epoch"]


def member_batches(sharded: ShardedEnsemble, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                   sampling: str = "shuffle", generator: torch.Generator | None = None,
                   drop_last: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's part of ``fused_ensemble.member_batches(x, y, N, batch_size, ...)``: its members' rows
    ``[n_local, B / D, ...]`` and, with a ``"data"`` dimension of D ranks, its D-th of each batch. ``batch_size``
    (per member, as in one process) must then be a multiple of D. Every rank must pass a generator in the same
    state: all ranks draw every member's order."""
    data_ranks, data_rank = sharded.data_ranks, sharded.data_rank
    if batch_size % data_ranks:
        raise ValueError(f"batch_size={batch_size} must be a multiple of the {data_ranks} data ranks that split it")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]}")
    block = sharded.member_indices
    share = batch_size // data_ranks
    for indices in member_index_batches(x.shape[0], sharded.num_members, batch_size, sampling, generator, drop_last):
        local = indices[block.start:block.stop, data_rank * share:(data_rank + 1) * share]
        yield x[local], y[local]


@torch.no_grad()
def average_gradients(sharded: ShardedEnsemble) -> None:
    """Averages the local members' gradients over the mesh's ``"data"`` dimension (one all-reduce of every gradient,
    flattened into one buffer); nothing without one."""
    if sharded.data_group is None or sharded.data_ranks == 1:
        return
    grads = [p.grad for p in sharded.local.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce(flat, "sum", sharded.data_group)
    flat /= sharded.data_ranks
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def train_epoch(sharded: ShardedEnsemble, optimizer, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                sampling: str = "shuffle", generator: torch.Generator | None = None, progress=None,
                clip_grad_norm: MemberValue | None = None, autocast_dtype: torch.dtype | None = None,
                scaler: MemberGradScaler | None = None, fail_together: FailTogether | None = None) -> int:
    """One epoch of ``fused_ensemble.train_epoch`` for this rank's members: the same batches per member (see
    ``member_batches``), the same steps, gradients averaged over ``"data"``. ``optimizer`` and ``scaler`` hold this
    rank's members (``sharded.optimizer(...)``, ``MemberGradScaler(len(sharded.member_indices))``);
    ``clip_grad_norm`` is a number or this rank's values (``sharded.local_values``). ``fail_together``: checked at
    every step boundary, so that a rank that fails stops the others within a step. Returns the steps taken.

    ``sharded`` needs ``member_inputs=True``; its members train on their own losses (``reduction`` is not used)."""
    if not sharded.member_inputs:
        raise ValueError("train_epoch needs ShardedEnsemble(..., member_inputs=True): every member trains on its own "
                         "batches")
    device = next(sharded.local.parameters()).device
    sharded.train()
    steps = 0
    for xb, yb in member_batches(sharded, x, y, batch_size, sampling, generator):
        with fail_together if fail_together is not None else contextlib.nullcontext():
            losses = train_step(sharded.local, optimizer, xb.to(device, non_blocking=True),
                                yb.to(device, non_blocking=True), clip_grad_norm, autocast_dtype, scaler,
                                reduce_gradients=lambda: average_gradients(sharded))
        steps += 1
        if progress is not None:
            progress.update(1)
            if steps % 10 == 1:
                progress.set_postfix(loss=f"{losses.mean().item():.3f}", refresh=False)
    return steps

