"""Dropout (the rule, functional dropout and stochastic depth): every member draws its own mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fused_ensemble import FusedEnsemble

from layer_checks import check_layer
from member_factories import make_members, member_loop

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
