"""Bad input to FusedEnsemble: every error is a TypeError/ValueError whose message names the member index, the
parameter or module path and what was expected, and a failed construction leaves the members untouched."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from fused_ensemble import FusedEnsemble
from fused_ensemble.cli.models import MLP, LeNet5

from member_factories import assert_state_equal, clone_state, make_members


class Head(nn.Module):
    def __init__(self, classes: int = 10, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=stride)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        return self.fc(self.pool(self.conv(x)).flatten(1))


class RawWeights(nn.Module):
    """Parameters whose shapes are not part of any layer's configuration (extra_repr)."""

    def __init__(self, rows: int = 10, with_bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(rows, 512))
        if with_bias:
            self.bias = nn.Parameter(torch.randn(rows))

    def forward(self, x):
        return x @ self.weight.t()


class Classifier(nn.Module):
    def __init__(self, classes: int):
        super().__init__()
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        return self.fc(x)


class WithSyncBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.norm = nn.SyncBatchNorm(8)

    def forward(self, x):
        return self.norm(self.encoder(x))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return x


class CountingScale(nn.Module):
    """A layer type with state (a call counter) that FusedEnsemble has no rule for."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels, 1, 1))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return x * self.weight


# torch.fx traces into user modules and keeps torch.nn ones whole: posing as one makes this a leaf.
CountingScale.__module__ = "torch.nn.modules.counting"


class StatefulLeaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = CountingScale(4)

    def forward(self, x):
        return self.norm(self.conv(x))


def test_empty_member_list():
    with pytest.raises(ValueError, match="at least one member, got an empty list"):
        FusedEnsemble([])


def test_member_that_is_not_a_module():
    with pytest.raises(TypeError, match=r"member 1 is a function, not an nn\.Module"):
        FusedEnsemble([Head(), lambda x: x])


def test_a_single_module_instead_of_a_sequence():
    with pytest.raises(TypeError, match="members must be a sequence of nn.Modules.*got a single Head"):
        FusedEnsemble(Head())


def test_members_of_different_classes():
    with pytest.raises(TypeError, match="member 2 is a LeNet5, member 0 is a MLP"):
        FusedEnsemble([MLP(), MLP(), LeNet5()])


def test_members_with_different_parameter_names():
    with pytest.raises(ValueError, match=r"member 1: parameter names differ from member 0 "
                                         r"\(missing \['bias'\], extra \[\]\)"):
        FusedEnsemble([RawWeights(), RawWeights(with_bias=False)])


def test_members_with_different_submodule_types():
    first = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    second = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    with pytest.raises(TypeError, match="member 1: 1 is a Tanh, member 0 has a ReLU"):
        FusedEnsemble([first, second])


def test_members_with_different_parameter_shapes():
    with pytest.raises(ValueError, match=r"member 1: weight has shape \(11, 512\), member 0 has \(10, 512\)"):
        FusedEnsemble([RawWeights(10), RawWeights(11)])


def test_members_with_different_linear_sizes_name_the_parameter_and_shapes():
    with pytest.raises(ValueError) as error:
        FusedEnsemble([Classifier(10), Classifier(11)])
    assert "member 1: fc.weight has shape (11, 512), member 0 has (10, 512)" in str(error.value)


def test_members_with_different_dtypes():
    with pytest.raises(ValueError, match=r"member 1: fc\.weight has dtype torch\.float64, member 0 has torch\.float32"):
        FusedEnsemble([Classifier(10), Classifier(10).double()])


def test_members_on_different_devices():
    with pytest.raises(ValueError, match=r"member 1: fc\.weight has device meta, member 0 has cpu"):
        FusedEnsemble([Classifier(10), Classifier(10).to("meta")])


def test_members_with_different_requires_grad():
    frozen = Classifier(10)
    frozen.fc.bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"member 1: fc\.bias has requires_grad=False, member 0 has True"):
        FusedEnsemble([Classifier(10), frozen])


def test_members_with_a_different_layer_configuration():
    with pytest.raises(ValueError, match=re.escape("member 1: 'conv' (Conv2d) has stride=(2, 2), member 0 has "
                                                   "(1, 1)")):
        FusedEnsemble([Head(), Head(stride=2)])


def test_tied_parameters():
    member = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    member[1].weight = member[0].weight
    with pytest.raises(ValueError, match="member 0: 1.weight is the same tensor as 0.weight"):
        FusedEnsemble([member, member])


@pytest.mark.parametrize("reparametrize, message", [
    (nn.utils.parametrizations.weight_norm, "'0' is parametrized .*remove_parametrizations"),
    (nn.utils.parametrizations.spectral_norm, "'0' is parametrized .*remove_parametrizations"),
    (nn.utils.weight_norm, "'0' uses torch.nn.utils.weight_norm.*remove_weight_norm"),
    (nn.utils.spectral_norm, "'0' uses torch.nn.utils.spectral_norm.*remove_spectral_norm"),
], ids=["weight_norm", "spectral_norm", "old_weight_norm", "old_spectral_norm"])
def test_reparametrized_weights_are_refused_with_the_way_out(reparametrize, message):
    members = [nn.Sequential(reparametrize(nn.Linear(4, 3)), nn.ReLU()) for _ in range(2)]
    with pytest.raises(TypeError, match="member 0: " + message):
        FusedEnsemble(members)


def test_unsupported_layer_names_its_path_and_type():
    with pytest.raises(TypeError, match=r"cannot fuse layer 'norm' \(SyncBatchNorm\): SyncBatchNorm layers are not "
                                        "supported"):
        FusedEnsemble(make_members(WithSyncBatchNorm))


def test_layer_with_state_and_no_rule_names_its_path_and_type():
    with pytest.raises(TypeError, match=r"cannot fuse layer 'norm' \(CountingScale\): it keeps buffers"):
        FusedEnsemble(make_members(StatefulLeaf))


def test_untraceable_control_flow():
    with pytest.raises(TypeError, match="cannot fuse DataDependent: torch.fx could not trace its forward"):
        FusedEnsemble(make_members(DataDependent))


@pytest.mark.parametrize("shape", [(3, 2, 3, 8, 8), (4, 3, 8, 8), (3,)])
def test_member_inputs_with_the_wrong_leading_size(shape):
    fused = FusedEnsemble(make_members(Head, n=2), member_inputs=True)
    expected = f"member_inputs=True expects input 0 of shape [N, B, ...] with N=2 members, got {shape}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        fused(torch.randn(shape))


def test_member_inputs_without_the_member_dim_when_the_batch_equals_n():
    """x of shape [B, C, H, W] with B == N passes the leading-size check; the first layer must still refuse it."""
    fused = FusedEnsemble(make_members(Head, n=2), member_inputs=True)
    with pytest.raises(ValueError, match="Conv2d in a FusedEnsemble needs batched input with 4 dims per member, "
                                         "got 3"):
        fused(torch.randn(2, 3, 8, 8))


def test_wrong_input_rank_names_the_layer_path():
    fused = FusedEnsemble(make_members(Head, n=2), member_inputs=True)
    with pytest.raises(ValueError) as error:
        fused(torch.randn(2, 3, 8, 8))
    assert "'conv'" in str(error.value)


def test_member_inputs_must_be_a_bool():
    with pytest.raises(TypeError, match="member_inputs must be a bool, got str"):
        FusedEnsemble([Head()], member_inputs="yes")


def test_unknown_reduction_is_named():
    with pytest.raises(ValueError, match=r"unknown reduction 'median'; expected one of 'mean', 'mean_probs'"):
        FusedEnsemble([Head(), Head()], reduction="median")


def test_too_many_inputs():
    fused = FusedEnsemble(make_members(Head, n=2))
    with pytest.raises(TypeError, match="the member forward takes 1 inputs, got 2"):
        fused(torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8))


def test_momentum_none_batch_norm_needs_equal_batch_counts():
    members = make_members(lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=None)), n=2,
                           training=True)
    members[1][1].num_batches_tracked.fill_(5)
    with pytest.raises(ValueError, match=r"momentum=None .* num_batches_tracked=\[1, 6\]"):
        FusedEnsemble(members, reduction="none")(torch.randn(4, 3))


FAILING_CONSTRUCTIONS = {
    "unsupported-layer": lambda: make_members(WithSyncBatchNorm, n=2, training=True),
    "untraceable": lambda: make_members(DataDependent, n=2),
    "different-config": lambda: [Head(), Head(stride=2)],
    "different-shapes": lambda: [RawWeights(10), RawWeights(11)],
    "stateful-leaf": lambda: make_members(StatefulLeaf, n=2, training=True),
}


@pytest.mark.parametrize("name", FAILING_CONSTRUCTIONS)
def test_failed_construction_leaves_members_untouched(name):
    members = FAILING_CONSTRUCTIONS[name]()
    states = [clone_state(m) for m in members]
    tensors = [[id(t) for t in list(m.parameters()) + list(m.buffers())] for m in members]
    modes = [[sub.training for sub in m.modules()] for m in members]
    with pytest.raises((TypeError, ValueError)):
        FusedEnsemble(members)
    for member, state, ids, mode in zip(members, states, tensors, modes):
        assert_state_equal(member.state_dict(), state)
        assert [id(t) for t in list(member.parameters()) + list(member.buffers())] == ids
        assert [sub.training for sub in member.modules()] == mode
        assert all(p.grad is None for p in member.parameters())
