"""Random architectures from the supported layers, fused against the member loop.

Hypothesis draws a network (a 1-D or 2-D convolutional stage, or token embeddings fed to a 1-D one; convolutions of
random kernel, stride, padding, padding mode, groups, dilation and bias; BatchNorm, GroupNorm, LayerNorm and
InstanceNorm; activations; pooling; dropout in eval mode; residual additions; channel concatenation; then flatten
and a Linear stage), or now and then a member that is one such layer alone, a mode (train or eval), a batch size
(empty ones too, in eval mode) and a number of members, and checks in both input modes (shared and per member) the
outputs, every parameter gradient and the buffers after the forward against the member loop, in float64.
Derandomized and bounded (``max_examples``), so the suite is reproducible; the whole file takes about 20 s on a
2-core CPU.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from fused_ensemble import FusedEnsemble

from member_factories import assert_grads_match, assert_matches, make_members

REL = 1e-9
"""float64: the fused ops and the loop differ by rounding only."""

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU, "leaky": lambda: nn.LeakyReLU(0.2),
               "hardswish": nn.Hardswish, "elu": nn.ELU}


class Residual(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class Concat(nn.Module):
    """Two branches concatenated along the channels (DenseNet, Inception)."""

    def __init__(self, left: nn.Module, right: nn.Module):
        super().__init__()
        self.left, self.right = left, right

    def forward(self, x):
        return torch.cat([self.left(x), self.right(x)], dim=1)


class Tokens(nn.Module):
    """Token embeddings ``[B, L] -> [B, D, L]`` for a 1-D convolutional stage."""

    def __init__(self, vocabulary: int, dim: int, padding_idx: int | None):
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, dim, padding_idx=padding_idx)

    def forward(self, tokens):
        return self.embedding(tokens).transpose(1, 2)


class Net(nn.Module):
    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@dataclass(frozen=True)
class Architecture:
    spec: list[tuple]
    sample: tuple[int, ...]  # one sample's shape: [C, *sizes], or [L] tokens
    vocabulary: int | None  # token inputs
    training: bool
    batch: int
    single_layer: bool  # the member is the one layer of spec, not a Net of it

    def build(self) -> nn.Module:
        spec = copy.deepcopy(self.spec)
        return _layer(*spec[0]) if self.single_layer else build(spec)


def build(spec: list[tuple]) -> nn.Module:
    return Net([_layer(kind, options) for kind, options in spec])


def _layer(kind: str, options: dict) -> nn.Module:
    if kind == "tokens":
        return Tokens(**options)
    if kind == "conv":
        spatial = options.pop("spatial")
        return (nn.Conv1d, nn.Conv2d)[spatial - 1](**options)
    if kind == "batchnorm":
        return (nn.BatchNorm1d, nn.BatchNorm2d)[options.pop("spatial") - 1](**options)
    if kind == "instancenorm":
        return (nn.InstanceNorm1d, nn.InstanceNorm2d)[options.pop("spatial") - 1](**options)
    if kind == "groupnorm":
        return nn.GroupNorm(**options)
    if kind == "layernorm":
        return nn.LayerNorm(**options)
    if kind == "activation":
        return ACTIVATIONS[options["name"]]()
    if kind == "pool":
        spatial, pool, size = options["spatial"], options["pool"], options["size"]
        if pool == "adaptive":
            return (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)[spatial - 1](size)
        return ((nn.MaxPool1d, nn.MaxPool2d), (nn.AvgPool1d, nn.AvgPool2d))[pool == "avg"][spatial - 1](size)
    if kind == "dropout":
        return (nn.Dropout, nn.Dropout1d, nn.Dropout2d)[options["channels"]](options["p"])
    if kind == "residual":
        return Residual(build(options["body"]))
    if kind == "concat":
        return Concat(build(options["left"]), build(options["right"]))
    if kind == "flatten":
        return nn.Flatten()
    if kind == "linear":
        return nn.Linear(**options)
    if kind == "embedding":
        return nn.Embedding(**options)
    raise ValueError(kind)


@st.composite
def convolutions(draw, channels: int, sizes: tuple[int, ...], same_shape: bool = False):
    """A convolution that fits ``[channels, *sizes]``: (spec entry, output channels, output sizes). With
    ``same_shape`` it keeps the shape (a residual body)."""
    spatial = len(sizes)
    groups = draw(st.sampled_from([g for g in (1, 2, 3) if channels % g == 0]))
    out_channels = channels if same_shape else groups * draw(st.integers(1, 3))
    kernel = draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2))
    stride = 1 if same_shape else draw(st.integers(1, 2))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    reach = dilation * (kernel - 1)
    if same_shape or draw(st.booleans()) and stride == 1:
        padding = "same"
        if mode != "zeros" and reach // 2 + reach % 2 >= min(sizes):
            mode = "zeros"  # reflect/circular padding must stay inside the input
    else:
        limit = min(sizes) - 1 if mode != "zeros" else reach
        padding = draw(st.integers(0, max(0, min(reach, limit))))
    out_sizes = sizes if padding == "same" else tuple((s + 2 * padding - reach - 1) // stride + 1 for s in sizes)
    if min(out_sizes) < 1:
        padding, mode, dilation, kernel, stride = 0, "zeros", 1, 1, 1
        out_sizes = sizes
    entry = ("conv", dict(spatial=spatial, in_channels=channels, out_channels=out_channels, kernel_size=kernel,
                          stride=stride, padding=padding, dilation=dilation, groups=groups,
                          bias=draw(st.booleans()), padding_mode=mode))
    return entry, out_channels, out_sizes


@st.composite
def normalizations(draw, channels: int, sizes: tuple[int, ...]):
    spatial = len(sizes)
    kinds = ["batchnorm", "groupnorm", "layernorm"] + (["instancenorm"] if min(sizes) > 1 else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "batchnorm":
        return kind, dict(spatial=spatial, num_features=channels, momentum=draw(st.sampled_from([0.1, None])),
                          affine=draw(st.booleans()))
    if kind == "instancenorm":
        return kind, dict(spatial=spatial, num_features=channels, affine=draw(st.booleans()),
                          track_running_stats=draw(st.booleans()))
    if kind == "groupnorm":
        groups = draw(st.sampled_from([g for g in range(1, channels + 1) if channels % g == 0]))
        return kind, dict(num_groups=groups, num_channels=channels, affine=draw(st.booleans()))
    return kind, dict(normalized_shape=sizes[-1], elementwise_affine=draw(st.booleans()))


@st.composite
def single_layers(draw, training: bool) -> Architecture:
    """A member that is one layer with a rule."""
    kind = draw(st.sampled_from(["conv", "norm", "linear", "embedding"]))
    batch = draw(st.sampled_from([2, 3] if training else [0, 1, 3]))
    if kind == "embedding":
        vocabulary = draw(st.integers(2, 6))
        padding_idx = draw(st.one_of(st.none(), st.integers(0, vocabulary - 1)))
        spec = [("embedding", dict(num_embeddings=vocabulary, embedding_dim=3, padding_idx=padding_idx))]
        return Architecture(spec, (draw(st.integers(1, 4)),), vocabulary, training, batch, True)
    if kind == "linear":
        features = draw(st.integers(1, 5))
        spec = [("linear", dict(in_features=features, out_features=draw(st.integers(1, 4)),
                                bias=draw(st.booleans())))]
        return Architecture(spec, (features,), None, training, batch, True)
    channels = draw(st.integers(1, 4))
    sizes = tuple(draw(st.integers(3, 6)) for _ in range(draw(st.integers(1, 2))))
    entry = draw(convolutions(channels, sizes))[0] if kind == "conv" else draw(normalizations(channels, sizes))
    return Architecture([entry], (channels, *sizes), None, training, batch, True)


@st.composite
def architectures(draw) -> Architecture:
    training = draw(st.booleans())
    if draw(st.integers(0, 5)) == 0:
        return draw(single_layers(training))
    inputs = draw(st.sampled_from(["image", "signal", "tokens"]))
    spec: list[tuple] = []
    vocabulary = None
    if inputs == "tokens":
        vocabulary, channels, sizes = draw(st.integers(3, 9)), draw(st.integers(2, 4)), (draw(st.integers(3, 7)),)
        padding_idx = draw(st.one_of(st.none(), st.integers(0, vocabulary - 1)))
        spec.append(("tokens", dict(vocabulary=vocabulary, dim=channels, padding_idx=padding_idx)))
        sample = sizes
    else:
        spatial = 2 if inputs == "image" else 1
        channels = draw(st.integers(1, 4))
        sizes = tuple(draw(st.integers(3, 8)) for _ in range(spatial))
        sample = (channels, *sizes)
    for _ in range(draw(st.integers(1, 5))):
        block = draw(st.sampled_from(["conv", "conv", "norm", "activation", "pool", "dropout", "residual", "concat"]))
        if block == "conv":
            entry, channels, sizes = draw(convolutions(channels, sizes))
            spec.append(entry)
        elif block == "norm":
            spec.append(draw(normalizations(channels, sizes)))
        elif block == "activation":
            spec.append(("activation", dict(name=draw(st.sampled_from(sorted(ACTIVATIONS))))))
        elif block == "pool":
            pool = draw(st.sampled_from(["max", "avg", "adaptive"]))
            size = draw(st.integers(1, min(sizes)))
            spec.append(("pool", dict(spatial=len(sizes), pool=pool, size=size)))
            sizes = tuple(size if pool == "adaptive" else s // size for s in sizes)
        elif block == "dropout" and not training:  # train-mode masks differ between the loop and the fused run
            spec.append(("dropout", dict(channels=draw(st.sampled_from([0, len(sizes)])), p=0.3)))
        elif block == "residual":
            body, _, _ = draw(convolutions(channels, sizes, same_shape=True))
            extra = [draw(normalizations(channels, sizes))] if draw(st.booleans()) else []
            spec.append(("residual", dict(body=[body, *extra, ("activation", dict(name="tanh"))])))
        elif block == "concat":
            (left, c_left, _), (right, c_right, _) = (draw(convolutions(channels, sizes, same_shape=True))
                                                      for _ in range(2))
            spec.append(("concat", dict(left=[left], right=[right])))
            channels = c_left + c_right
    spec.append(("flatten", {}))
    features = channels * int(torch.tensor(sizes).prod())
    for _ in range(draw(st.integers(0, 2))):
        width = draw(st.integers(2, 6))
        spec.append(("linear", dict(in_features=features, out_features=width, bias=draw(st.booleans()))))
        features = width
        extra = draw(st.sampled_from(["activation", "layernorm", "batchnorm", "none"]))
        if extra == "activation":
            spec.append(("activation", dict(name=draw(st.sampled_from(sorted(ACTIVATIONS))))))
        elif extra == "layernorm":
            spec.append(("layernorm", dict(normalized_shape=features)))
        elif extra == "batchnorm":
            spec.append(("batchnorm", dict(spatial=1, num_features=features)))
    spec.append(("linear", dict(in_features=features, out_features=draw(st.integers(1, 4)))))
    batch = draw(st.sampled_from([3] if training else [0, 1, 3]))
    return Architecture(spec, sample, vocabulary, training, batch, False)


def draw_input(architecture: Architecture, member_inputs: bool, n: int) -> torch.Tensor:
    shape = ((n,) if member_inputs else ()) + (architecture.batch, *architecture.sample)
    if architecture.vocabulary is not None:
        return torch.randint(0, architecture.vocabulary, shape)
    return torch.randn(shape, dtype=torch.float64)


@settings(max_examples=120, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(architecture=architectures(), n=st.integers(1, 3))
def test_random_architecture_matches_the_member_loop(architecture, n):
    for member_inputs in (False, True):
        members = [m.double() for m in make_members(architecture.build, n=n, seed=len(architecture.spec),
                                                     training=architecture.training)]
        fused = FusedEnsemble(copy.deepcopy(members), reduction="none", member_inputs=member_inputs)
        x = draw_input(architecture, member_inputs, n)
        if architecture.batch == 0:
            try:
                ref = torch.stack([m(x[i] if member_inputs else x) for i, m in enumerate(members)])
            except (RuntimeError, IndexError, ValueError):  # torch's InstanceNorm takes no empty batch
                with pytest.raises((RuntimeError, IndexError, ValueError)):
                    fused(x)
                continue
            assert fused(x).shape == ref.shape
            continue
        out = fused(x)
        ref = torch.stack([m(x[i] if member_inputs else x) for i, m in enumerate(members)])
        assert_matches(out, ref, rel=REL)
        if not any(p.requires_grad for p in members[0].parameters()):
            continue
        weights = torch.randn_like(ref)
        (out * weights).sum().backward()
        (ref * weights).sum().backward()
        assert_grads_match(fused, members, rel=REL)
        for member, unfused in zip(members, fused.to_members()):  # running statistics, batch counts
            for name, buffer in member.named_buffers():
                torch.testing.assert_close(unfused.get_buffer(name), buffer, rtol=REL, atol=REL)
