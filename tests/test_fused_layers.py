"""FusedEnsemble layer by layer: small custom members that each exercise one rule or generic path of the
graph runner, against the member loop (outputs and parameter gradients), with a shared input and with
member inputs."""

from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fused_ensemble import FusedEnsemble
from member_factories import assert_grads_match, assert_matches, make_members, member_loop

N, BATCH = 2, 3


def draw_input(sample_shape, member_inputs: bool, n: int = N, batch: int = BATCH) -> torch.Tensor:
    return torch.randn(((n,) if member_inputs else ()) + (batch, *sample_shape))


def check_outputs_and_grads(factory: Callable[[], nn.Module], sample_shape, training: bool, seed: int,
                            n: int = 3) -> None:
    """As ``check_layer`` for members that return a tuple of tensors: each output against the member loop's, then
    every parameter gradient, in both input modes. An all-zero output of the loop is a placeholder (for attention
    weights not asked for): the fused module gives zeros or, where tracing kept the layer's None, None."""
    for member_inputs in (False, True):
        members = make_members(factory, n=n, seed=seed, training=training)
        x = draw_input(sample_shape, member_inputs, n=n)
        fused = FusedEnsemble(copy.deepcopy(members), reduction="none", member_inputs=member_inputs)
        outs = fused(x)
        refs = [torch.stack(parts) for parts in zip(*[m(x[i] if member_inputs else x) for i, m in enumerate(members)])]
        assert len(outs) == len(refs)
        for out, ref in zip(outs, refs):
            if ref.abs().max() > 0:
                assert_matches(out, ref)
            else:
                assert out is None or torch.equal(out, ref)
        weights = [torch.randn_like(ref) for ref in refs]
        sum((o * w).sum() for o, w in zip(outs, weights) if o is not None).backward()
        sum((r * w).sum() for r, w in zip(refs, weights)).backward()
        assert_grads_match(fused, members)


def check_layer(factory: Callable[[], nn.Module], sample_shape=None, *, draw=None, training: bool = False,
                n: int = N, modes=(False, True), grad: bool = True) -> None:
    """Fuses ``n`` members built by ``factory`` and checks, in each input mode of ``modes`` (False: shared input,
    True: member inputs), the output and every parameter gradient against the member loop.

    ``draw(member_inputs)`` makes the input instead of a random float tensor of ``sample_shape``.
    """
    for member_inputs in modes:
        members = make_members(factory, n=n, seed=1 + int(member_inputs), training=training)
        x = draw(member_inputs) if draw else draw_input(sample_shape, member_inputs, n)
        fused = FusedEnsemble(copy.deepcopy(members), reduction="none", member_inputs=member_inputs)
        out = fused(x)
        ref = member_loop(members, x, member_inputs)
        assert_matches(out, ref)
        if grad and any(p.requires_grad for p in members[0].parameters()):
            weights = torch.randn_like(ref)
            (out * weights).sum().backward()
            (ref * weights).sum().backward()
            assert_grads_match(fused, members)


# ---- convolutions --------------------------------------------------------------------------------------------

CONVOLUTIONS = {
    "conv2d": (lambda: nn.Conv2d(3, 4, 3), (3, 9, 9)),
    "conv2d-stride-pad-nobias": (lambda: nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=False), (3, 9, 9)),
    "conv2d-same-dilation": (lambda: nn.Conv2d(3, 4, 3, padding="same", dilation=2), (3, 9, 8)),
    "conv2d-same-even-kernel": (lambda: nn.Conv2d(3, 4, (2, 4), padding="same"), (3, 7, 8)),
    "conv2d-groups": (lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1), (4, 7, 7)),
    "conv2d-depthwise": (lambda: nn.Conv2d(4, 8, 3, groups=4, stride=2, bias=False), (4, 9, 9)),
    "conv2d-reflect": (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (3, 8, 8)),
    "conv2d-circular-asymmetric": (
        lambda: nn.Conv2d(3, 4, 3, stride=(1, 2), padding=(1, 2), padding_mode="circular"), (3, 8, 8)),
    "conv2d-replicate-same-groups": (
        lambda: nn.Conv2d(4, 4, 3, padding="same", padding_mode="replicate", groups=2), (4, 6, 6)),
    "conv1d-stride-pad": (lambda: nn.Conv1d(3, 4, 5, stride=2, padding=2), (3, 11)),
    "conv1d-groups-dilation-circular-same": (
        lambda: nn.Conv1d(4, 6, 3, groups=2, dilation=2, padding="same", padding_mode="circular"), (4, 10)),
    "conv1d-reflect-nobias": (lambda: nn.Conv1d(3, 5, 3, padding=1, padding_mode="reflect", bias=False), (3, 7)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 3, padding=1, stride=(1, 2, 2)), (2, 4, 5, 5)),
    "conv-transpose2d": (lambda: nn.ConvTranspose2d(3, 4, 3, stride=2), (3, 5, 5)),
    "conv-transpose2d-groups-outpad-dilation-nobias": (
        lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=2, bias=False),
        (4, 5, 6)),
    "conv-transpose1d": (lambda: nn.ConvTranspose1d(3, 2, 3, padding=1), (3, 6)),
    "conv-transpose3d-stride": (lambda: nn.ConvTranspose3d(2, 3, 2, stride=(1, 2, 2)), (2, 3, 4, 4)),
}


