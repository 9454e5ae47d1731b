"""Folds eval-mode BatchNorm into the convolution in front of it, for all members at once.

``y = (conv(x) - mean) * gamma / sqrt(var + eps) + beta`` is a convolution with weight ``w * s`` and bias
``(b - mean) * s + beta`` where ``s = gamma / sqrt(var + eps)``, per member and output channel. The stacked
tensors hold every member in dim 0, so one broadcast does all members.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

# Only convolutions: their output channel is always dim 1, the dim BatchNorm normalizes. A Linear's output
# features are the last dim, which is BatchNorm's channel dim only for 2D inputs, unknown when tracing.
_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _fold_into(layer: nn.Module, norm: nn.modules.batchnorm._BatchNorm) -> None:
    with torch.no_grad():
        num_members, channels = layer.weight.shape[:2]
        scale = torch.rsqrt(norm.running_var.double() + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight.double()
        shift = -norm.running_mean.double() * scale
        if norm.bias is not None:
            shift = shift + norm.bias.double()
        bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(shift)
        weight_scale = scale.view(num_members, channels, *([1] * (layer.weight.dim() - 2)))
        new_weight = (layer.weight.double() * weight_scale).to(layer.weight.dtype)
        new_bias = (bias * scale + shift).to(layer.weight.dtype)
        layer.weight = nn.Parameter(new_weight, requires_grad=False)
        layer.bias = nn.Parameter(new_bias, requires_grad=False)


def fold_batchnorm(graph: fx.Graph, stacked: nn.Module) -> int:
    """Rewrites ``graph`` (traced in eval mode from ``stacked``) so every BatchNorm that directly follows a
    convolution used nowhere else is folded into it. Mutates the layers of ``stacked``; returns the count."""
    folded = 0
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        norm = stacked.get_submodule(node.target)
        if not isinstance(norm, nn.modules.batchnorm._BatchNorm) or norm.running_mean is None:
            continue
        producer = node.args[0] if node.args else None
        if not isinstance(producer, fx.Node) or producer.op != "call_module" or len(producer.users) != 1:
            continue
        layer = stacked.get_submodule(producer.target)
        if not isinstance(layer, _FOLDABLE):
            continue
        _fold_into(layer, norm)
        node.replace_all_uses_with(producer)
        graph.erase_node(node)
        folded += 1
    graph.lint()
    return folded
