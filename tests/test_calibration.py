"""TemperatureScaling recovers known temperatures from labels drawn at that temperature, applies what it fitted as
documented (the ensemble's log-probabilities, or each member's logits), and serializes as plain floats."""

from __future__ import annotations

import json

import pytest
import torch

from fused_ensemble import TemperatureScaling, ensemble_reduce
from fused_ensemble.calibration import NoFiniteTemperature


def _member_logits(n: int = 3, b: int = 6000, k: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Members that agree in part (a shared component) and differ in part, as trained members do.
    return torch.randn(1, b, k, generator=g) * 2 + torch.randn(n, b, k, generator=g) * 1.5


def _labels(probs: torch.Tensor, seed: int = 1) -> torch.Tensor:
    return torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)).squeeze(1)


@pytest.mark.parametrize("true_temperature", [0.6, 2.5])
def test_ensemble_mode_recovers_the_temperature_of_the_labels(true_temperature):
    logits = _member_logits()
    # Labels drawn from softmax(log_mean_probs / T): the ensemble is off by exactly T.
    targets = _labels(torch.softmax(ensemble_reduce(logits, "log_mean_probs") / true_temperature, -1))
    scaling = TemperatureScaling("ensemble").fit(logits, targets)
    assert isinstance(scaling.temperature, float)
    assert scaling.temperature == pytest.approx(true_temperature, rel=0.05)


def test_member_mode_recovers_a_common_scale_of_every_members_logits():
    logits = _member_logits(b=20000)
    targets = _labels(torch.softmax(logits, -1).mean(0))  # the members, averaged, are calibrated
    scaling = TemperatureScaling("member").fit(logits * 3, targets)  # logits made 3x overconfident
    assert scaling.temperature.shape == (3,)
    torch.testing.assert_close(scaling.temperature, torch.full((3,), 3.0, dtype=torch.float64), rtol=0.06, atol=0)


def test_member_mode_recovers_one_temperature_per_member():
    logits = _member_logits(b=20000)
    true = torch.tensor([0.5, 1.0, 3.0])
    targets = _labels(torch.softmax(logits / true.view(-1, 1, 1), -1).mean(0))
    scaling = TemperatureScaling("member").fit(logits, targets)
    torch.testing.assert_close(scaling.temperature, true.double(), rtol=0.1, atol=0)


@pytest.mark.parametrize("mode", ["ensemble", "member"])
def test_the_fit_lowers_the_nll_and_the_call_applies_what_was_fitted(mode):
    logits = _member_logits(b=2000) * 2.5
    targets = _labels(torch.softmax(logits / 2.5, -1).mean(0))
    scaling = TemperatureScaling(mode).fit(logits, targets)
    probs = scaling(logits)
    assert probs.shape == (2000, 10) and probs.dtype == torch.float32
    if mode == "ensemble":
        expected = torch.softmax(torch.log(torch.softmax(logits.double(), -1).mean(0)) / scaling.temperature, -1)
    else:
        expected = torch.softmax(logits.double() / scaling.temperature.view(-1, 1, 1), -1).mean(0)
    torch.testing.assert_close(probs.double(), expected, rtol=1e-5, atol=1e-6)
    before = torch.nn.functional.nll_loss(ensemble_reduce(logits, "log_mean_probs"), targets)
    after = torch.nn.functional.nll_loss(probs.log(), targets)
    assert after < before - 0.05
    # Any other temperature does no better on the data it was fitted on.
    for factor in (0.9, 1.1):
        other = TemperatureScaling(mode)
        other.load_state_dict({"temperature": (torch.as_tensor(scaling.temperature) * factor).tolist()})
        assert torch.nn.functional.nll_loss(other(logits.double()).log(), targets) > after.double() - 1e-6


@pytest.mark.parametrize("mode", ["ensemble", "member"])
def test_state_dict_is_plain_floats_and_round_trips_through_json(mode):
    logits = _member_logits(b=500)
    targets = _labels(torch.softmax(logits, -1).mean(0))
    scaling = TemperatureScaling(mode).fit(logits, targets)
    state = json.loads(json.dumps(scaling.state_dict()))
    loaded = TemperatureScaling(mode)
    loaded.load_state_dict(state)
    torch.testing.assert_close(loaded(logits), scaling(logits), rtol=0, atol=0)
    assert repr(loaded).startswith(f"TemperatureScaling(mode={mode!r}, temperature=")


def test_bad_use_is_refused_with_a_reason():
    logits = _member_logits(b=20)
    targets = torch.zeros(20, dtype=torch.long)
    with pytest.raises(ValueError, match="unknown mode 'global'"):
        TemperatureScaling("global")
    with pytest.raises(RuntimeError, match="not fitted"):
        TemperatureScaling()(logits)
    with pytest.raises(RuntimeError, match="not fitted"):
        TemperatureScaling().state_dict()
    with pytest.raises(ValueError, match=r"targets of shape \(19,\) do not match"):
        TemperatureScaling().fit(logits, targets[:19])
    with pytest.raises(ValueError, match="fit takes member logits"):
        TemperatureScaling().fit(logits[0], targets)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 9\]"):
        TemperatureScaling().fit(logits, targets + 10)
    member = TemperatureScaling("member").fit(logits, targets)
    with pytest.raises(ValueError, match="fitted for 3 members, the logits have 2"):
        member(logits[:2])
    with pytest.raises(TypeError, match="mode 'ensemble' loads one float"):
        TemperatureScaling("ensemble").load_state_dict({"temperature": [1.0, 2.0]})
    with pytest.raises(ValueError, match="finite and positive"):
        TemperatureScaling("member").load_state_dict({"temperature": [1.0, -2.0]})
    with pytest.raises(ValueError, match="the one key 'temperature'"):
        TemperatureScaling().load_state_dict({"temperature": 1.0, "mode": "ensemble"})


def test_held_out_examples_without_mistakes_have_no_finite_temperature():
    logits = _member_logits(b=200)
    ensemble_right = ensemble_reduce(logits, "log_mean_probs").argmax(-1)
    with pytest.raises(NoFiniteTemperature, match="classifies all 200 held-out examples correctly"):
        TemperatureScaling("ensemble").fit(logits, ensemble_right)
    # The same targets with one mistake: a finite minimum, fitted (sharper than T = 1: the ensemble is right on 199).
    one_mistake = ensemble_right.clone()
    one_mistake[0] = (one_mistake[0] + 1) % 10
    assert 0 < TemperatureScaling("ensemble").fit(logits, one_mistake).temperature < 1

    # Mode "member": member 1 is right on every example (its logits made to agree with the targets), the others not.
    targets = torch.randint(0, 10, (200,), generator=torch.Generator().manual_seed(3))
    logits[1].scatter_(-1, targets.unsqueeze(-1), 100.0)
    with pytest.raises(NoFiniteTemperature, match=r"member\(s\) \[1\] classify all 200"):
        TemperatureScaling("member").fit(logits, targets)


def test_without_a_finite_temperature_nothing_is_fitted():
    scaling = TemperatureScaling()
    logits = _member_logits(b=50)
    with pytest.raises(ValueError):  # NoFiniteTemperature is a ValueError
        scaling.fit(logits, ensemble_reduce(logits, "mean_probs").argmax(-1))
    with pytest.raises(RuntimeError, match="not fitted"):
        print(scaling.temperature)