@pytest.mark.parametrize("position", ["first-layer", "after-conv"])
@pytest.mark.parametrize("name", CONVOLUTIONS)
def test_convolution(name, position):
    """``first-layer``: the conv reads the (shared) input itself; ``after-conv``: it reads a channel-packed
    activation of all members (the grouped-conv path)."""
    make_conv, shape = CONVOLUTIONS[name]

    def factory():
        conv = make_conv()
        if position == "first-layer":
            return nn.Sequential(conv)
        pointwise = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[len(conv.kernel_size) - 1]
        return nn.Sequential(pointwise(conv.in_channels, conv.in_channels, 1), nn.Tanh(), conv)
    check_layer(factory, shape)


# ---- linear --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sample_shape", [(6,), (4, 6), (2, 3, 6)], ids=["2d", "3d", "4d"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear(sample_shape, bias):
    check_layer(lambda: nn.Sequential(nn.Linear(6, 5, bias=bias), nn.GELU(), nn.Linear(5, 4, bias=bias)),
                sample_shape)


def test_linear_after_convolution_and_flatten():
    check_layer(lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5)),
                (2, 6, 6))


# ---- normalization -------------------------------------------------------------------------------------------

BATCH_NORMS = {
    "bn1d-2d-input": (lambda: nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6)), (5,)),
    "bn1d-2d-input-first-layer": (lambda: nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 3)), (5,)),
    "bn1d-3d-input": (lambda: nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4)), (3, 7)),
    "bn1d-3d-input-first-layer": (lambda: nn.Sequential(nn.BatchNorm1d(3), nn.Conv1d(3, 4, 3)), (3, 7)),
    "bn2d": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), (3, 6, 6)),
    "bn2d-no-affine": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False)), (3, 6, 6)),
    "bn2d-no-running-stats": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)), (3, 6, 6)),
    "bn2d-momentum-none": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None)), (3, 6, 6)),
    "bn2d-eps-momentum": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=1e-3, momentum=0.3)), (3, 6, 6)),
    "bn3d": (lambda: nn.Sequential(nn.Conv3d(2, 3, 2), nn.BatchNorm3d(3)), (2, 3, 4, 4)),
}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", BATCH_NORMS)
def test_batch_norm(name, training):
    factory, shape = BATCH_NORMS[name]
    check_layer(factory, shape, training=training)


NORMS = {
    "layernorm": (lambda: nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8)), (6,)),
    "layernorm-no-affine": (lambda: nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8, elementwise_affine=False)),
                            (6,)),
    "layernorm-no-bias": (lambda: nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8, bias=False)), (6,)),
    "layernorm-first-layer-3d": (lambda: nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 3)), (4, 6)),
    "layernorm-over-conv-channels": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.LayerNorm([4, 3, 3])),
                                     (2, 5, 5)),
    "groupnorm": (lambda: nn.Sequential(nn.Conv2d(3, 6, 3), nn.GroupNorm(3, 6)), (3, 6, 6)),
    "groupnorm-no-affine-1d": (lambda: nn.Sequential(nn.Conv1d(3, 6, 3), nn.GroupNorm(2, 6, affine=False)),
                               (3, 7)),
    "groupnorm-first-layer": (lambda: nn.Sequential(nn.GroupNorm(2, 4), nn.Conv2d(4, 3, 1)), (4, 5, 5)),
}


