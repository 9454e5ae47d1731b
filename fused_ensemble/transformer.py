"""nn.TransformerEncoderLayer and nn.TransformerEncoder for all N members at once.

torch.fx keeps these torch.nn layers whole (its default leaves), and their forwards branch on tensor properties
(the fast-path checks), so without a rule they run as ``vmap(functional_call)``: a 4-member encoder (4 layers of
width 128, B=8, L=64) took 50.1 ms fused against 15.8 for the member loop on the 2-core CPU (bench/NOTES.md).
Here a layer is its slow path, piece by piece, each piece fused: LayerNorm through its rule, the attention through
``attention.fused_call``, the feed-forward Linears as batched matmuls, activation and dropout on member-first
tensors (dropout draws independently per member). The output equals torch's slow path for every member; torch's
inference fast paths (the fused encoder-layer kernel, and the nested-tensor path that returns zeros at padded
positions) are not reproduced, as under vmap.

Calls this does not cover (a layer whose attention ``attention.fusable`` refuses, an activation with parameters,
masks of shapes the attention leaves to torch) return None: the layer keeps the generic path.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from fused_ensemble import attention
from fused_ensemble.layout import Layout, to_member
from fused_ensemble.module_rules import member_linear, rule_for

_LAYER_SIGNATURE = inspect.signature(nn.TransformerEncoderLayer.forward)
_ENCODER_SIGNATURE = inspect.signature(nn.TransformerEncoder.forward)


def _layer_fusable(layer: nn.Module) -> bool:
    if not isinstance(layer, nn.TransformerEncoderLayer) or not attention.fusable(layer.self_attn):
        return False
    activation = layer.activation
    return not isinstance(activation, nn.Module) or not any(True for _ in activation.parameters())


def fusable(module: nn.Module) -> bool:
    """Whether ``module`` is an encoder layer, or an encoder of such layers, that ``fused_call`` can run."""
    if isinstance(module, nn.TransformerEncoder):
        return all(_layer_fusable(layer) for layer in module.layers)
    return _layer_fusable(module)


def fused_call(module: nn.Module, args: tuple, kwargs: dict, layouts: tuple, keyword_layouts: dict, n: int):
    """``module(*args, **kwargs)`` for all members: ``(output, Layout.MEMBER)``, or None for the generic path.
    ``layouts`` / ``keyword_layouts`` mirror ``args`` / ``kwargs``."""
    encoder = isinstance(module, nn.TransformerEncoder)
    signature = _ENCODER_SIGNATURE if encoder else _LAYER_SIGNATURE
    call, layout_of = attention.bind_call(signature, module, args, kwargs, layouts, keyword_layouts)
    src = call["src"]
    if not isinstance(src, torch.Tensor):
        return None
    x = to_member(src, layout_of["src"], n)
    mask_name = "mask" if encoder else "src_mask"
    masks = {"attn_mask": (call[mask_name], layout_of.get(mask_name)),
             "key_padding_mask": (call["src_key_padding_mask"], layout_of.get("src_key_padding_mask"))}
    # The encoder hands its layers a causal hint only when the caller gave one (torch also detects a mask equal to
    # the causal one: applying that mask as given computes the same thing).
    is_causal = call["is_causal"] is True
    for layer in (module.layers if encoder else (module,)):
        x = _layer(layer, x, masks, is_causal, n)
        if x is None:
            return None
    if encoder and module.norm is not None:
        x = _norm(module.norm, x, n)
    return x, Layout.MEMBER


def _norm(norm: nn.Module, x: torch.Tensor, n: int) -> torch.Tensor:
    y, layout = rule_for(norm)(norm, x, Layout.MEMBER, n)
    return to_member(y, layout, n)


def _layer(layer: nn.TransformerEncoderLayer, x: torch.Tensor, masks: dict, is_causal: bool, n: int):
    """One encoder layer on member-first ``x``, as its slow path (see the module doc); None if not covered."""
    def self_attention(h):
        keywords = {name: mask for name, (mask, _) in masks.items()}
        keyword_layouts = {name: layout for name, (_, layout) in masks.items()}
        keywords.update(need_weights=False, is_causal=is_causal)
        result = attention.fused_call(layer.self_attn, (h, h, h), keywords, (Layout.MEMBER,) * 3, keyword_layouts,
                                      n)
        return None if result is None else layer.dropout1(result[0][0])

    def feed_forward(h):
        h = layer.activation(member_linear(h, Layout.MEMBER, layer.linear1.weight, layer.linear1.bias, n))
        h = member_linear(layer.dropout(h), Layout.MEMBER, layer.linear2.weight, layer.linear2.bias, n)
        return layer.dropout2(h)

    if layer.norm_first:
        attended = self_attention(_norm(layer.norm1, x, n))
        if attended is None:
            return None
        x = x + attended
        return x + feed_forward(_norm(layer.norm2, x, n))
    attended = self_attention(x)
    if attended is None:
        return None
    x = _norm(layer.norm1, x + attended, n)
    return _norm(layer.norm2, x + feed_forward(x), n)
