"""Normalization layers of N members: BatchNorm / GroupNorm / InstanceNorm over the N * C channel-packed channels
(each member's statistics are its own channels'), LayerNorm and RMSNorm on member-first tensors with per-member
affine parameters."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fused_ensemble.fusion.layout import Layout, to_channel, to_member
from fused_ensemble.fusion.rules.registry import (
    FusionContext,
    expect_batched,
    expect_channels,
    layer_rule,
    member_shape,
)


@layer_rule(nn.modules.batchnorm._BatchNorm)
def batch_norm(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, layout: Layout, ctx: FusionContext):
    # Mirrors nn.BatchNorm's forward over N * C channels; each member's statistics are its own channels.
    expect_channels(x, layout, ctx.num_members, module.num_features)
    x = to_channel(x, layout, ctx.num_members)
    momentum = 0.0 if module.momentum is None else module.momentum
    if module.training and module.track_running_stats and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        if module.momentum is None:
            counts = module.num_batches_tracked
            if not torch.equal(counts, counts[:1].expand_as(counts)):
                raise ValueError("BatchNorm with momentum=None (cumulative average) needs every member to have "
                                 f"seen the same number of batches, got num_batches_tracked={counts.tolist()}")
            momentum = 1.0 / float(counts[0])
    use_batch_stats = module.training or (module.running_mean is None and module.running_var is None)
    track = not module.training or module.track_running_stats
    running_mean = module.running_mean.view(-1) if track and module.running_mean is not None else None
    running_var = module.running_var.view(-1) if track and module.running_var is not None else None
    weight = module.weight.flatten() if module.weight is not None else None
    bias = module.bias.flatten() if module.bias is not None else None
    y = F.batch_norm(x, running_mean, running_var, weight, bias, use_batch_stats, momentum, module.eps)
    return y, Layout.CHANNEL


@layer_rule(nn.GroupNorm)
def group_norm(module: nn.GroupNorm, x: torch.Tensor, layout: Layout, ctx: FusionContext):
    expect_channels(x, layout, ctx.num_members, module.num_channels)
    x = to_channel(x, layout, ctx.num_members)
    weight = module.weight.flatten() if module.weight is not None else None
    bias = module.bias.flatten() if module.bias is not None else None
    return F.group_norm(x, ctx.num_members * module.num_groups, weight, bias, module.eps), Layout.CHANNEL


@layer_rule(nn.modules.instancenorm._InstanceNorm)
def instance_norm(module: nn.modules.instancenorm._InstanceNorm, x: torch.Tensor, layout: Layout,
                  ctx: FusionContext):
    # Per sample and channel: the N * C packed channels are each member's own. Running statistics (when tracked)
    # are updated in place through views of the stacked [N, C] buffers.
    expect_batched(module, x, layout, module._get_no_batch_dim() + 1)
    if module.affine or module.track_running_stats:  # (nn.InstanceNorm only warns about the others)
        expect_channels(x, layout, ctx.num_members, module.num_features)
    x = to_channel(x, layout, ctx.num_members)
    running_mean = module.running_mean.view(-1) if module.running_mean is not None else None
    running_var = module.running_var.view(-1) if module.running_var is not None else None
    weight = module.weight.flatten() if module.weight is not None else None
    bias = module.bias.flatten() if module.bias is not None else None
    y = F.instance_norm(x, running_mean, running_var, weight, bias, module.training or not module.track_running_stats,
                        module.momentum if module.momentum is not None else 0.0, module.eps)
    return y, Layout.CHANNEL


def _expect_last_dims(normalized_shape, x: torch.Tensor, layout: Layout, n: int) -> None:
    shape = member_shape(x, layout, n)
    expected = tuple(normalized_shape)
    got = shape[len(shape) - len(expected):] if len(shape) >= len(expected) else shape
    if got != expected:
        raise ValueError(f"expected input whose last dims are {expected} per member, got {got}")


def _broadcast_member(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """``t`` of shape [N, *s] viewed as [N, 1, ..., 1, *s] with ``ndim`` dims in all."""
    return t.view(t.shape[0], *([1] * (ndim - t.dim())), *t.shape[1:])


@layer_rule(nn.LayerNorm)
def layer_norm(module: nn.LayerNorm, x: torch.Tensor, layout: Layout, ctx: FusionContext):
    _expect_last_dims(module.normalized_shape, x, layout, ctx.num_members)
    if layout is Layout.CHANNEL:
        x, layout = to_member(x, layout, ctx.num_members), Layout.MEMBER
    y = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    if module.weight is None and getattr(module, "bias", None) is None:
        return y, layout
    out_ndim = y.dim() + (1 if layout is Layout.SHARED else 0)
    # In y's dtype: under CPU autocast layer_norm returns bfloat16, as nn.LayerNorm does, and a float32 weight
    # would promote the product back to float32.
    if module.weight is not None:
        y = y * _broadcast_member(module.weight, out_ndim).to(y.dtype)
    if getattr(module, "bias", None) is not None:
        y = y + _broadcast_member(module.bias, out_ndim).to(y.dtype)
    return y, Layout.MEMBER


@layer_rule(nn.RMSNorm)
def rms_norm(module: nn.RMSNorm, x: torch.Tensor, layout: Layout, ctx: FusionContext):
    _expect_last_dims(module.normalized_shape, x, layout, ctx.num_members)
    if layout is Layout.CHANNEL:
        x, layout = to_member(x, layout, ctx.num_members), Layout.MEMBER
    y = F.rms_norm(x, module.normalized_shape, None, module.eps)
    if module.weight is None:
        return y, layout
    weight = _broadcast_member(module.weight, y.dim() + (1 if layout is Layout.SHARED else 0))
    return y * weight.to(y.dtype), Layout.MEMBER  # in y's dtype, as layer_norm above
