"""Embedding tables of N members: one gather from the stacked ``[N, num_embeddings, dim]`` table.

Indices are checked first, as nn.Embedding checks them: indexing the stacked table would take a negative index
from the end of the member's rows, where the member raises."""

from __future__ import annotations

import torch
from torch import nn

from fused_ensemble.fusion.layout import Layout, to_member
from fused_ensemble.fusion.rules.registry import FusionContext, layer_rule


@layer_rule(nn.Embedding)
def embedding(module: nn.Embedding, indices: torch.Tensor, layout: Layout, ctx: FusionContext):
    n = ctx.num_members
    _check_indices(indices, module.num_embeddings)
    member = torch.arange(n, device=indices.device)
    if layout is Layout.SHARED:
        y = module.weight[:, indices]
        mask_indices = indices.unsqueeze(0)
    else:
        indices = to_member(indices, layout, n)
        y = module.weight[member.view(n, *([1] * (indices.dim() - 1))), indices]
        mask_indices = indices
    if module.padding_idx is not None:
        # nn.Embedding never sends gradient to its padding row.
        keep = (mask_indices != module.padding_idx).unsqueeze(-1)
        y = torch.where(keep, y, y.detach())
    return y, Layout.MEMBER


def _check_indices(indices: torch.Tensor, rows: int) -> None:
    """Raises an IndexError naming the first index outside ``[0, rows)``. On an accelerator or under
    torch.compile the check is a device-side assertion instead, as nn.Embedding's own: no host sync."""
    message = f"out of range for an embedding of {rows} rows (0 <= index < {rows})"
    if indices.device.type == "cpu" and not torch.compiler.is_compiling():
        outside = (indices < 0) | (indices >= rows)
        if outside.any():
            raise IndexError(f"index {int(indices[outside][0])} is {message}")
    else:
        torch._assert_async(((indices >= 0) & (indices < rows)).all(), f"an index is {message}")
