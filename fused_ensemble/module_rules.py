"""How each member layer type runs for all N members at once.

A rule takes the stacked module (its tensors have the member index in dim 0), the input tensor and its
``Layout``, and returns the output and its layout. Layers without a rule fall back to the generic paths in
``graph_runner`` (see ``rule_for``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fused_ensemble.conv_backward import conv_backward_mode, grouped_conv_with_per_member_backward
from fused_ensemble.layout import Layout, to_channel, to_member

ModuleRule = Callable[[nn.Module, torch.Tensor, Layout, int], "tuple[torch.Tensor, Layout]"]
_RULES: dict[type, ModuleRule] = {}

# Parameterless layers that act on each channel separately: they run on channel-packed tensors unchanged.
CHANNELWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Identity,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)
# Elementwise layers that also run on member-first tensors unchanged.
ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Identity,
)
# Layers whose weights cannot be vmapped or that keep state we do not stack: refused with a clear error.
UNSUPPORTED_MODULES = (nn.SyncBatchNorm, nn.modules.lazy.LazyModuleMixin)


def register_rule(*module_types: type) -> Callable[[ModuleRule], ModuleRule]:
    def decorate(rule: ModuleRule) -> ModuleRule:
        for module_type in module_types:
            _RULES[module_type] = rule
        return rule
    return decorate


def unsupported_reason(module: nn.Module) -> str | None:
    """Why ``module`` cannot be fused, or None."""
    if isinstance(module, UNSUPPORTED_MODULES):
        return f"{type(module).__name__} layers are not supported"
    if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.sparse
                                             or module.scale_grad_by_freq):
        return ("nn.Embedding with max_norm (renormalizes weights in place), sparse gradients or "
                "scale_grad_by_freq is not supported")
    return None


def rule_for(module: nn.Module) -> ModuleRule | None:
    """The rule of the most specific registered base class of ``module``'s type, if any."""
    for module_type in type(module).__mro__:
        if module_type in _RULES:
            return _RULES[module_type]
    return None


def _expect_batched(module: nn.Module, x: torch.Tensor, layout: Layout, batched_dims: int) -> None:
    member_dims = x.dim() - (1 if layout is Layout.MEMBER else 0)
    if member_dims != batched_dims:
        raise ValueError(f"{type(module).__name__} in a FusedEnsemble needs batched input with {batched_dims} dims "
                         f"per member, got {member_dims}")


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv(module: nn.modules.conv._ConvNd, x: torch.Tensor, layout: Layout, n: int):
    spatial = len(module.kernel_size)
    _expect_batched(module, x, layout, spatial + 2)
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
    if conv_backward_mode() == "per_member" and torch.is_grad_enabled() and not isinstance(padding, str):
        return grouped_conv_with_per_member_backward(functional, x, weight, bias, module.stride, padding,
                                                     module.dilation, module.groups, n), Layout.CHANNEL
    return functional(x, weight, bias, module.stride, padding, module.dilation, n * module.groups), Layout.CHANNEL