@pytest.mark.parametrize("name", NORMS)
def test_layer_and_group_norm(name):
    factory, shape = NORMS[name]
    check_layer(factory, shape, training=True)


# ---- embedding -----------------------------------------------------------------------------------------------

def draw_indices(member_inputs: bool, num_embeddings: int = 7, padding_idx: int | None = None) -> torch.Tensor:
    indices = torch.randint(0, num_embeddings, ((N,) if member_inputs else ()) + (BATCH, 5))
    if padding_idx is not None:
        indices[..., 0] = padding_idx  # make sure the padding row is read
    return indices


def test_embedding():
    check_layer(lambda: nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 3)), draw=draw_indices)


@pytest.mark.parametrize("member_inputs", [False, True], ids=["shared", "member_inputs"])
def test_embedding_padding_row_gets_no_gradient(member_inputs):
    factory = lambda: nn.Sequential(nn.Embedding(7, 4, padding_idx=2), nn.Tanh())  # noqa: E731
    check_layer(factory, draw=lambda m: draw_indices(m, padding_idx=2), modes=(member_inputs,))
    fused = FusedEnsemble(make_members(factory), reduction="none", member_inputs=member_inputs)
    fused(draw_indices(member_inputs, padding_idx=2)).square().sum().backward()
    grad = fused.stacked[0].weight.grad
    assert not grad[:, 2].any() and grad.any()


def test_embedding_scale_grad_by_freq_is_refused():
    members = [nn.Sequential(nn.Embedding(7, 4, scale_grad_by_freq=True), nn.Tanh()) for _ in range(2)]
    with pytest.raises(TypeError, match=r"layer '0' \(Embedding\).*scale_grad_by_freq"):
        FusedEnsemble(members)


# ---- dropout -------------------------------------------------------------------------------------------------

def dropped_fraction_per_member(out: torch.Tensor, kept_value: torch.Tensor, p: float) -> torch.Tensor:
    """Checks every element of ``out`` [N, ...] is 0 or ``kept_value / (1 - p)``; returns the dropped masks."""
    dropped = out == 0
    torch.testing.assert_close(torch.where(dropped, 0.0, out),
                               torch.where(dropped, 0.0, kept_value / (1 - p)).expand_as(out))
    return dropped


