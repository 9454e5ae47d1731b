"""Linear layers of N members as batched matmuls (one dense GEMM against all members' weights for a shared
input)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fused_ensemble.fusion.layout import Layout, to_member
from fused_ensemble.fusion.rules.registry import FusionContext, layer_rule, member_shape


@layer_rule(nn.Linear)
def linear(module: nn.Linear, x: torch.Tensor, layout: Layout, ctx: FusionContext):
    shape = member_shape(x, layout, ctx.num_members)
    if not shape or shape[-1] != module.in_features:
        raise ValueError(f"expected input with {module.in_features} features (last dim) per member, got "
                         f"{shape[-1] if shape else 'a 0-dim input'}")
    return member_linear(x, layout, module.weight, module.bias, ctx.num_members), Layout.MEMBER


def member_linear(x: torch.Tensor, layout: Layout, weight: torch.Tensor, bias: torch.Tensor | None,
                  n: int) -> torch.Tensor:
    """Each member's ``F.linear(x_i, weight[i], bias[i])`` (``weight [N, out, in]``, ``bias [N, out]``), member-first:
    ``[N, *batch, out]``."""
    out_features, in_features = weight.shape[1:]
    if layout is Layout.SHARED:
        # One GEMM against all members' weights side by side, then split the features per member (a view).
        y = F.linear(x, weight.flatten(0, 1), bias.flatten() if bias is not None else None)
        return y.unflatten(-1, (n, out_features)).movedim(-2, 0)
    x = to_member(x, layout, n)
    batch_shape = x.shape[1:-1]
    x3 = x.reshape(n, -1, in_features)
    weight_t = weight.transpose(1, 2)
    y = torch.baddbmm(bias.unsqueeze(1), x3, weight_t) if bias is not None else torch.bmm(x3, weight_t)
    return y.view(n, *batch_shape, out_features)
