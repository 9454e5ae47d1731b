"""The MultiheadAttention rule against the member loop: every covered call form, dropout per member, and the forms
left to vmap."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fused_ensemble import FusedEnsemble

from layer_checks import check_layer, check_on_cuda, check_outputs_and_grads, draw_input
from member_factories import make_members


class AttentionBlock(nn.Module):
    """A transformer block's attention (as in torchvision's ViT): a leaf with parameters and no rule."""

    def __init__(self, need_weights: bool):
        super().__init__()
        self.need_weights = need_weights
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(x + self.attention(x, x, x, need_weights=self.need_weights)[0])


def test_multihead_attention_leaf():
    check_layer(lambda: AttentionBlock(need_weights=True), (5, 8), training=True)
    check_layer(lambda: AttentionBlock(need_weights=True), (5, 8), grad=False)


def test_multihead_attention_leaf_backward_in_eval_mode():
    check_layer(lambda: AttentionBlock(need_weights=True), (5, 8))


def test_multihead_attention_leaf_without_weights_output():
    check_layer(lambda: AttentionBlock(need_weights=False), (5, 8))


class AttentionCall(nn.Module):
    """One nn.MultiheadAttention call in a chosen form; returns (output, weights) with the weights as zeros when
    the layer returns none, so both are compared against the loop."""

    def __init__(self, form: str, batch_first: bool = True, **layer):
        super().__init__()
        self.form, self.batch_first = form, batch_first
        self.attention = nn.MultiheadAttention(8, 2, batch_first=batch_first, **layer)
        self.key_proj = nn.Linear(8, layer.get("kdim", 8))

    def forward(self, x):
        if not self.batch_first:
            x = x.transpose(0, 1)
        other = self.key_proj(x)  # a second member-specific sequence, for cross-attention
        seq_dim = 1 if self.batch_first else 0
        if self.form == "self":
            out, weights = self.attention(x, x, x)
        elif self.form == "cross_kv_shared":
            longer = torch.cat([other, other.flip(seq_dim)], dim=seq_dim)  # source longer than the target
            out, weights = self.attention(x, longer, longer, average_attn_weights=False)
        elif self.form == "cross_all_different":
            out, weights = self.attention(x, other, torch.tanh(other), need_weights=False)
        elif self.form == "key_padding_mask":  # [B, L] (batch_first): a few keys masked, no row all masked
            out, weights = self.attention(x, x, x, key_padding_mask=x[..., 0] > 2.5)
        elif self.form in ("causal", "causal_with_weights"):
            length = x.shape[seq_dim]
            mask = nn.Transformer.generate_square_subsequent_mask(length)
            out, weights = self.attention(x, x, x, attn_mask=mask, is_causal=True,
                                          need_weights=self.form == "causal_with_weights")
        elif self.form == "bool_attn_mask_and_padding":  # [L, S] and [B, S], both boolean
            length = x.shape[seq_dim]
            mask = nn.Transformer.generate_square_subsequent_mask(length) < 0
            # padded keys anywhere but the first (under the causal mask, query 0 sees only key 0)
            padding = (x[..., 1:].sum(-1) > 2.0) & (torch.arange(length) > 0)
            out, weights = self.attention(x, x, x, attn_mask=mask, key_padding_mask=padding)
        elif self.form == "per_head_mask":  # [B * heads, L, S] additive, from the data
            scores = x[..., 0].unsqueeze(-1) * x[..., 1].unsqueeze(-2)
            out, weights = self.attention(x, x, x, attn_mask=scores.repeat_interleave(2, dim=0),
                                          need_weights=False)
        else:
            raise ValueError(self.form)
        return out, (weights if weights is not None else torch.zeros(()))


ATTENTION_CASES = {
    "self": dict(form="self"),
    "self-seq-first-no-bias": dict(form="self", batch_first=False, bias=False),
    "cross-kv-shared-per-head-weights": dict(form="cross_kv_shared"),
    "cross-all-different-seq-first": dict(form="cross_all_different", batch_first=False),
    "key-padding-mask": dict(form="key_padding_mask"),
    "causal-mask": dict(form="causal"),
    "causal-mask-with-weights": dict(form="causal_with_weights"),
    "bool-attn-mask-and-padding": dict(form="bool_attn_mask_and_padding"),
    "per-head-mask": dict(form="per_head_mask"),
    # these keep the vmap path: extra key/value bias, separate key/value sizes
    "bias-kv": dict(form="self", add_bias_kv=True),
    "kdim-vdim": dict(form="cross_all_different", kdim=6, vdim=6),
}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_multihead_attention_forms(case, training):
    """Outputs, attention weights and every gradient against the member loop (dropout 0), both input modes."""
    check_outputs_and_grads(lambda: AttentionCall(**ATTENTION_CASES[case]), (5, 8), training, seed=5)


def test_multihead_attention_runs_without_vmap_where_it_can(vmapped_layers):
    """The covered forms never run the layer through vmap(functional_call) (where CPU attention has no batching
    rule: member by member); the others still do."""
    calls = vmapped_layers
    for case, expect_vmap in (("self", False), ("cross-kv-shared-per-head-weights", False),
                              ("cross-all-different-seq-first", False), ("key-padding-mask", False),
                              ("causal-mask", False), ("per-head-mask", False),
                              ("bool-attn-mask-and-padding", False), ("bias-kv", True),
                              ("kdim-vdim", True)):
        calls.clear()
        members = make_members(lambda: AttentionCall(**ATTENTION_CASES[case]), n=2, seed=6)
        FusedEnsemble(members, reduction="none", member_inputs=True)(draw_input((5, 8), True))
        assert ("MultiheadAttention" in calls) == expect_vmap, case


def test_multihead_attention_dropout_draws_per_member():
    members = make_members(lambda: AttentionCall(form="self", dropout=0.5), n=3, seed=7, training=True)
    for m in members[1:]:  # identical members: only the dropout masks can tell them apart
        m.load_state_dict(members[0].state_dict())
    fused = FusedEnsemble(members, reduction="none")
    _, weights = fused(draw_input((5, 8), False))
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])
    fused.eval()
    _, weights = fused(draw_input((5, 8), False))
    assert torch.equal(weights[0], weights[1]) and torch.equal(weights[1], weights[2])


@pytest.mark.gpu
def test_attention_rule_on_cuda():
    """The fused attention on CUDA, with explicit weights."""
    check_on_cuda(lambda: AttentionCall("cross_kv_shared"), (5, 8), seed=16)
