"""torch.nn's transformer layers for all N members at once: TransformerEncoderLayer / TransformerDecoderLayer, their
stacks TransformerEncoder / TransformerDecoder, and nn.Transformer.

torch.fx keeps these torch.nn layers whole (its default leaves), and their forwards branch on tensor properties
(the fast-path checks), so without a rule they run as ``vmap(functional_call)``: a 4-member encoder (4 layers of
width 128, B=8, L=64) took about 3x the member loop's time on a 2-core CPU that way.
Here a layer is its slow path, piece by piece, each piece fused: LayerNorm through its rule, the attention through
``attention.fused_call``, the feed-forward Linears as batched matmuls, activation and dropout on member-first
tensors (dropout draws independently per member). The output equals torch's slow path for every member; torch's
inference fast paths (the fused encoder-layer kernel, and the nested-tensor path that returns zeros at padded
positions) are not reproduced, as under vmap.

A stack hands its layers a causal hint only when the caller gave one: torch also turns the hint on when the mask
equals the causal mask, and applying that mask as given computes the same thing. Calls this does not cover (an
attention ``attention.fusable`` refuses, an activation with parameters, masks of shapes the attention leaves to
torch) return None: the layer keeps the generic path.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from fused_ensemble.fusion.layout import Layout, to_member
from fused_ensemble.fusion.rules.attention import fusable as attention_fusable
from fused_ensemble.fusion.rules.attention import fused_call as attention_call
from fused_ensemble.fusion.rules.linear import member_linear
from fused_ensemble.fusion.rules.registry import FusionContext, LayerCall, OneInputRule, Rule, register, rule_for

_SIGNATURES = {cls: inspect.signature(cls.forward) for cls in (
    nn.TransformerEncoderLayer, nn.TransformerEncoder, nn.TransformerDecoderLayer, nn.TransformerDecoder,
    nn.Transformer)}


class _NotCovered(Exception):
    """A call the fused pieces do not cover: the whole layer takes the generic path."""


def _layer_fusable(layer: nn.Module) -> bool:
    if isinstance(layer, nn.TransformerEncoderLayer):
        attentions = (layer.self_attn,)
    elif isinstance(layer, nn.TransformerDecoderLayer):
        attentions = (layer.self_attn, layer.multihead_attn)
    else:
        return False
    activation = layer.activation
    elementwise = not isinstance(activation, nn.Module) or not any(True for _ in activation.parameters())
    return elementwise and all(attention_fusable(a) for a in attentions)


def fusable(module: nn.Module) -> bool:
    """Whether ``module`` is a layer, a stack of layers or a Transformer that ``fused_call`` can run."""
    if isinstance(module, nn.Transformer):
        return fusable(module.encoder) and fusable(module.decoder)
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)):
        return all(_layer_fusable(layer) for layer in module.layers)
    return _layer_fusable(module)


def fused_call(module: nn.Module, layer_call: LayerCall, n: int):
    """``module(*args, **kwargs)`` for all members: ``(output, Layout.MEMBER)``, or None for the generic path."""
    call, layout_of = layer_call.bind(_signature_of(module), module)
    arg = {name: (value, layout_of.get(name)) for name, value in call.items() if name != "self"}
    try:
        if isinstance(module, nn.Transformer):
            memory = _encoder(module.encoder, arg["src"], arg["src_mask"], arg["src_key_padding_mask"],
                              call["src_is_causal"] is True, n)
            out = _decoder(module.decoder, arg["tgt"], (memory, Layout.MEMBER), arg, n)
        elif isinstance(module, nn.TransformerDecoder):
            out = _decoder(module, arg["tgt"], arg["memory"], arg, n)
        elif isinstance(module, nn.TransformerDecoderLayer):
            out = _decoder_layer(module, _member(arg["tgt"], n), arg["memory"], arg, call["tgt_is_causal"] is True, n)
        elif isinstance(module, nn.TransformerEncoder):
            out = _encoder(module, arg["src"], arg["mask"], arg["src_key_padding_mask"], call["is_causal"] is True, n)
        else:
            out = _encoder_layer(module, _member(arg["src"], n), arg["src_mask"], arg["src_key_padding_mask"],
                                 call["is_causal"] is True, n)
    except _NotCovered:
        return None
    return out, Layout.MEMBER


def _signature_of(module: nn.Module) -> inspect.Signature:
    """The forward signature of the torch.nn transformer class ``module`` is (or derives from)."""
    for cls in type(module).__mro__:
        if cls in _SIGNATURES:
            return _SIGNATURES[cls]
    raise TypeError(f"no transformer signature for {type(module).__name__}")


def _member(value_and_layout, n: int) -> torch.Tensor:
    value, layout = value_and_layout
    if not isinstance(value, torch.Tensor):
        raise _NotCovered
    return to_member(value, layout, n)


def _norm(norm: nn.Module, x: torch.Tensor, n: int) -> torch.Tensor:
    rule = rule_for(norm)
    if not isinstance(rule, OneInputRule):
        raise _NotCovered
    y, layout = rule.apply(norm, x, Layout.MEMBER, FusionContext(n))
    return to_member(y, layout, n)


def _attend(mha: nn.MultiheadAttention, query: torch.Tensor, key_value, attn_mask, key_padding_mask,
            is_causal: bool, n: int) -> torch.Tensor:
    """``mha(query, kv, kv, ...)[0]`` without weights; ``key_value``: (tensor, layout), or None for self-attention."""
    kv, kv_layout = (query, Layout.MEMBER) if key_value is None else key_value
    keywords = {"attn_mask": attn_mask[0], "key_padding_mask": key_padding_mask[0], "need_weights": False,
                "is_causal": is_causal}
    keyword_layouts = {"attn_mask": attn_mask[1], "key_padding_mask": key_padding_mask[1]}
    result = attention_call(mha, LayerCall((query, kv, kv), keywords, (Layout.MEMBER, kv_layout, kv_layout),
                                                 keyword_layouts), n)
    if result is None:
        raise _NotCovered
    return result[0][0]


def _feed_forward(layer: nn.Module, x: torch.Tensor, n: int) -> torch.Tensor:
    h = layer.activation(member_linear(x, Layout.MEMBER, layer.linear1.weight, layer.linear1.bias, n))
    return member_linear(layer.dropout(h), Layout.MEMBER, layer.linear2.weight, layer.linear2.bias, n)


def _encoder_layer(layer: nn.TransformerEncoderLayer, x: torch.Tensor, mask, key_padding_mask, is_causal: bool,
                   n: int) -> torch.Tensor:
    def self_attention(h):
        return layer.dropout1(_attend(layer.self_attn, h, None, mask, key_padding_mask, is_causal, n))

    if layer.norm_first:
        x = x + self_attention(_norm(layer.norm1, x, n))
        return x + layer.dropout2(_feed_forward(layer, _norm(layer.norm2, x, n), n))
    x = _norm(layer.norm1, x + self_attention(x), n)
    return _norm(layer.norm2, x + layer.dropout2(_feed_forward(layer, x, n)), n)


def _decoder_layer(layer: nn.TransformerDecoderLayer, x: torch.Tensor, memory, arg: dict, tgt_is_causal: bool,
                   n: int) -> torch.Tensor:
    memory_is_causal = arg["memory_is_causal"][0] is True

    def self_attention(h):
        return layer.dropout1(_attend(layer.self_attn, h, None, arg["tgt_mask"], arg["tgt_key_padding_mask"],
                                      tgt_is_causal, n))

    def cross_attention(h):
        return layer.dropout2(_attend(layer.multihead_attn, h, memory, arg["memory_mask"],
                                      arg["memory_key_padding_mask"], memory_is_causal, n))

    if layer.norm_first:
        x = x + self_attention(_norm(layer.norm1, x, n))
        x = x + cross_attention(_norm(layer.norm2, x, n))
        return x + layer.dropout3(_feed_forward(layer, _norm(layer.norm3, x, n), n))
    x = _norm(layer.norm1, x + self_attention(x), n)
    x = _norm(layer.norm2, x + cross_attention(x), n)
    return _norm(layer.norm3, x + layer.dropout3(_feed_forward(layer, x, n)), n)


def _encoder(encoder: nn.TransformerEncoder, src, mask, key_padding_mask, is_causal: bool, n: int) -> torch.Tensor:
    x = _member(src, n)
    for layer in encoder.layers:
        x = _encoder_layer(layer, x, mask, key_padding_mask, is_causal, n)
    return x if encoder.norm is None else _norm(encoder.norm, x, n)


def _decoder(decoder: nn.TransformerDecoder, tgt, memory, arg: dict, n: int) -> torch.Tensor:
    if not isinstance(memory[0], torch.Tensor):
        raise _NotCovered
    x = _member(tgt, n)
    tgt_is_causal = arg["tgt_is_causal"][0] is True
    for layer in decoder.layers:
        x = _decoder_layer(layer, x, memory, arg, tgt_is_causal, n)
    return x if decoder.norm is None else _norm(decoder.norm, x, n)


class TransformerRule(Rule):
    def fusable(self, module: nn.Module) -> bool:
        return fusable(module)

    def __call__(self, module: nn.Module, call: LayerCall, ctx: FusionContext):
        return fused_call(module, call, ctx.num_members)


register(TransformerRule(), *_SIGNATURES)
