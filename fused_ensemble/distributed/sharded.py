"""ShardedEnsemble: the members of one ensemble spread over processes, each process running its block as one fused
network, and the ensemble's reductions combined from per-rank statistics of the result's size."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.utils._pytree import tree_map

from fused_ensemble.distributed.collectives import all_gather, all_reduce
from fused_ensemble.distributed.mesh import member_blocks, member_mesh, mesh_groups
from fused_ensemble.distributed.partial import reduce_sharded, stats_sharded
from fused_ensemble.fused import FusedEnsemble
from fused_ensemble.fusion.inputs import SharedInput
from fused_ensemble.ops.reductions import EnsembleStats, check_reduction
from fused_ensemble.training.member_values import MemberValue, per_member

__all__ = ["ShardedEnsemble"]


class ShardedEnsemble(nn.Module):
    """An ensemble of ``num_members`` members of one architecture whose members are split over the ranks of a mesh's
    ``"member"`` dimension: each rank builds, holds and runs only its own contiguous block of members, as one
    ``FusedEnsemble`` (``.local``), and the ensemble's reduction combines the blocks without gathering their logits.

    Args:
        build_member: ``build_member(index)`` returns member ``index`` (0 to N - 1) as an ``nn.Module``. It is called
            for this rank's members only; a member's initialization should depend on its index alone (seed by the
            index), so that every layout of ranks builds the same members.
        num_members: N, the ensemble's size. The member ranks hold blocks of ``N // ranks`` or one more members
            (``member_blocks``): 5 members over 2 ranks are 0-2 and 3-4.
        mesh: a ``DeviceMesh`` with a ``"member"`` dimension and optionally a ``"data"`` one (``member_mesh``); the
            ranks along ``"data"`` hold copies of the same block and split its batches. Default: every process of
            the default group along ``"member"``.
        reduction: as ``FusedEnsemble``'s: ``"none"`` (every member's output, all-gathered) or one of
            ``fused_ensemble.REDUCTIONS``: ``"mean"``, ``"mean_probs"``, ``"softmax_of_mean"``,
            ``"log_mean_probs"``, ``"vote"`` (the vote counts are all-reduced; ties go to the lowest class), with the
            same rule for non-finite logits. ``stats()`` gives ``ensemble_stats``.
        member_inputs: as ``FusedEnsemble``'s: if True the inputs are ``[N, B, ...]`` (every member's own batch: this
            rank reads its block's rows) or already this rank's ``[n_local, B, ...]``; an input wrapped in
            ``fused_ensemble.shared(...)`` is every member's, whole.

    The forward runs the local members and returns the whole ensemble's result on every rank of the member
    dimension, equal (to float32 rounding; ``"vote"`` and ``"none"`` exactly) to one process's ``FusedEnsemble`` of
    all N members. Each rank reduces its members' outputs to statistics of the result's size, ``[B, K]``, that one
    all-reduce combines (two for ``"log_mean_probs"``; ``fused_ensemble.distributed.partial`` says how for each
    reduction). Only ``"none"`` gathers member outputs. The ranks along ``"data"`` each reduce their own inputs.

    The forward and ``stats()`` run without autograd (their results never require grad): train the members on
    their own losses through ``member_outputs`` (see ``fused_ensemble.distributed.train_epoch``), as independent
    deep-ensemble members are trained. No gradient crosses the member dimension.
    """

    def __init__(self, build_member: Callable[[int], nn.Module], num_members: int, mesh: DeviceMesh | None = None,
                 reduction: str = "mean_probs", member_inputs: bool = False):
        super().__init__()
        if reduction != "none":
            check_reduction(reduction)
        if not callable(build_member):
            raise TypeError(f"build_member must be a function of the member index, got {type(build_member).__name__}")
        self.mesh = member_mesh() if mesh is None else mesh
        groups = mesh_groups(self.mesh)
        self.member_group = groups["member"]
        self.data_group = groups.get("data")
        blocks = member_blocks(num_members, self.mesh.size(self.mesh.mesh_dim_names.index("member")))
        self.blocks = blocks
        self.member_indices = blocks[self.mesh.get_local_rank("member")]
        self.num_members = num_members
        self.reduction = reduction
        self.member_inputs = member_inputs
        members = []
        for index in self.member_indices:
            member = build_member(index)
            if not isinstance(member, nn.Module):
                raise TypeError(f"build_member({index}) returned a {type(member).__name__}, not an nn.Module")
            members.append(member)
        self.local = FusedEnsemble(members, reduction="none", member_inputs=member_inputs)

    @property
    def data_ranks(self) -> int:
        """How many ranks hold copies of this block (the size of the mesh's ``"data"`` dimension, else 1)."""
        return 1 if self.data_group is None else self.mesh.size(self.mesh.mesh_dim_names.index("data"))

    @property
    def data_rank(self) -> int:
        """This rank's index along the ``"data"`` dimension (0 without one)."""
        return 0 if self.data_group is None else self.mesh.get_local_rank("data")

    def extra_repr(self) -> str:
        first, last = self.member_indices[0], self.member_indices[-1]
        return (f"num_members={self.num_members}, local members {first}-{last}, reduction={self.reduction!r}, "
                f"member_inputs={self.member_inputs}, mesh={tuple(self.mesh.mesh.shape)}")

    # -- the members' inputs and outputs ------------------------------------------------------------------------------
    def _local_inputs(self, inputs: tuple, keyword_inputs: dict) -> tuple[tuple, dict]:
        if not self.member_inputs:
            return inputs, keyword_inputs
        block = self.member_indices
        local_count = len(block)

        def local_tensor(name, x):
            if not isinstance(x, torch.Tensor):
                return x
            if x.dim() > 0 and x.shape[0] == self.num_members:
                return x[block.start:block.stop]
            if x.dim() > 0 and x.shape[0] == local_count:
                return x
            raise ValueError(f"member_inputs=True expects input {name} of shape [N, B, ...] with N={self.num_members} "
                             f"members, or this rank's [{local_count}, B, ...] (members {block.start}-{block.stop - 1})"
                             f", got {tuple(x.shape)}; pass an input that every member sees whole as "
                             f"fused_ensemble.shared(value)")

        def local(name, x):
            if isinstance(x, SharedInput):
                return x  # every member's, whole: the local ensemble passes it on as it is
            # Every tensor of a tuple, list or dict input is per member, as FusedEnsemble reads it.
            return tree_map(lambda leaf: local_tensor(name, leaf), x)

        return (tuple(local(repr(i), x) for i, x in enumerate(inputs)),
                {name: local(name, x) for name, x in keyword_inputs.items()})

    def member_outputs(self, *inputs, **keyword_inputs) -> torch.Tensor:
        """This rank's members' outputs ``[n_local, B, ...]`` (differentiable): what they train on."""
        inputs, keyword_inputs = self._local_inputs(inputs, keyword_inputs)
        return self.local(*inputs, **keyword_inputs)

    def _all_reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        return all_reduce(tensor, op, self.member_group)

    @torch.no_grad()
    def forward(self, *inputs, **keyword_inputs) -> torch.Tensor:
        """The ensemble's ``reduction`` of all N members' outputs on ``inputs`` (see the class doc)."""
        outputs = self.member_outputs(*inputs, **keyword_inputs)
        if not isinstance(outputs, torch.Tensor):
            raise TypeError(f"a sharded ensemble needs the members to return one tensor, got {type(outputs).__name__}")
        if self.reduction == "none":
            return self.gather(outputs)
        if self.reduction == "mean" and outputs.dim() == 1:  # one number per member
            return reduce_sharded(outputs.unsqueeze(-1), "mean", self.num_members, self._all_reduce).squeeze(-1)
        return reduce_sharded(outputs, self.reduction, self.num_members, self._all_reduce)

    @torch.no_grad()
    def stats(self, *inputs, **keyword_inputs) -> EnsembleStats:
        """``ensemble_stats`` of all N members' logits on ``inputs`` (class dim last), on every rank: one all-reduce
        of ``[B, 2K + 1]`` (the sums of the member softmaxes and entropies, and the vote counts)."""
        outputs = self.member_outputs(*inputs, **keyword_inputs)
        return stats_sharded(outputs, self.num_members, self._all_reduce)

    def gather(self, local_outputs: torch.Tensor) -> torch.Tensor:
        """Every member's output ``[N, ...]`` from each rank's ``[n_local, ...]`` (one all-gather; the blocks are
        padded to the largest one's size)."""
        largest = max(len(block) for block in self.blocks)
        padded = local_outputs.new_zeros((largest, *local_outputs.shape[1:]))
        padded[:local_outputs.shape[0]] = local_outputs
        gathered = all_gather(padded, self.member_group)
        return torch.cat([part[:len(block)] for part, block in zip(gathered, self.blocks)])

    # -- per-member values ------------------------------------------------------------------------------------------
    def local_values(self, value: MemberValue, name: str = "value") -> MemberValue:
        """A per-member hyperparameter given for all N members, for this rank's members: a number stays a number; a
        length-N sequence or 1-D tensor becomes the list of this rank's entries."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        if isinstance(value, torch.Tensor) and value.dim() == 0:
            return value.item()
        values = per_member(value, name, self.num_members)
        return values[self.member_indices.start:self.member_indices.stop]

    def optimizer(self, optimizer_class: type, **hyperparameters) -> torch.optim.Optimizer:
        """``optimizer_class`` (``fused_ensemble.optim.SGD``, ``Adam``, ``AdamW``) over this rank's members, each
        per-member hyperparameter given for all N members (a number, or N values) and sliced to this rank's block;
        ``betas`` may be a pair of such values."""
        member_keys = getattr(optimizer_class, "member_keys", ())
        local = {}
        for key, value in hyperparameters.items():
            if key == "betas":
                local[key] = tuple(self.local_values(beta, f"betas[{i}]") for i, beta in enumerate(value))
            elif key in member_keys:
                local[key] = self.local_values(value, key)
            else:
                local[key] = value
        return optimizer_class(self.local.parameters(), **local)
