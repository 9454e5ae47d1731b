"""The fused forward's inputs and outputs at their edges: empty batches, inputs every member shares while the others
are per member (``fused_ensemble.shared``), and outputs whose structure depends on an input."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import fused_ensemble
from fused_ensemble import FusedEnsemble, shared

from member_factories import assert_matches, make_members, member_loop

N = 3


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x, mask=None, scale: float = 1.0):
        y, _ = self.attention(x, x, x, attn_mask=mask, need_weights=False)
        return self.head(y) * scale


EMPTY_BATCH_MEMBERS = {
    "conv": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.Flatten()), (3, 6, 6)),
    "linear": (lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)), (5,)),
    "batchnorm": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1),
                                        nn.Flatten(), nn.Linear(4, 2)), (3, 6, 6)),
    "attention": (Attention, (5, 8)),
}


@pytest.mark.parametrize("member_inputs", [False, True], ids=["shared", "member_inputs"])
@pytest.mark.parametrize("kind", EMPTY_BATCH_MEMBERS)
def test_empty_batch(kind, member_inputs):
    factory, sample_shape = EMPTY_BATCH_MEMBERS[kind]
    members = make_members(factory, n=N)  # eval mode: BatchNorm has no batch statistics to take
    fused = FusedEnsemble(copy.deepcopy(members), reduction="none", member_inputs=member_inputs)
    x = torch.randn(((N,) if member_inputs else ()) + (0, *sample_shape))
    with torch.no_grad():
        out = fused(x)
        ref = member_loop(members, x, member_inputs)
    assert out.shape == ref.shape and out.shape[:2] == (N, 0)
    assert FusedEnsemble(copy.deepcopy(members), member_inputs=member_inputs)(x).shape == ref.shape[1:]


def loop_with_mask(members, x, mask, mask_per_member: bool):
    return torch.stack([m(x[i], mask=mask[i] if mask_per_member else mask) for i, m in enumerate(members)])


@pytest.mark.parametrize("length", [5, N], ids=["L=5", "L=N"])
def test_a_shared_mask_with_member_inputs(length):
    members = make_members(Attention, n=N)
    fused = FusedEnsemble(copy.deepcopy(members), reduction="none", member_inputs=True)
    x = torch.randn(N, 2, length, 8)
    mask = torch.triu(torch.full((length, length), float("-inf")), diagonal=1)
    with torch.no_grad():
        out = fused(x, mask=shared(mask))
        assert_matches(out, loop_with_mask(members, x, mask, False))
        assert_matches(fused(x, shared(mask)), out)  # positional too
        # The same mask given per member (leading dim N) is split; wrapped, it never is.
        per_member = mask.expand(N, length, length) if length == N else None
        if per_member is not None:
            assert_matches(fused(x, mask=per_member), loop_with_mask(members, x, per_member, True))


def test_a_shared_input_leading_dim_equal_to_n_is_not_split():
    class Offset(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, offset):
            return self.fc(x) + offset

    members = make_members(Offset, n=N)
    fused = FusedEnsemble(copy.deepcopy(members), reduction="none", member_inputs=True)
    x, offset = torch.randn(N, N, 4), torch.randn(N, 4)  # batch == N, and offset's rows are per sample
    with torch.no_grad():
        expected = torch.stack([m(x[i], offset) for i, m in enumerate(members)])
        assert_matches(fused(x, shared(offset)), expected)
        assert_matches(fused(x, offset=shared(offset)), expected)


def test_shared_with_a_shared_input_ensemble_is_the_value_itself():
    members = make_members(Attention, n=N)
    fused = FusedEnsemble(copy.deepcopy(members), reduction="none")
    x, mask = torch.randn(2, 5, 8), torch.zeros(5, 5)
    with torch.no_grad():
        assert torch.equal(fused(x, mask=shared(mask)), fused(x, mask=mask))


def test_the_error_for_a_wrong_leading_size_says_how_to_share():
    fused = FusedEnsemble(make_members(Attention, n=N), reduction="none", member_inputs=True)
    expected = (f"member_inputs=True expects input mask of shape [N, B, ...] with N={N} members, got (5, 5); pass "
                f"an input that every member sees whole as fused_ensemble.shared(value)")
    with pytest.raises(ValueError, match=re.escape(expected)):
        fused(torch.randn(N, 2, 5, 8), mask=torch.zeros(5, 5))


def test_tensors_inside_a_structured_input_are_per_member_or_shared_whole():
    members = make_members(lambda: nn.LSTM(4, 5, batch_first=True), n=N)
    fused = FusedEnsemble(copy.deepcopy(members), reduction="none", member_inputs=True)
    x = torch.randn(N, 2, 6, 4)
    state = (torch.randn(N, 1, 2, 5), torch.randn(N, 1, 2, 5))
    with torch.no_grad():
        out = fused(x, state)[0]
        assert_matches(out, torch.stack([m(x[i], (state[0][i], state[1][i]))[0] for i, m in enumerate(members)]))
        one_state = (state[0][0], state[1][0])
        out = fused(x, shared(one_state))[0]
        assert_matches(out, torch.stack([m(x[i], one_state)[0] for i, m in enumerate(members)]))
    with pytest.raises(ValueError, match=r"expects every tensor of input 1 of shape \[N, B, ...\]"):
        fused(x, one_state)
    with pytest.raises(TypeError, match=r"shared\(\) wraps a whole input"):
        fused(x, (state[0], shared(state[1])))


def test_shared_is_exported():
    assert fused_ensemble.shared is shared and "shared" in fused_ensemble.__all__
    assert "SharedInput" in fused_ensemble.__all__
    assert repr(shared(1.5)) == "shared(1.5)"


class OptionalOutput(nn.Module):
    """A forward whose output structure depends on an input."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x, w=None):
        y = self.fc(x)
        return y if w is None else (y, self.fc(w))


@pytest.mark.parametrize("member_inputs", [False, True], ids=["shared", "member_inputs"])
def test_an_output_structure_that_depends_on_an_input(member_inputs):
    members = make_members(OptionalOutput, n=N)
    fused = FusedEnsemble(copy.deepcopy(members), reduction="none", member_inputs=member_inputs)
    lead = (N, 2) if member_inputs else (2,)
    x, w = torch.randn(*lead, 3), torch.randn(*lead, 3)

    def loop(*args, **keywords):
        outs = [m(*(a[i] if member_inputs else a for a in args),
                  **{k: v[i] if member_inputs and v is not None else v for k, v in keywords.items()})
                for i, m in enumerate(members)]
        return torch.stack(outs) if isinstance(outs[0], torch.Tensor) else tuple(map(torch.stack, zip(*outs)))

    with torch.no_grad():
        out = fused(x)
        assert isinstance(out, torch.Tensor), "a call without w returns y alone, as the member does"
        assert_matches(out, loop(x))
        assert isinstance(fused(x, None), torch.Tensor) and isinstance(fused(x, w=None), torch.Tensor)
        for out in (fused(x, w), fused(x, w=w)):
            assert isinstance(out, tuple) and len(out) == 2
            for part, expected in zip(out, loop(x, w)):
                assert_matches(part, expected)
        assert isinstance(fused(x), torch.Tensor)  # each call shape keeps its own graph
