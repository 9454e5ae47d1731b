"""Calibration and conformal prediction on real member logits: four small members trained for a few seconds on 500
of scikit-learn's digits, evaluated on the other 1297.

Coverage over random splits: for a fixed set of examples, a uniformly random split into calibration and test makes
them exchangeable, so the coverage guarantee holds for each split's expected coverage given the examples, and the
splits are independent draws given the examples. The check is the one of test_conformal.py: the mean over 200 splits
is at least ``1 - alpha - 3 SE``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fused_ensemble import (
    FusedEnsemble,
    SplitConformal,
    TemperatureScaling,
    ensemble_reduce,
    member_logits,
    metrics,
    optim,
    train_epoch,
)
from fused_ensemble.data import load_digits

HELD_OUT_CALIBRATION = 600  # of the 1297 held-out examples; the rest is the test split


@pytest.fixture(scope="module")
def digits_logits() -> tuple[torch.Tensor, torch.Tensor]:
    """Member logits [4, 1297, 10] of the examples the members did not train on, and their labels."""
    torch.manual_seed(0)
    data = load_digits()
    x, y = torch.cat([data.train_x, data.test_x]), torch.cat([data.train_y, data.test_y])
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=generator)
    train, held_out = order[:500], order[500:]
    members = [nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)) for _ in range(4)]
    fused = FusedEnsemble(members, reduction="none", member_inputs=True)
    optimizer = optim.SGD(fused.parameters(), lr=0.05, momentum=0.9)
    for _ in range(5):
        train_epoch(fused, optimizer, x[train], y[train], 32, generator=generator)
    return member_logits(fused, x[held_out]), y[held_out]


@pytest.mark.parametrize("mode", ["ensemble", "member"])
def test_temperature_scaling_repairs_overconfident_digits_logits(digits_logits, mode):
    logits, targets = digits_logits
    logits = logits * 4  # the members made overconfident
    cal, test = slice(0, HELD_OUT_CALIBRATION), slice(HELD_OUT_CALIBRATION, None)
    scaling = TemperatureScaling(mode).fit(logits[:, cal], targets[cal])
    before = ensemble_reduce(logits[:, test], "mean_probs")
    after = scaling(logits[:, test])
    assert metrics.accuracy(after, targets[test]) > 0.9
    assert metrics.nll(after, targets[test]) < metrics.nll(before, targets[test]) - 0.1
    assert metrics.ece(after, targets[test]) < 0.8 * metrics.ece(before, targets[test])
    assert metrics.adaptive_ece(after, targets[test]) < 0.8 * metrics.adaptive_ece(before, targets[test])
    if mode == "ensemble":
        assert 1.5 < scaling.temperature < 4


@pytest.mark.parametrize("score, kwargs", [("thr", {}), ("aps", {}), ("aps", {"randomized": True}),
                                           ("raps", {"k_reg": 1, "lam": 0.01, "randomized": True})])
@pytest.mark.parametrize("alpha", [0.1, 0.02])
def test_conformal_coverage_over_200_random_splits_of_digits(digits_logits, score, kwargs, alpha):
    logits, targets = digits_logits
    probs = ensemble_reduce(logits, "mean_probs")
    generator = torch.Generator().manual_seed(0)
    if kwargs.get("randomized"):
        kwargs = dict(kwargs, generator=torch.Generator().manual_seed(1))
    coverages, smallest_set = [], []
    for _ in range(200):
        order = torch.randperm(len(targets), generator=generator)
        cal, test = order[:HELD_OUT_CALIBRATION], order[HELD_OUT_CALIBRATION:]
        conformal = SplitConformal(score, alpha=alpha, **kwargs).fit(probs[cal], targets[cal])
        sets = conformal.predict_sets(probs[test])
        coverages.append(sets.gather(-1, targets[test, None]).double().mean().item())
        smallest_set.append(sets.sum(-1).min().item())
    coverages = torch.tensor(coverages)
    mean, se = coverages.mean().item(), coverages.std().item() / math.sqrt(len(coverages))
    assert mean >= 1 - alpha - 3 * se, (mean, se)
    if score == "thr" or kwargs.get("randomized"):
        # Sets {y : s <= q_hat} on scores without ties: the coverage is also at most 1 - alpha + 1 / (n + 1).
        assert mean <= 1 - alpha + 1 / (HELD_OUT_CALIBRATION + 1) + 3 * se, (mean, se)
    else:
        assert min(smallest_set) >= 1  # deterministic APS and RAPS sets are never empty
