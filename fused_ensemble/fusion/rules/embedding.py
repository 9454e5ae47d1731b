"""Embedding tables of N members: one gather from the stacked ``[N, num_embeddings, dim]`` table."""

from __future__ import annotations

import torch
from torch import nn

from fused_ensemble.fusion.layout import Layout, to_member
from fused_ensemble.fusion.rules.registry import FusionContext, layer_rule


@layer_rule(nn.Embedding)
def embedding(module: nn.Embedding, indices: torch.Tensor, layout: Layout, ctx: FusionContext):
    n = ctx.num_members
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
