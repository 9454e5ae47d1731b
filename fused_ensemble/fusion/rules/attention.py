"""nn.MultiheadAttention for all N members at once: batched in/out projections and one attention call over the
N * B sequences.

Without it, a layer with parameters and no rule runs as ``vmap(functional_call)``: under vmap the projections
become broadcast matmuls with copies, and ``scaled_dot_product_attention`` has no batching rule on the CPU (torch
falls back to running it member by member). A ViT ensemble's fused forward took 2.6x the member loop's time on a
2-core CPU that way.

Attention itself has no parameters: only the projections differ between members. So the members' sequences are
stacked along the batch dim, ``[N * B, heads, L, head_dim]``, and attended in one call, the same computation
``F.multi_head_attention_forward`` does for one member (``scaled_dot_product_attention`` when no weights are asked
for, an explicit softmax when they are; dropout on the weights in training, independent per member).

Covered: batched inputs (``batch_first`` either way), self- and cross-attention, ``need_weights`` and
``average_attn_weights``, ``key_padding_mask`` (``[B, S]``) and ``attn_mask`` (``[L, S]`` or ``[B * heads, L, S]``),
boolean or additive, the same for every member or one per member, and ``is_causal``. Layers with ``add_bias_kv``,
``add_zero_attn`` or separate key/value sizes, unbatched inputs and masks of other shapes or dtypes keep the vmap
path (``fused_call`` returns None for them; torch then raises its own errors for malformed masks).
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from fused_ensemble.fusion.layout import Layout, to_member
from fused_ensemble.fusion.rules.linear import member_linear
from fused_ensemble.fusion.rules.registry import FusionContext, LayerCall, Rule, register

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def fusable(module: nn.Module) -> bool:
    """Whether ``module`` is a MultiheadAttention layer ``fused_call`` can run (the per-call conditions aside)."""
    return (isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim and module.bias_k is None
            and not module.add_zero_attn)


def fused_call(module: nn.MultiheadAttention, layer_call: LayerCall, n: int):
    """``module(*args, **kwargs)`` for all members: ``((attn_output, attn_weights or None), Layout.MEMBER)``, or
    None when this call needs the generic path (see the module doc)."""
    call, layout_of = layer_call.bind(_SIGNATURE, module)
    query, key, value = call["query"], call["key"], call["value"]
    if not all(isinstance(t, torch.Tensor) for t in (query, key, value)):
        return None
    per_member_dims = [t.dim() - (0 if layout_of[name] is Layout.SHARED else 1)
                       for name, t in (("query", query), ("key", key), ("value", value))]
    if per_member_dims != [3, 3, 3]:
        return None  # unbatched inputs

    embed_dim, heads = module.embed_dim, module.num_heads
    head_dim = embed_dim // heads
    weight, bias = module.in_proj_weight, module.in_proj_bias

    def project(x, name, rows):
        """x's in-projection with rows ``rows`` of the packed weight, member-first ``[N, B, L, out]``."""
        w = weight[:, rows]
        b = None if bias is None else bias[:, rows]
        y = member_linear(x, layout_of[name], w, b, n)  # [N, *x's per-member shape[:-1], out]
        return y if module.batch_first else y.transpose(1, 2)

    q_rows, k_rows, v_rows = (slice(i * embed_dim, (i + 1) * embed_dim) for i in range(3))
    if query is key and key is value:
        # Self-attention: one projection with the packed weight, as torch's _in_projection_packed.
        qkv = project(query, "query", slice(None))
        q, k, v = qkv.unflatten(-1, (3, embed_dim)).unbind(-2)
    else:
        q = project(query, "query", q_rows)
        if key is value:
            k, v = project(key, "key", slice(embed_dim, None)).unflatten(-1, (2, embed_dim)).unbind(-2)
        else:
            k, v = project(key, "key", k_rows), project(value, "value", v_rows)

    batch, target_len, source_len = q.shape[1], q.shape[2], k.shape[2]

    def heads_first(t):  # [N, B, L, E] -> [N * B, heads, L, head_dim]
        return t.unflatten(-1, (heads, head_dim)).transpose(2, 3).reshape(n * batch, heads, t.shape[2], head_dim)

    mask = _additive_mask(call, layout_of, n, batch, heads, target_len, source_len, q.dtype)
    if mask is _UNSUPPORTED:
        return None
    # As F.multi_head_attention_forward: is_causal goes to SDPA only when it is the whole mask and no weights are
    # asked for; otherwise the attention mask (which the hint then describes) is applied as given.
    is_causal = call["is_causal"] and call["key_padding_mask"] is None and not call["need_weights"]
    if is_causal:
        mask = None
    q, k, v = heads_first(q), heads_first(k), heads_first(v)
    dropout_p = module.dropout if module.training else 0.0
    weights = None
    if call["need_weights"]:
        scores = torch.matmul(q * math.sqrt(1.0 / float(head_dim)), k.transpose(-2, -1))
        if mask is not None:
            scores = scores + mask
        weights = F.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        attended = torch.matmul(weights, v)
        weights = weights.view(n, batch, heads, target_len, source_len)
        if call["average_attn_weights"]:
            weights = weights.mean(dim=2)
    else:
        attended = F.scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal)
    # [N * B, heads, L, head_dim] -> [N, B, L, E], then each member's out-projection.
    attended = attended.transpose(1, 2).reshape(n, batch, target_len, embed_dim)
    out = member_linear(attended, Layout.MEMBER, module.out_proj.weight, module.out_proj.bias, n)
    if not module.batch_first:
        out = out.transpose(1, 2)  # [N, L, B, E]
    return (out, weights), Layout.MEMBER


