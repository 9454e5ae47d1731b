"""How an activation of N members is laid out in one tensor, and the (mostly free) conversions between layouts.

A member computes a tensor of shape ``[B, C, *rest]``. The fused network holds the same value for all N members in
one of three layouts:

- ``SHARED``: ``[B, C, *rest]``, one tensor that every member sees (the input, when it is shared, and anything
  computed from it without parameters).
- ``MEMBER``: ``[N, B, C, *rest]``, the member index first (vmap style). Batched matmuls and every generic op
  run in this layout.
- ``CHANNEL``: ``[B, N * C, *rest]``, the members' channels side by side (HFTA style). Grouped convolutions,
  BatchNorm over N * C channels, pooling and elementwise ops run in this layout without copies.

CHANNEL -> MEMBER is a view; MEMBER -> CHANNEL is a view when the tensor came from CHANNEL and a copy otherwise;
SHARED -> MEMBER is a zero-stride expand.
"""

from __future__ import annotations

import enum
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten


class Layout(enum.Enum):
    SHARED = "shared"
    MEMBER = "member"
    CHANNEL = "channel"


def to_member(x: torch.Tensor, layout: Layout, num_members: int) -> torch.Tensor:
    """Returns ``x`` as ``[N, B, C, *rest]`` (a view, or an expand for SHARED)."""
    if layout is Layout.MEMBER:
        return x
    if layout is Layout.SHARED:
        return x.unsqueeze(0).expand(num_members, *x.shape)
    if x.dim() < 2:
        raise ValueError(f"a channel-packed tensor needs a batch and a channel dim, got shape {tuple(x.shape)}")
    batch, packed = x.shape[0], x.shape[1]
    return x.view(batch, num_members, packed // num_members, *x.shape[2:]).movedim(1, 0)


def to_member_tree(values: Any, layouts: Any, num_members: int) -> Any:
    """``values`` (any nesting of tensors and other leaves) with every tensor as ``[N, B, ...]``: ``layouts`` is
    either one Layout for all of them (a step's output) or a structure mirroring ``values`` leaf for leaf."""
    if isinstance(layouts, Layout):
        return tree_map(lambda v: to_member(v, layouts, num_members) if isinstance(v, torch.Tensor) else v, values)
    leaves, spec = tree_flatten(values)
    leaf_layouts, _ = tree_flatten(layouts)
    return tree_unflatten([to_member(leaf, layout, num_members) if isinstance(layout, Layout) else leaf
                           for leaf, layout in zip(leaves, leaf_layouts)], spec)


def to_channel(x: torch.Tensor, layout: Layout, num_members: int) -> torch.Tensor:
    """Returns ``x`` as ``[B, N * C, *rest]`` (a copy unless the memory is already in that order)."""
    if layout is Layout.CHANNEL:
        return x
    member = to_member(x, layout, num_members)
    if member.dim() < 3:
        raise ValueError(f"a member tensor needs a batch and a channel dim to be channel-packed, got member shape "
                         f"{tuple(member.shape[1:])}")
    # The packed size written out: with an empty batch, -1 would be ambiguous.
    return member.movedim(0, 1).reshape(member.shape[1], member.shape[0] * member.shape[2], *member.shape[3:])


def convert(x: torch.Tensor, source: Layout, target: Layout, num_members: int) -> torch.Tensor:
    if source is target:
        return x
    if target is Layout.MEMBER:
        return to_member(x, source, num_members)
    if target is Layout.CHANNEL:
        return to_channel(x, source, num_members)
    raise ValueError(f"cannot convert a {source.value} tensor to a shared one: members' values may differ")
