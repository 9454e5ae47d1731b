"""A member that is one torch.nn layer (a leaf for torch.fx) fuses as the same layer inside nn.Sequential: through
its rule, the hooks machinery and the generic paths, for the call the user makes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fused_ensemble import FusedEnsemble

from layer_checks import check_layer, check_outputs_and_grads, draw_input
from member_factories import assert_grads_match, assert_matches, make_members

TRAIN_EVAL = pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])


@pytest.mark.parametrize("factory, sample_shape", [
    (lambda: nn.Linear(4, 3), (4,)),
    (lambda: nn.Conv2d(3, 4, 3, padding=1, stride=2), (3, 6, 6)),
    (lambda: nn.LayerNorm(5), (2, 5)),
    (lambda: nn.ConvTranspose2d(3, 2, 3, stride=2), (3, 4, 4)),
    (lambda: nn.PReLU(3), (3, 4)),
    (lambda: nn.Bilinear(4, 4, 2), None),
], ids=["linear", "conv2d", "layernorm", "conv-transpose2d", "prelu", "bilinear-generic"])
@TRAIN_EVAL
def test_one_input_layer(factory, sample_shape, training):
    if sample_shape is None:  # two inputs: the generic vmap(functional_call) path
        for member_inputs in (False, True):
            members = make_members(factory, n=3, seed=int(member_inputs), training=training)
            x, y = draw_input((4,), member_inputs, n=3), draw_input((4,), member_inputs, n=3)
            fused = FusedEnsemble(copy.deepcopy(members), reduction="none", member_inputs=member_inputs)
            out = fused(x, y)
            ref = torch.stack([m(x[i], y[i]) if member_inputs else m(x, y) for i, m in enumerate(members)])
            assert_matches(out, ref)
        return
    check_layer(factory, sample_shape, training=training)


@TRAIN_EVAL
def test_batch_norm_1d_and_its_running_statistics(training):
    for member_inputs in (False, True):
        members = make_members(lambda: nn.BatchNorm1d(4), n=3, seed=2, training=training)
        fused = FusedEnsemble(copy.deepcopy(members), reduction="none", member_inputs=member_inputs)
        for _ in range(2):
            x = draw_input((4, 5), member_inputs, n=3)
            out = fused(x)
            ref = torch.stack([m(x[i] if member_inputs else x) for i, m in enumerate(members)])
            assert_matches(out, ref)
        (out * out).sum().backward()
        (ref * ref).sum().backward()
        assert_grads_match(fused, members)
        for index, member in enumerate(fused.to_members()):
            for name, value in member.state_dict().items():
                torch.testing.assert_close(value, members[index].state_dict()[name])


def test_conv_transpose_2d_with_and_without_output_size():
    for member_inputs in (False, True):
        members = make_members(lambda: nn.ConvTranspose2d(3, 2, 3, stride=2), n=3, seed=3)
        fused = FusedEnsemble(copy.deepcopy(members), reduction="none", member_inputs=member_inputs)
        x = draw_input((3, 4, 4), member_inputs, n=3)
        for keywords in ({}, {"output_size": [9, 9]}, {"output_size": (10, 10)}):
            out = fused(x, **keywords)
            ref = torch.stack([m(x[i] if member_inputs else x, **keywords) for i, m in enumerate(members)])
            assert out.shape[-2:] == ref.shape[-2:]
            assert_matches(out, ref)
        weights = torch.randn_like(ref)
        (out * weights).sum().backward()
        (ref * weights).sum().backward()
        assert_grads_match(fused, members)


@TRAIN_EVAL
def test_gru(training):
    check_outputs_and_grads(lambda: nn.GRU(4, 5, num_layers=2, batch_first=True), (6, 4), training, seed=4)


def test_gru_with_an_initial_state_is_a_second_call_shape():
    members = make_members(lambda: nn.GRU(4, 5, batch_first=True), n=3, seed=5)
    fused = FusedEnsemble(copy.deepcopy(members), reduction="none", member_inputs=True)
    x, h = torch.randn(3, 2, 6, 4), torch.randn(3, 1, 2, 5)
    for args in ((x,), (x, h)):
        outs = fused(*args)
        refs = [m(*(a[i] for a in args)) for i, m in enumerate(members)]
        for out, ref in zip(outs, zip(*refs)):
            assert_matches(out, torch.stack(ref))
    assert_matches(fused(x, hx=h)[0], torch.stack([m(x[i], hx=h[i])[0] for i, m in enumerate(members)]))


@TRAIN_EVAL
def test_transformer_encoder_layer(training):
    factory = lambda: nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)  # noqa
    check_layer(factory, (5, 8), training=training)


def test_transformer_encoder_layer_with_a_padding_mask():
    members = make_members(lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), n=3, seed=6)
    fused = FusedEnsemble(copy.deepcopy(members), reduction="none")
    x = torch.randn(2, 5, 8)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[:, 3:] = True
    with torch.no_grad():
        out = fused(x, src_key_padding_mask=mask)
        ref = torch.stack([m(x, src_key_padding_mask=mask) for m in members])
    assert_matches(out[:, :, :3], ref[:, :, :3])  # torch's eval fast path may zero the padded positions


@pytest.mark.parametrize("member_inputs", [False, True], ids=["shared", "member_inputs"])
def test_embedding_padding_row_gets_no_gradient_in_any_member(member_inputs):
    members = make_members(lambda: nn.Embedding(7, 4, padding_idx=2), n=3, seed=7)
    fused = FusedEnsemble(copy.deepcopy(members), reduction="none", member_inputs=member_inputs)
    indices = torch.randint(0, 7, ((3,) if member_inputs else ()) + (4, 5))
    indices[..., 0] = 2
    out = fused(indices)
    ref = torch.stack([m(indices[i] if member_inputs else indices) for i, m in enumerate(members)])
    assert_matches(out, ref)
    weights = torch.randn_like(ref)
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    grad = fused.stacked.weight.grad
    assert not grad[:, 2].any(), "the padding row got a gradient"
    assert_grads_match(fused, members)


@TRAIN_EVAL
@pytest.mark.parametrize("member_inputs", [False, True], ids=["shared", "member_inputs"])
def test_multihead_attention(member_inputs, training):
    members = make_members(lambda: nn.MultiheadAttention(8, 2, dropout=0.0, batch_first=True), n=3, seed=8,
                           training=training)
    fused = FusedEnsemble(copy.deepcopy(members), reduction="none", member_inputs=member_inputs)
    q, kv = draw_input((4, 8), member_inputs, n=3), draw_input((6, 8), member_inputs, n=3)

    def loop(*args, **keywords):
        return [m(*(a[i] if member_inputs else a for a in args), **keywords) for i, m in enumerate(members)]

    outs = fused(q, kv, kv)
    refs = loop(q, kv, kv)
    assert_matches(outs[0], torch.stack([r[0] for r in refs]))
    assert_matches(outs[1], torch.stack([r[1] for r in refs]))
    out, weights = fused(q, kv, kv, need_weights=False)
    ref = torch.stack([r[0] for r in loop(q, kv, kv, need_weights=False)])
    assert weights is None
    assert_matches(out, ref)
    grad_weights = torch.randn_like(ref)
    (out * grad_weights).sum().backward()
    (ref * grad_weights).sum().backward()
    assert_grads_match(fused, members)


def test_hooks_on_the_stacked_root_run_as_a_layers():
    members = make_members(lambda: nn.Conv2d(3, 4, 3), n=2, seed=9)
    fused = FusedEnsemble(copy.deepcopy(members), reduction="none")
    seen = []
    fused.stacked.register_forward_pre_hook(lambda module, args: args[0] * 2)
    fused.stacked.register_forward_hook(lambda module, args, out: seen.append(out.shape) or out + 1)
    x = torch.randn(5, 3, 6, 6)
    with torch.no_grad():
        assert_matches(fused(x), torch.stack([m(x * 2) + 1 for m in members]))
    assert seen == [torch.Size([2, 5, 4, 4, 4])]


def test_errors_name_the_member_layer():
    with pytest.raises(TypeError, match=r"cannot fuse the member layer \(SyncBatchNorm\): SyncBatchNorm layers are "
                                        "not supported"):
        FusedEnsemble([nn.SyncBatchNorm(4), nn.SyncBatchNorm(4)])
    fused = FusedEnsemble([nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)], member_inputs=True)
    with pytest.raises(ValueError, match=r"the member layer \(Conv2d\): Conv2d in a FusedEnsemble needs batched"):
        fused(torch.randn(2, 3, 8, 8))


def test_optimize_a_single_layer_member():
    members = make_members(lambda: nn.Conv2d(3, 4, 3), n=2, seed=10)
    fused = FusedEnsemble(copy.deepcopy(members), reduction="none")
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert_matches(fused.optimize(x)(x), torch.stack([m(x) for m in members]))


def test_copies_trace_their_own_call_shapes():
    members = make_members(lambda: nn.MultiheadAttention(8, 2, batch_first=True), n=2, seed=11)
    fused = FusedEnsemble(copy.deepcopy(members), reduction="none")
    q = torch.randn(2, 4, 8)
    with torch.no_grad():
        expected = fused(q, q, q, need_weights=False)[0]
        twin = copy.deepcopy(fused)
        for parameter in twin.parameters():
            parameter.mul_(0.5)
        assert torch.equal(fused(q, q, q, need_weights=False)[0], expected)
        halved = [copy.deepcopy(m) for m in members]
        for member in halved:
            for parameter in member.parameters():
                parameter.mul_(0.5)
        assert_matches(twin(q, q, q, need_weights=False)[0],
                       torch.stack([m(q, q, q, need_weights=False)[0] for m in halved]))