class FunctionalDropout(nn.Module):
    """Dropout called as a function on the member's input (no nn.Dropout module to hang a rule on)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, self.training)


DROPOUTS = {
    "module-on-shared-input": lambda: nn.Sequential(nn.Dropout(0.5)),
    "module-after-identity": lambda: nn.Sequential(nn.Identity(), nn.Dropout(0.5)),
    "dropout2d-on-shared-input": lambda: nn.Sequential(nn.Dropout2d(0.5)),
    "functional-on-shared-input": lambda: FunctionalDropout(0.5),
}


@pytest.mark.parametrize("name", list(DROPOUTS))
def test_dropout_masks_differ_between_members(name):
    members = make_members(DROPOUTS[name], n=3, training=True)
    fused = FusedEnsemble(members, reduction="none")
    x = torch.rand(4, 6, 5, 5) + 0.5  # no zeros of its own
    out = fused(x)
    assert out.shape == (3, *x.shape)
    dropped = dropped_fraction_per_member(out, x, 0.5)
    if name.startswith("dropout2d"):
        assert (dropped.all((-1, -2)) == dropped.any((-1, -2))).all(), "Dropout2d drops whole channels"
    for i in range(3):
        for j in range(i):
            assert not torch.equal(dropped[i], dropped[j]), f"members {i} and {j} share a dropout mask"
    assert 0.3 < dropped.float().mean() < 0.7
    fused.eval()
    assert torch.equal(fused(x), x.expand_as(out)), "dropout is the identity in eval mode"


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_stochastic_depth_is_the_identity_in_eval_mode(mode):
    from torchvision.ops import StochasticDepth

    check_layer(lambda: nn.Sequential(nn.Conv2d(3, 4, 1), StochasticDepth(0.5, mode)), (3, 4, 4))


def test_stochastic_depth_draws_per_member_in_train_mode():
    from torchvision.ops import StochasticDepth

    members = make_members(lambda: nn.Sequential(nn.Identity(), StochasticDepth(0.5, "row")), n=3, training=True)
    x = torch.rand(64, 3, 2, 2) + 0.5
    out = FusedEnsemble(members, reduction="none")(x)
    dropped = dropped_fraction_per_member(out, x, 0.5)
    assert (dropped.all((2, 3, 4)) == dropped.any((2, 3, 4))).all(), "stochastic depth drops whole rows"
    assert not torch.equal(dropped[0], dropped[1]) and not torch.equal(dropped[1], dropped[2])


def test_dropout_on_member_first_activation_in_train_mode():
    members = make_members(lambda: nn.Sequential(nn.Linear(6, 200), nn.Dropout(0.25)), n=2, training=True)
    fused = FusedEnsemble(members, reduction="none")
    x = torch.randn(3, 6)
    out = fused(x)
    with torch.no_grad():
        kept = member_loop([m[0] for m in members], x)
    dropped = dropped_fraction_per_member(out, kept, 0.25)
    assert not torch.equal(dropped[0], dropped[1])


# ---- pooling, activations ------------------------------------------------------------------------------------

POOLINGS = {
    "maxpool2d": lambda: nn.MaxPool2d(2),
    "maxpool2d-stride-pad-ceil": lambda: nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
    "avgpool2d-no-pad-count": lambda: nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
    "adaptive-avg": lambda: nn.AdaptiveAvgPool2d((2, 3)),
    "adaptive-max": lambda: nn.AdaptiveMaxPool2d(1),
    "lppool": lambda: nn.LPPool2d(2, 2),
}


@pytest.mark.parametrize("position", ["first-layer", "after-conv"])
@pytest.mark.parametrize("name", POOLINGS)
def test_pooling(name, position):
    def factory():
        pool, pointwise = POOLINGS[name](), nn.Conv2d(3, 3, 1)
        layers = [pool, pointwise] if position == "first-layer" else [pointwise, pool]
        return nn.Sequential(*layers, nn.Tanh())
    check_layer(factory, (3, 7, 7))


class FunctionalPools(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return torch.cat([F.max_pool1d(y, 2), F.avg_pool1d(y, 2), F.adaptive_max_pool1d(y, 4)], -1)


def test_functional_pooling_1d():
    check_layer(FunctionalPools, (3, 10))


ACTIVATIONS = {
    "relu6": nn.ReLU6, "gelu-tanh": lambda: nn.GELU(approximate="tanh"), "silu": nn.SiLU,
    "hardswish": nn.Hardswish, "leaky": lambda: nn.LeakyReLU(0.1), "elu": nn.ELU, "softplus": nn.Softplus,
    "softmax-channels": lambda: nn.Softmax(dim=1), "log-softmax-last": lambda: nn.LogSoftmax(dim=-1),
    "prelu-per-channel": lambda: nn.PReLU(4), "mish": nn.Mish,
}


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation(name):
    check_layer(lambda: nn.Sequential(nn.Conv2d(3, 4, 1), ACTIVATIONS[name](), nn.Conv2d(4, 2, 1)), (3, 4, 4))


class FunctionalActivations(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 6)

    def forward(self, x):
        y = self.fc(x)
        return torch.tanh(y) + F.gelu(y) * y.sigmoid() - F.softmax(y, dim=1) + torch.clamp(y, -0.5, 0.5).exp()


def test_functional_activations():
    check_layer(FunctionalActivations, (5,))


# ---- residuals, concatenation, reshapes ----------------------------------------------------------------------

class ResidualAttention(nn.Module):
    """A residual block, a squeeze-excitation gate (x.size(0)-dependent view) and a one-channel spatial gate."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.squeeze = nn.Linear(channels, channels)
        self.spatial = nn.Conv2d(channels, 1, 1)

    def forward(self, x):
        y = self.stem(x)
        z = torch.relu(self.bn(self.conv(y))) + y
        gate = torch.sigmoid(self.squeeze(F.adaptive_avg_pool2d(z, 1).flatten(1)))
        z = z * gate.view(z.size(0), -1, 1, 1)
        z = z * torch.sigmoid(self.spatial(z))
        return z.mul(2.0).sub(y)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_residual_add_and_multiplicative_gates(training):
    check_layer(ResidualAttention, (3, 6, 6), training=training)