_UNSUPPORTED = object()


def _additive_mask(call: dict, layout_of: dict, n: int, batch: int, heads: int, target_len: int, source_len: int,
                   dtype: torch.dtype):
    """The key-padding and attention masks as one additive float mask for the ``[N * B, heads, L, S]`` scores
    (boolean masks: -inf where True, as torch's ``_canonical_mask``), None without masks, or ``_UNSUPPORTED``.
    A mask is either every member's (shared layout) or one per member (leading member dim)."""
    if call["is_causal"] and call["attn_mask"] is None:
        return _UNSUPPORTED  # torch raises: the hint needs the mask
    combined = None
    for name, shapes in (("attn_mask", {2: (target_len, source_len), 3: (batch * heads, target_len, source_len)}),
                         ("key_padding_mask", {2: (batch, source_len)})):
        mask = call[name]
        if mask is None:
            continue
        if not isinstance(mask, torch.Tensor) or not (mask.dtype == torch.bool or mask.is_floating_point()):
            return _UNSUPPORTED
        layout = layout_of[name]
        if layout is not Layout.SHARED:
            mask = to_member(mask, layout, n)
        per_member = mask if layout is Layout.SHARED else mask[0]
        if shapes.get(per_member.dim()) != tuple(per_member.shape):
            return _UNSUPPORTED
        if mask.dtype == torch.bool:
            mask = torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
        # To [N or 1, B or 1, heads or 1, L or 1, S].
        lead = (1,) if layout is Layout.SHARED else (n,)
        if name == "key_padding_mask":
            mask = mask.reshape(*lead, batch, 1, 1, source_len)
        elif per_member.dim() == 2:
            mask = mask.reshape(*lead, 1, 1, target_len, source_len)
        else:
            mask = mask.reshape(*lead, batch, heads, target_len, source_len)
        combined = mask if combined is None else combined + mask
    if combined is None:
        return None
    return combined.expand(n, batch, *combined.shape[2:]).reshape(n * batch, *combined.shape[2:])


class AttentionRule(Rule):
    def fusable(self, module: nn.Module) -> bool:
        return fusable(module)

    def __call__(self, module: nn.MultiheadAttention, call: LayerCall, ctx: FusionContext):
        return fused_call(module, call, ctx.num_members)


register(AttentionRule(), nn.MultiheadAttention)
