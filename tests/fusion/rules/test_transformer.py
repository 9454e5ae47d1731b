"""The transformer rules (encoder and decoder layers, their stacks, nn.Transformer) against the member loop."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fused_ensemble import FusedEnsemble

from layer_checks import check_layer, check_on_cuda, draw_input
from member_factories import assert_matches, make_members, member_loop


class Encoder(nn.Module):
    """A transformer encoder (or one encoder layer) as a member's child: torch.fx keeps it whole."""

    def __init__(self, layers: int | None, batch_first: bool = True, masks: bool = False, **layer):
        super().__init__()
        self.batch_first, self.masks = batch_first, masks
        block = nn.TransformerEncoderLayer(8, 2, 16, dropout=layer.pop("dropout", 0.0), batch_first=batch_first,
                                           **layer)
        self.encoder = block if layers is None else nn.TransformerEncoder(
            block, layers, norm=nn.LayerNorm(8), enable_nested_tensor=False)

    def forward(self, x):
        if not self.batch_first:
            x = x.transpose(0, 1)
        if not self.masks:
            return self.encoder(x)
        length = x.shape[1 if self.batch_first else 0]
        causal = nn.Transformer.generate_square_subsequent_mask(length)
        # padded keys from the data, never the first (under the causal mask query 0 sees only key 0)
        padded = ((x[..., 1:] if self.batch_first else x[..., 1:].transpose(0, 1)).sum(-1) > 2.0) & (
            torch.arange(length) > 0)
        padding = padded.float() * -1e9  # additive, like the causal mask (torch warns on mixed mask types)
        if isinstance(self.encoder, nn.TransformerEncoder):
            return self.encoder(x, mask=causal, src_key_padding_mask=padding, is_causal=True)
        return self.encoder(x, src_mask=causal, src_key_padding_mask=padding)


ENCODER_CASES = {
    "layer": dict(layers=None),
    "layer-norm-first-gelu-seq-first": dict(layers=None, norm_first=True, activation="gelu", batch_first=False),
    "layer-activation-module-masks": dict(layers=None, activation=nn.GELU(), masks=True),
    "encoder-final-norm": dict(layers=2),
    "encoder-masks-causal": dict(layers=2, masks=True),
    "encoder-norm-first-seq-first-masks": dict(layers=2, norm_first=True, batch_first=False, masks=True),
}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(ENCODER_CASES))
def test_transformer_encoder(case, training):
    check_layer(lambda: Encoder(**copy.deepcopy(ENCODER_CASES[case])), (5, 8), training=training)


class Decoder(nn.Module):
    """A decoder layer, a decoder stack or a whole nn.Transformer as a member's child; the memory is the member's own
    sequence (a projection of the input, shorter than the target) or, for nn.Transformer, its encoder's output."""

    def __init__(self, kind: str, masks: bool = False, batch_first: bool = True, raw_memory: bool = False, **layer):
        super().__init__()
        self.kind, self.masks, self.batch_first, self.raw_memory = kind, masks, batch_first, raw_memory
        self.memory_proj = nn.Linear(8, 8)
        options = dict(dropout=layer.pop("dropout", 0.0), batch_first=batch_first, **layer)
        if kind == "layer":
            self.model = nn.TransformerDecoderLayer(8, 2, 16, **options)
        elif kind == "decoder":
            self.model = nn.TransformerDecoder(nn.TransformerDecoderLayer(8, 2, 16, **options), 2,
                                               norm=nn.LayerNorm(8))
        else:
            self.model = nn.Transformer(8, 2, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=16,
                                        **options)

    def forward(self, x):
        if not self.batch_first:
            x = x.transpose(0, 1)
        seq_dim = 1 if self.batch_first else 0
        # 3 source positions for 5 target ones; raw_memory: the input itself, shared by all members when it is
        memory = (x if self.raw_memory else self.memory_proj(x)).narrow(seq_dim, 0, 3)
        keywords = {}
        if self.masks:
            length = x.shape[seq_dim]
            keywords["tgt_mask"] = nn.Transformer.generate_square_subsequent_mask(length)
            batch_major = memory if self.batch_first else memory.transpose(0, 1)
            keywords["memory_key_padding_mask"] = ((batch_major.sum(-1) > 1.0) & (torch.arange(3) > 0)).float() * -1e9
        if self.kind == "transformer":
            return self.model(memory, x, **keywords)
        return self.model(x, memory, **keywords)


DECODER_CASES = {
    "layer": dict(kind="layer"),
    "layer-norm-first-seq-first-masks": dict(kind="layer", norm_first=True, batch_first=False, masks=True),
    "decoder-masks": dict(kind="decoder", masks=True),
    "decoder-input-as-memory": dict(kind="decoder", raw_memory=True),
    "transformer-masks": dict(kind="transformer", masks=True),
    "transformer-seq-first-gelu": dict(kind="transformer", batch_first=False, activation="gelu"),
}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(DECODER_CASES))
def test_transformer_decoder(case, training):
    check_layer(lambda: Decoder(**copy.deepcopy(DECODER_CASES[case])), (5, 8), training=training)


def test_transformer_layers_run_without_vmap(vmapped_layers):
    for factory in [lambda case=case: Encoder(**copy.deepcopy(ENCODER_CASES[case])) for case in ENCODER_CASES] + [
            lambda case=case: Decoder(**copy.deepcopy(DECODER_CASES[case])) for case in DECODER_CASES]:
        members = make_members(factory, n=2, seed=8)
        FusedEnsemble(members, reduction="none", member_inputs=True)(draw_input((5, 8), True))
    assert vmapped_layers == []


def test_transformer_encoder_dropout_draws_per_member():
    members = make_members(lambda: Encoder(layers=2, dropout=0.5), n=3, seed=9, training=True)
    for m in members[1:]:
        m.load_state_dict(members[0].state_dict())
    fused = FusedEnsemble(members, reduction="none")
    out = fused(draw_input((5, 8), False))
    assert not torch.equal(out[0], out[1]) and not torch.equal(out[1], out[2])
    fused.eval()
    with torch.no_grad():
        out = fused(draw_input((5, 8), False))
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def _tiny_vit():
    import torchvision

    return torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=8,
                                                mlp_dim=16, num_classes=5)


@pytest.mark.slow
@pytest.mark.parametrize("factory, sample_shape", [(_tiny_vit, (3, 16, 16)), (lambda: Encoder(2, masks=True), (5, 8))],
                         ids=["vit", "encoder-masks"])
def test_attention_and_transformer_rules_under_torch_compile_fullgraph(factory, sample_shape):
    """No graph break: the call rules (signature binding, masks) and the generic ops next to them (a ViT's torch.cat
    of class token and patches once broke the graph through fx's immutable_list)."""
    members = make_members(factory, n=2, seed=10)
    fused = FusedEnsemble(members, reduction="none")
    x = draw_input(sample_shape, False)
    torch._dynamo.reset()
    with torch.no_grad():
        assert_matches(torch.compile(fused, fullgraph=True)(x), member_loop(members, x))


@pytest.mark.gpu
@pytest.mark.parametrize("factory", [lambda: Encoder(2, masks=True), lambda: Decoder("transformer", masks=True)],
                         ids=["encoder-masks", "transformer-masks"])
def test_transformer_rules_on_cuda(factory):
    """The fused transformer layers on CUDA (scaled_dot_product_attention with the folded masks)."""
    check_on_cuda(factory, (5, 8), seed=16)