class DenseConcat(nn.Module):
    """DenseNet-style channel concatenation, plus concatenation along width, batch and features."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 2, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 3, 1)
        self.fc_a = nn.Linear(3, 2)
        self.fc_b = nn.Linear(3, 5)

    def forward(self, x):
        y = self.conv0(x)
        y = torch.cat([y, self.conv1(y)], 1)                      # channels, both channel-packed
        y = torch.cat((self.conv2(y), self.conv2(y.flip(2))), dim=-1)  # width
        y = torch.cat([y, y * 0.5], 0)                            # batch
        pooled = y.mean((2, 3))
        return torch.cat([self.fc_a(pooled), self.fc_b(pooled)], dim=1)  # features, member-first


def test_concatenation():
    check_layer(DenseConcat, (3, 5, 5))


class ConcatWithSharedInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.mix = nn.Conv2d(5, 2, 1)

    def forward(self, x):
        return self.mix(torch.concat([x, self.conv(x)], dim=1))


def test_concatenation_of_the_input_with_an_activation():
    check_layer(ConcatWithSharedInput, (3, 4, 4))


class Reshapes(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc = nn.Linear(4 * 3 * 3, 6)
        self.fc2 = nn.Linear(3, 2)

    def forward(self, x):
        y = self.conv(x)
        a = y.view(y.size(0), -1)
        b = torch.flatten(y, 1)
        c = y.reshape(y.shape[0], 4, 9).transpose(1, 2).permute(0, 2, 1).contiguous().flatten(1)
        z = self.fc(a + b - c)
        z = z.reshape(-1, 2, 3)
        return self.fc2(z).flatten(start_dim=1).unsqueeze(-1).squeeze(-1)


def test_flatten_view_reshape():
    check_layer(Reshapes, (2, 5, 5))


def test_nested_sequential():
    check_layer(lambda: nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.BatchNorm2d(4), nn.ReLU())),
        nn.Sequential(nn.Sequential(nn.Flatten()), nn.Linear(4 * 3 * 3, 3))), (3, 5, 5), training=True)


# ---- custom modules, layers without a rule -------------------------------------------------------------------

class RawParameters(nn.Module):
    """Functional code on raw parameters and buffers (read through get_attr nodes)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.scale = nn.Parameter(torch.randn(4, 1, 1))
        self.weight = nn.Parameter(torch.randn(5, 4))
        self.bias = nn.Parameter(torch.randn(5))
        self.register_buffer("center", torch.randn(4, 1, 1))

    def forward(self, x):
        y = (self.conv(x) - self.center) * self.scale
        y = y.mean(dim=(-1, -2))
        return F.linear(y, self.weight, self.bias) + self.bias.sum() * 0.1


def test_raw_parameters_and_buffers_in_functional_code():
    check_layer(RawParameters, (3, 6, 6))


