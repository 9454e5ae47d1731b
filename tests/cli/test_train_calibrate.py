"""``train --calibrate``: the options are checked before training, the held-out split is drawn with the seed, and
the summary gains the calibrated ECE, the temperature and the conformal sets' coverage and size."""

from __future__ import annotations

import json
import re

import matplotlib.image
import pytest
import torch

from fused_ensemble import (
    FusedEnsemble,
    SplitConformal,
    TemperatureScaling,
    ensemble_reduce,
    member_logits,
    metrics,
)
from fused_ensemble.cli import main
from fused_ensemble.cli import train as train_command
from fused_ensemble.cli.calibrate import CalibrationOptions, calibrate, hold_out
from fused_ensemble.data import load_digits

QUICK = ["train", "--dataset", "digits", "--members", "2", "--epochs", "2", "--batch-size", "32", "--max-train", "128",
         "--max-test", "64", "--device", "cpu", "--no-progress"]


@pytest.mark.parametrize("options, message", [
    (["--alpha", "0.05"], r"--alpha without --calibrate"),
    (["--calibration-fraction", "0.2", "--conformal-score", "thr"],
     r"--calibration-fraction, --conformal-score without --calibrate"),
    (["--calibrate", "--alpha", "1.5"], r"--alpha must lie in \(0, 1\), got 1.5"),
    (["--calibrate", "--calibration-fraction", "0"], r"--calibration-fraction must lie in \(0, 1\), got 0.0"),
    (["--calibrate", "--calibration-fraction", "0.9"],
     r"--calibration-fraction 0.9 leaves 13 of the 128 training examples, fewer than --batch-size 32"),
    (["--calibrate", "--alpha", "0.01"],
     r"--alpha 0.01 needs at least 99 held-out examples .*--calibration-fraction 0.1 of 128 holds out 13"),
    (["--calibrate", "--calibration-fraction", "0.001"], r"holds out 0: both parts need at least one example"),
])
def test_bad_calibration_options_exit_before_training(no_training, options, message):
    with pytest.raises(SystemExit) as exited:
        main(QUICK + options)
    assert re.search(message, str(exited.value.code)), exited.value.code


def test_the_held_out_split_is_drawn_with_the_seed():
    data = load_digits()
    options = CalibrationOptions(fraction=0.1, score="thr", alpha=0.1)
    train, (x, y) = hold_out(data, options, seed=0, batch_size=64)
    assert x.shape[0] == round(0.1 * data.train_x.shape[0]) and train.train_x.shape[0] + x.shape[0] == 1347
    again = hold_out(data, options, seed=0, batch_size=64)[1][0]
    other = hold_out(data, options, seed=1, batch_size=64)[1][0]
    assert torch.equal(x, again) and not torch.equal(x, other)
    # No example is in both parts (the digits images are distinct), and the test split is untouched.
    both = torch.cat([train.train_x, x]).flatten(1)
    assert torch.unique(both, dim=0).shape[0] == torch.unique(data.train_x.flatten(1), dim=0).shape[0]
    assert torch.equal(train.test_x, data.test_x)


def test_calibrate_adds_its_keys_and_a_second_reliability_panel(tmp_path, capsys):
    summary_path, plot_path = tmp_path / "summary.json", tmp_path / "reliability.png"
    main(QUICK + ["--calibrate", "--conformal-score", "raps", "--alpha", "0.2", "--json", str(summary_path),
                  "--plot", str(plot_path)])
    summary = json.loads(summary_path.read_text())
    assert summary["train_examples"] == 115 and summary["calibration_examples"] == 13
    assert summary["temperature"] > 0 and 0 <= summary["ensemble_ece_calibrated"] <= 1
    assert summary["conformal_score"] == "raps" and summary["alpha"] == 0.2
    assert 0 <= summary["conformal_coverage"] <= 1 and 1 <= summary["conformal_mean_set_size"] <= 10
    for key in ("machine", "card", "torch", "commit", "command", "date"):
        assert key in summary["environment"], key
    assert "Calibrated on 13 held-out examples" in capsys.readouterr().out
    height, width = matplotlib.image.imread(plot_path).shape[:2]
    assert width > 1.5 * height  # two panels side by side



def test_calibrate_reports_what_the_library_computes_on_the_held_out_and_test_examples():
    torch.manual_seed(0)
    members = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)) for _ in range(3)]
    fused = FusedEnsemble(members, reduction="none", member_inputs=True)
    data = load_digits()
    held_out = (data.train_x[:200], data.train_y[:200])
    options = CalibrationOptions(fraction=0.1, score="thr", alpha=0.2)
    summary, calibrated = calibrate(fused, held_out, data.test_x, data.test_y, options)

    cal_logits, test_logits = member_logits(fused, held_out[0]), member_logits(fused, data.test_x)
    scaling = TemperatureScaling("ensemble").fit(cal_logits, held_out[1])
    torch.testing.assert_close(calibrated, scaling(test_logits))
    assert summary["temperature"] == pytest.approx(scaling.temperature)
    assert summary["ensemble_ece_calibrated"] == pytest.approx(metrics.ece(calibrated, data.test_y).item())
    assert summary["ensemble_nll_calibrated"] == pytest.approx(metrics.nll(calibrated, data.test_y).item())
    # The conformal sets are fitted on the uncalibrated ensemble probabilities (see fused_ensemble.cli.calibrate).
    conformal = SplitConformal("thr", alpha=0.2).fit(ensemble_reduce(cal_logits, "mean_probs"), held_out[1])
    test_probs = ensemble_reduce(test_logits, "mean_probs")
    assert summary["conformal_threshold"] == conformal.qhat
    assert summary["conformal_coverage"] == conformal.coverage(test_probs, data.test_y)
    assert summary["conformal_mean_set_size"] == conformal.mean_set_size(test_probs)
    assert summary["calibration_examples"] == 200 and summary["alpha"] == 0.2
    # Untrained members are far from calibrated; the fitted temperature repairs much of it.
    assert summary["ensemble_nll_calibrated"] < metrics.nll(test_probs, data.test_y).item()


def test_held_out_examples_without_mistakes_are_reported_not_fatal(monkeypatch):
    # Members that put all their mass on the right class of every held-out example: no finite temperature.
    data = load_digits()
    held_out = (data.train_x[:40], data.train_y[:40])
    fused = FusedEnsemble([torch.nn.Flatten() for _ in range(2)], reduction="none", member_inputs=True)
    right = torch.nn.functional.one_hot(held_out[1], 10).float() * 20

    def logits(module, x):
        return right.expand(2, -1, -1) if x is held_out[0] else torch.randn(2, x.shape[0], 10)
    monkeypatch.setattr("fused_ensemble.cli.calibrate.member_logits", logits)
    summary, calibrated = calibrate(fused, held_out, data.test_x, data.test_y,
                                    CalibrationOptions(fraction=0.1, score="thr", alpha=0.2))
    assert calibrated is None and summary["temperature"] is None and summary["ensemble_ece_calibrated"] is None
    assert "classifies all 40 held-out examples correctly" in summary["temperature_note"]
    assert summary["conformal_coverage"] is not None  # the conformal sets are fitted all the same
    summary["ensemble_ece"], summary["ensemble_nll"] = 0.1, 0.2
    assert "no temperature: the ensemble classifies all 40" in train_command.format_calibration(summary)
