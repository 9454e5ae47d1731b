"""What the graph runner's generic paths may assume about an op or a layer without a rule.

- elementwise: runs unchanged on member-first or channel-packed tensors (every element on its own);
- channelwise: runs unchanged on channel-packed ``[B, N * C, ...]`` tensors (every channel on its own: pooling);
- random: draws random numbers, so a shared input must still get one draw per member;
- concatenate: ``torch.cat`` and its aliases, which keep channel-packed members together (see the runner).
Anything else runs under ``torch.vmap`` over the member dim.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

ELEMENTWISE, CHANNELWISE, CONCATENATE, RANDOM = "elementwise", "channelwise", "concatenate", "random"

ELEMENTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.iadd, operator.isub,
    operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.relu,
    torch.sigmoid, torch.tanh, torch.exp, torch.sqrt, torch.abs, torch.clamp, torch.where, F.relu, F.relu6,
    F.gelu, F.silu, F.sigmoid, F.tanh, F.hardswish, F.hardsigmoid, F.hardtanh, F.leaky_relu, F.elu, F.selu,
    F.mish, F.softplus,
    "add", "sub", "mul", "div", "neg", "relu", "sigmoid", "tanh", "exp", "sqrt", "abs", "clamp",
    "add_", "sub_", "mul_", "div_", "relu_", "sigmoid_", "clamp_",
}
# Ops on [B, C, *spatial] that treat every channel on its own.
CHANNELWISE_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate,
}
# Ops that draw random numbers: on a shared input each member must still get its own draw.
RANDOM_FUNCTIONS = {
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    torch.bernoulli, torch.rand_like, torch.randn_like, torch.randint_like,
}
# How a random op may run unchanged once its input already differs per member: dropout masks are drawn per element
# (or per channel), so on a member-first or channel-packed tensor every member gets its own.
RANDOM_FAST_PATH = {
    F.dropout: ELEMENTWISE, F.alpha_dropout: ELEMENTWISE,
    F.dropout1d: CHANNELWISE, F.dropout2d: CHANNELWISE, F.dropout3d: CHANNELWISE,
}
CONCATENATE_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}

# Elementwise layers without parameters: they also run on member-first tensors unchanged.
ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Identity,
)
# Parameterless layers that act on each channel separately: they run on channel-packed tensors unchanged.
CHANNELWISE_MODULES = ELEMENTWISE_MODULES + (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)


def function_kind(target) -> str | None:
    """The kind of a traced function or method name (see the module docstring), or None for "anything else"."""
    # Random ops first: on a shared input they must draw per member, even the elementwise/channelwise ones.
    if target in RANDOM_FUNCTIONS:
        return RANDOM
    if target in ELEMENTWISE_FUNCTIONS:
        return ELEMENTWISE
    if target in CHANNELWISE_FUNCTIONS:
        return CHANNELWISE
    if target in CONCATENATE_FUNCTIONS:
        return CONCATENATE
    return None


def module_kind(module: nn.Module) -> str | None:
    """The kind of a layer without parameters, or None."""
    if isinstance(module, ELEMENTWISE_MODULES):
        return ELEMENTWISE
    if isinstance(module, CHANNELWISE_MODULES):
        return CHANNELWISE
    return None