class ModeDependent(nn.Module):
    """Python control flow on ``self.training`` (not on tensor values): traced once per mode."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.fc(x)
        return y * 2 if self.training else y - 1


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_control_flow_on_training_flag(training):
    check_layer(ModeDependent, (4,), training=training)


class TwoInputsTupleOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(2, 3)

    def forward(self, x, y):
        h = self.a(x) + self.b(y)
        return h.relu(), h.sum(-1)


@pytest.mark.parametrize("member_inputs", [False, True], ids=["shared", "member_inputs"])
def test_several_inputs_and_a_tuple_output(member_inputs):
    members = make_members(TwoInputsTupleOutput, n=3)
    lead = (3,) if member_inputs else ()
    x, y = torch.randn(*lead, 2, 4), torch.randn(*lead, 2, 2)
    fused = FusedEnsemble(members, reduction="none", member_inputs=member_inputs)
    out = fused(x, y)
    refs = [m(x[i], y[i]) if member_inputs else m(x, y) for i, m in enumerate(members)]
    for position in range(2):
        assert_matches(out[position], torch.stack([r[position] for r in refs]))


class UpsampleToSize(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.up = nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1)

    def forward(self, x):
        return self.up(self.conv(x), output_size=[x.shape[-2] * 2, x.shape[-1] * 2])


class SelfBilinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.bilinear = nn.Bilinear(6, 6, 4)

    def forward(self, x):
        return self.bilinear(x, torch.tanh(x))


LEAVES_WITHOUT_RULES = {
    "bilinear": (SelfBilinear, (6,)),
    "conv-transpose2d-output-size": (lambda: UpsampleToSize(), (3, 5, 5)),  # a call the rule leaves to vmap
}


NORMS_AND_SLOPES = {
    "prelu-per-channel": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.PReLU(4)), (3, 5, 5)),
    "prelu-one-slope-first-layer": (lambda: nn.Sequential(nn.PReLU()), (3, 5, 5)),
    "prelu-linear": (lambda: nn.Sequential(nn.Linear(6, 5), nn.PReLU(5)), (6,)),
    "instance-norm-affine": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, affine=True)), (3, 5, 5)),
    "instance-norm1d-running-stats": (lambda: nn.Sequential(
        nn.Conv1d(3, 4, 3), nn.InstanceNorm1d(4, affine=True, track_running_stats=True)), (3, 9)),
    "instance-norm3d-first-layer": (lambda: nn.Sequential(nn.InstanceNorm3d(2)), (2, 3, 4, 4)),
    "rms-norm": (lambda: nn.Sequential(nn.Linear(6, 8), nn.RMSNorm(8)), (4, 6)),
    "rms-norm-no-weight-first-layer": (lambda: nn.Sequential(nn.RMSNorm([4, 6], elementwise_affine=False)),
                                       (4, 6)),
}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", NORMS_AND_SLOPES)
def test_prelu_instance_and_rms_norm(name, training):
    factory, shape = NORMS_AND_SLOPES[name]
    check_layer(factory, shape, training=training)


def test_instance_norm_running_statistics_update_as_in_the_loop():
    members = make_members(lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, track_running_stats=True)),
                           n=3, seed=11, training=True)
    fused = FusedEnsemble(copy.deepcopy(members), reduction="none", member_inputs=True)
    for _ in range(2):
        x = draw_input((3, 6, 6), True, n=3)
        fused(x)
        member_loop(members, x, True)
    for index, (ours, theirs) in enumerate(zip(fused.to_members(), members)):
        for (name, got), expected in zip(ours.named_buffers(), theirs.buffers()):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"member {index} {name}: {m}")
    assert not torch.equal(fused.to_members()[0][1].running_mean, fused.to_members()[1][1].running_mean)


@pytest.mark.parametrize("name", LEAVES_WITHOUT_RULES)
def test_layer_with_parameters_and_no_rule_runs_through_vmap(name):
    factory, shape = LEAVES_WITHOUT_RULES[name]
    check_layer(factory, shape)


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


@pytest.fixture
def vmapped_layers(monkeypatch):
    """The type names of the layers run through vmap(functional_call), in call order."""
    calls = []
    real_call = torch.func.functional_call

    def recording_call(module, *args, **kwargs):
        calls.append(type(module).__name__)
        return real_call(module, *args, **kwargs)
    monkeypatch.setattr(torch.func, "functional_call", recording_call)
    return calls


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


@pytest.mark.parametrize("norm", [lambda: nn.LayerNorm(8), lambda: nn.RMSNorm(8)], ids=["layer_norm", "rms_norm"])
def test_norms_keep_the_autocast_dtype(norm):
    """Under CPU autocast layer_norm returns bfloat16 (as nn.LayerNorm does): the per-member affine must not promote
    it back to float32."""
    members = make_members(lambda: nn.Sequential(nn.Linear(8, 8), norm()), n=2, seed=12)
    x = draw_input((8,), False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = FusedEnsemble(members, reduction="none")(x)
        ref = member_loop(members, x)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


class Recurrent(nn.Module):
    """An RNN / LSTM / GRU after a Linear; returns the sequence output and the final states."""

    def __init__(self, kind: str, with_state: bool = False, batch_first: bool = True, **layer):
        super().__init__()
        self.kind, self.with_state, self.batch_first = kind, with_state, batch_first
        self.encoder = nn.Linear(6, 8)
        self.rnn = getattr(nn, kind)(8, 5, batch_first=batch_first, **layer)
        self.states = layer.get("num_layers", 1) * (2 if layer.get("bidirectional") else 1)
        self.h_size = layer.get("proj_size") or 5
        # initial states from the data: h_0 [layers * directions, B, h_size], c_0 (LSTM) [..., 5]
        self.h0_proj = nn.Linear(6, self.states * self.h_size)
        self.c0_proj = nn.Linear(6, self.states * 5)

    def forward(self, x):
        h = self.encoder(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        if not self.with_state:
            result = self.rnn(h)
        else:
            first = x[:, 0]
            h0 = torch.tanh(self.h0_proj(first)).unflatten(-1, (self.states, self.h_size)).transpose(0, 1)
            if self.kind == "LSTM":
                c0 = torch.tanh(self.c0_proj(first)).unflatten(-1, (self.states, 5)).transpose(0, 1)
                result = self.rnn(h, (h0.contiguous(), c0.contiguous()))
            else:
                result = self.rnn(h, h0.contiguous())
        out, state = result[0], result[1]  # torch.fx cannot unpack a layer's output
        if self.kind == "LSTM":
            return out, state[0], state[1]
        return out, state


RECURRENT_CASES = {
    "lstm": dict(kind="LSTM"),
    "lstm-2-layers-bidirectional-state": dict(kind="LSTM", num_layers=2, bidirectional=True, with_state=True),
    "lstm-proj-seq-first-state": dict(kind="LSTM", proj_size=3, batch_first=False, with_state=True),
    "gru-state": dict(kind="GRU", with_state=True),
    "gru-2-layers-seq-first": dict(kind="GRU", num_layers=2, batch_first=False),
    "rnn-relu-bidirectional-state": dict(kind="RNN", nonlinearity="relu", bidirectional=True, with_state=True),
}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(RECURRENT_CASES))
def test_recurrent_layers(case, training):
    """Outputs and final states, and every gradient, against the member loop."""
    check_outputs_and_grads(lambda: Recurrent(**RECURRENT_CASES[case]), (4, 6), training, seed=13)


def test_recurrent_members_come_back_as_ordinary_layers():
    members = make_members(lambda: Recurrent("LSTM", num_layers=2), n=2, seed=14)
    fused = FusedEnsemble(copy.deepcopy(members), reduction="none")
    unfused = fused.to_members()[1]
    assert "flatten_parameters" not in unfused.rnn.__dict__  # packs its weights again (on CUDA)
    assert all(w is getattr(unfused.rnn, name) for w, name in zip(unfused.rnn._flat_weights,
                                                                  unfused.rnn._flat_weights_names))
    x = draw_input((4, 6), False)
    for ours, theirs in zip(unfused(x), members[1](x)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.gpu
def test_recurrent_layers_on_cuda():
    """On CUDA the stacked layer must not pack its [N, ...] weights (moving it there would), and each member's call
    runs cuDNN on that member's slices."""
    members = [m.cuda() for m in make_members(lambda: Recurrent("LSTM", num_layers=2, with_state=True), n=3,
                                                  seed=15)]
    fused = FusedEnsemble(copy.deepcopy(members), reduction="none", member_inputs=True).cuda()
    x = draw_input((4, 6), True, n=3).cuda()
    with torch.no_grad():
        for out, ref in zip(fused(x), [torch.stack(parts) for parts in zip(*[m(x[i]) for i, m in
                                                                              enumerate(members)])]):
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("factory", [lambda: Encoder(2, masks=True), lambda: Decoder("transformer", masks=True),
                                     lambda: AttentionCall("cross_kv_shared")],
                         ids=["encoder-masks", "transformer-masks", "attention-weights"])
