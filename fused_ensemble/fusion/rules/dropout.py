"""Dropout layers of N members: each member draws its own mask, as it would alone."""

from __future__ import annotations

import torch
from torch import nn

from fused_ensemble.fusion.layout import Layout, to_channel, to_member
from fused_ensemble.fusion.rules.registry import FusionContext, layer_rule


@layer_rule(nn.Dropout, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
def dropout(module: nn.Module, x: torch.Tensor, layout: Layout, ctx: FusionContext):
    if not module.training or module.p == 0:
        return x, layout
    # Each member gets its own mask: never drop out a shared tensor once for everyone.
    if isinstance(module, (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.FeatureAlphaDropout)):
        x, layout = to_channel(x, layout, ctx.num_members), Layout.CHANNEL
    elif layout is Layout.SHARED:
        x, layout = to_member(x, layout, ctx.num_members), Layout.MEMBER
    return module(x), layout