@register_rule(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def conv_transpose(module: nn.modules.conv._ConvTransposeNd, x: torch.Tensor, layout: Layout, n: int):
    """A grouped transposed convolution over the channel-packed members: member i's input channels are groups
    i * g ... (i + 1) * g - 1 of N * g, and its weight ``[C_in, C_out / g, *kernel]`` their rows, so stacking the
    members' weights along C_in is the grouped weight. (Calls with ``output_size`` take the generic path.)"""
    spatial = len(module.kernel_size)
    _expect_batched(module, x, layout, spatial + 2)
    functional = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[spatial - 1]
    weight = module.weight.flatten(0, 1)  # [N * C_in, C_out / groups, *kernel]
    bias = module.bias.flatten() if module.bias is not None else None
    x = to_channel(x, layout, n)
    return functional(x, weight, bias, module.stride, module.padding, module.output_padding, n * module.groups,
                      module.dilation), Layout.CHANNEL


@register_rule(nn.Linear)
def linear(module: nn.Linear, x: torch.Tensor, layout: Layout, n: int):
    return member_linear(x, layout, module.weight, module.bias, n), Layout.MEMBER


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


@register_rule(nn.modules.batchnorm._BatchNorm)
def batch_norm(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, layout: Layout, n: int):
    # Mirrors nn.BatchNorm's forward over N * C channels; each member's statistics are its own channels.
    x = to_channel(x, layout, n)
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


@register_rule(nn.GroupNorm)
def group_norm(module: nn.GroupNorm, x: torch.Tensor, layout: Layout, n: int):
    x = to_channel(x, layout, n)
    weight = module.weight.flatten() if module.weight is not None else None
    bias = module.bias.flatten() if module.bias is not None else None
    return F.group_norm(x, n * module.num_groups, weight, bias, module.eps), Layout.CHANNEL


@register_rule(nn.modules.instancenorm._InstanceNorm)
def instance_norm(module: nn.modules.instancenorm._InstanceNorm, x: torch.Tensor, layout: Layout, n: int):
    # Per sample and channel: the N * C packed channels are each member's own. Running statistics (when tracked)
    # are updated in place through views of the stacked [N, C] buffers.
    _expect_batched(module, x, layout, module._get_no_batch_dim() + 1)
    x = to_channel(x, layout, n)
    running_mean = module.running_mean.view(-1) if module.running_mean is not None else None
    running_var = module.running_var.view(-1) if module.running_var is not None else None
    weight = module.weight.flatten() if module.weight is not None else None
    bias = module.bias.flatten() if module.bias is not None else None
    y = F.instance_norm(x, running_mean, running_var, weight, bias, module.training or not module.track_running_stats,
                        module.momentum if module.momentum is not None else 0.0, module.eps)
    return y, Layout.CHANNEL


@register_rule(nn.PReLU)
def prelu(module: nn.PReLU, x: torch.Tensor, layout: Layout, n: int):
    x = to_channel(x, layout, n)
    weight = module.weight  # [N, C] or [N, 1]: one slope per channel, or one for all of a member's channels
    if weight.shape[1] == 1:
        weight = weight.expand(n, x.shape[1] // n)
    return F.prelu(x, weight.reshape(-1)), Layout.CHANNEL


def _broadcast_member(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """``t`` of shape [N, *s] viewed as [N, 1, ..., 1, *s] with ``ndim`` dims in all."""
    return t.view(t.shape[0], *([1] * (ndim - t.dim())), *t.shape[1:])


@register_rule(nn.LayerNorm)
def layer_norm(module: nn.LayerNorm, x: torch.Tensor, layout: Layout, n: int):
    if layout is Layout.CHANNEL:
        x, layout = to_member(x, layout, n), Layout.MEMBER
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


@register_rule(nn.RMSNorm)
def rms_norm(module: nn.RMSNorm, x: torch.Tensor, layout: Layout, n: int):
    if layout is Layout.CHANNEL:
        x, layout = to_member(x, layout, n), Layout.MEMBER
    y = F.rms_norm(x, module.normalized_shape, None, module.eps)
    if module.weight is None:
        return y, layout
    weight = _broadcast_member(module.weight, y.dim() + (1 if layout is Layout.SHARED else 0))
    return y * weight.to(y.dtype), Layout.MEMBER  # in y's dtype, as layer_norm above


@register_rule(nn.Embedding)
def embedding(module: nn.Embedding, indices: torch.Tensor, layout: Layout, n: int):
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


@register_rule(nn.Dropout, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
def dropout(module: nn.Module, x: torch.Tensor, layout: Layout, n: int):
    if not module.training or module.p == 0:
        return x, layout
    # Each member gets its own mask: never drop out a shared tensor once for everyone.
    if isinstance(module, (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.FeatureAlphaDropout)):
        x, layout = to_channel(x, layout, n), Layout.CHANNEL
    elif layout is Layout.SHARED:
        x, layout = to_member(x, layout, n), Layout.MEMBER
    return module(x), layout

