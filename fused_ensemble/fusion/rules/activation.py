"""Activations with parameters: PReLU's per-member slopes over the channel-packed members. (Activations without
parameters need no rule: they run once over every member's activations, see ``fused_ensemble.fusion.op_kinds``.)"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fused_ensemble.fusion.layout import Layout, to_channel
from fused_ensemble.fusion.rules.registry import FusionContext, layer_rule


@layer_rule(nn.PReLU)
def prelu(module: nn.PReLU, x: torch.Tensor, layout: Layout, ctx: FusionContext):
    n = ctx.num_members
    x = to_channel(x, layout, n)
    weight = module.weight  # [N, C] or [N, 1]: one slope per channel, or one for all of a member's channels
    if weight.shape[1] == 1:
        weight = weight.expand(n, x.shape[1] // n)
    return F.prelu(x, weight.reshape(-1)), Layout.CHANNEL
