"""The graph runner's generic paths against the member loop: pooling and activations run unchanged, residuals,
concatenation and reshapes, custom modules with raw parameters, several inputs, and layers with parameters but no
rule under vmap."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fused_ensemble import FusedEnsemble

from layer_checks import check_layer
from member_factories import assert_matches, make_members

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


@pytest.mark.parametrize("name", LEAVES_WITHOUT_RULES)
def test_layer_with_parameters_and_no_rule_runs_through_vmap(name):
    factory, shape = LEAVES_WITHOUT_RULES[name]
    check_layer(factory, shape)