def test_attention_rules_on_cuda(factory):
    """The fused attention on CUDA (scaled_dot_product_attention with the folded masks; explicit weights)."""
    members = [m.cuda() for m in make_members(factory, n=3, seed=16)]
    fused = FusedEnsemble(copy.deepcopy(members), reduction="none", member_inputs=True).cuda()
    x = draw_input((5, 8), True, n=3).cuda()
    with torch.no_grad():
        outs = fused(x)
        refs = [m(x[i]) for i, m in enumerate(members)]
    outs = outs if isinstance(outs, tuple) else (outs,)
    refs = [torch.stack(parts) for parts in zip(*[r if isinstance(r, tuple) else (r,) for r in refs])]
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_recurrent_layers_under_torch_compile_fullgraph(monkeypatch):
    """Dynamo traces recurrent layers only with allow_rnn (for the members too): then the fused ensemble compiles."""
    monkeypatch.setattr(torch._dynamo.config, "allow_rnn", True)
    members = make_members(lambda: Recurrent("GRU", with_state=True), n=2, seed=17)
    fused = FusedEnsemble(members, reduction="none")
    x = draw_input((4, 6), False)
    torch._dynamo.reset()
    with torch.no_grad():
        for out, ref in zip(torch.compile(fused, fullgraph=True)(x), [torch.stack(p) for p in zip(*[m(x) for m in
                                                                                                  members])]):
            assert_matches(out, ref)
