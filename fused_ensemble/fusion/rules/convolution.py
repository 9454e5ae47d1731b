"""Convolutions of N members as one grouped convolution over their channels side by side.

Member i's input channels are groups i * g ... (i + 1) * g - 1 of the N * g groups, and its weight
``[C_out, C_in / g, *kernel]`` their rows, so the stacked weight flattened to ``[N * C_out, C_in / g, *kernel]`` is
the grouped weight. A first layer fed the shared input needs no groups: one dense convolution with N * C_out
outputs. Transposed convolutions stack the same way along their input channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fused_ensemble.fusion.layout import Layout, to_channel
from fused_ensemble.fusion.rules.conv_backward import grouped_conv_with_per_member_backward
from fused_ensemble.fusion.rules.registry import FusionContext, expect_batched, expect_channels, layer_rule


@layer_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def convolution(module: nn.modules.conv._ConvNd, x: torch.Tensor, layout: Layout, ctx: FusionContext):
    n = ctx.num_members
    spatial = len(module.kernel_size)
    expect_batched(module, x, layout, spatial + 2)
    expect_channels(x, layout, n, module.in_channels)
    functional = (F.conv1d, F.conv2d, F.conv3d)[spatial - 1]
    weight = module.weight.flatten(0, 1)  # [N * C_out, C_in / groups, *kernel]
    bias = module.bias.flatten() if module.bias is not None else None
    padding = module.padding
    if layout is Layout.SHARED and module.groups == 1 and module.padding_mode == "zeros":
        # Every member reads the same input: one dense convolution with N * C_out output channels.
        return functional(x, weight, bias, module.stride, padding, module.dilation, 1), Layout.CHANNEL
    x = to_channel(x, layout, n)
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = 0
    if ctx.conv_backward == "per_member" and torch.is_grad_enabled() and not isinstance(padding, str):
        return grouped_conv_with_per_member_backward(functional, x, weight, bias, module.stride, padding,
                                                     module.dilation, module.groups, n), Layout.CHANNEL
    return functional(x, weight, bias, module.stride, padding, module.dilation, n * module.groups), Layout.CHANNEL


@layer_rule(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def transposed_convolution(module: nn.modules.conv._ConvTransposeNd, x: torch.Tensor, layout: Layout,
                           ctx: FusionContext):
    """A grouped transposed convolution over the channel-packed members: member i's input channels are groups
    i * g ... (i + 1) * g - 1 of N * g, and its weight ``[C_in, C_out / g, *kernel]`` their rows, so stacking the
    members' weights along C_in is the grouped weight. (Calls with ``output_size`` take the generic path.)"""
    spatial = len(module.kernel_size)
    expect_batched(module, x, layout, spatial + 2)
    expect_channels(x, layout, ctx.num_members, module.in_channels)
    functional = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[spatial - 1]
    weight = module.weight.flatten(0, 1)  # [N * C_in, C_out / groups, *kernel]
    bias = module.bias.flatten() if module.bias is not None else None
    x = to_channel(x, layout, ctx.num_members)
    return functional(x, weight, bias, module.stride, module.padding, module.output_padding,
                      ctx.num_members * module.groups, module.dilation), Layout.CHANNEL
