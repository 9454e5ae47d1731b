"""The train command's ``--calibrate``: part of the training split is held out (drawn with ``--seed``), and after
training a temperature (``fused_ensemble.calibration.TemperatureScaling``, mode ``"ensemble"``) and a conformal
predictor (``fused_ensemble.conformal.SplitConformal``) are fitted on it and evaluated on the test set.

The conformal predictor is calibrated on the ensemble's own probabilities, not the temperature-scaled ones: the
temperature is fitted on the same held-out examples, and a score that depends on the calibration examples would break
the exchangeability its coverage guarantee rests on.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import NamedTuple

import torch

from fused_ensemble import metrics
from fused_ensemble.calibration import NoFiniteTemperature, TemperatureScaling
from fused_ensemble.conformal import SCORES, SplitConformal
from fused_ensemble.data import ImageData
from fused_ensemble.fused import FusedEnsemble
from fused_ensemble.ops.ensemble_reduce import ensemble_reduce
from fused_ensemble.training.loop import member_logits

__all__ = ["add_calibration_arguments", "CalibrationOptions", "calibration_options", "hold_out", "calibrate",
           "format_calibration"]


class CalibrationOptions(NamedTuple):
    fraction: float
    score: str
    alpha: float


# THR by default: the smallest sets on average (Sadinle et al., 2019). Deterministic APS is conservative on an
# accurate, confident ensemble (its threshold lands near 1 and the sets reach into the tail of tiny probabilities).
DEFAULTS = CalibrationOptions(fraction=0.1, score="thr", alpha=0.1)


def add_calibration_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--calibrate`` and its options to the ``train`` command's parser."""
    group = parser.add_argument_group("calibration (--calibrate)")
    group.add_argument("--calibrate", action="store_true",
                       help="hold out part of the training split; after training, fit a temperature and a conformal "
                            "predictor on it and report the test set's calibrated ECE and the conformal sets' "
                            "coverage and mean size")
    group.add_argument("--calibration-fraction", type=float, default=None,
                       help=f"share of the training split held out, drawn with --seed (default {DEFAULTS.fraction})")
    group.add_argument("--conformal-score", choices=SCORES, default=None,
                       help=f"conformal score: thr, aps or raps (default {DEFAULTS.score}; APS and RAPS sets are "
                            "deterministic)")
    group.add_argument("--alpha", type=float, default=None,
                       help=f"conformal miscoverage: sets hold the true class with probability >= 1 - alpha "
                            f"(default {DEFAULTS.alpha})")


def calibration_options(args: argparse.Namespace) -> CalibrationOptions | None:
    """The checked ``--calibrate`` options, defaults resolved (None without ``--calibrate``); a ValueError gives
    the reason for a bad one."""
    given = {"--calibration-fraction": args.calibration_fraction, "--conformal-score": args.conformal_score,
             "--alpha": args.alpha}
    if not args.calibrate:
        named = [option for option, value in given.items() if value is not None]
        if named:
            raise ValueError(f"{', '.join(named)} without --calibrate: add --calibrate (or leave them out)")
        return None
    options = CalibrationOptions(*(default if value is None else value
                                   for value, default in zip(given.values(), DEFAULTS)))
    if not 0 < options.fraction < 1:
        raise ValueError(f"--calibration-fraction must lie in (0, 1), got {options.fraction}")
    if not 0 < options.alpha < 1:
        raise ValueError(f"--alpha must lie in (0, 1), got {options.alpha}")
    return options


def hold_out(data: ImageData, options: CalibrationOptions, seed: int,
             batch_size: int) -> tuple[ImageData, tuple[torch.Tensor, torch.Tensor]]:
    """Splits ``round(fraction * M)`` examples off the training split at random (generator seeded with ``seed``;
    both parts keep their order): the training data without them, and the held-out ``(x, y)``. A ValueError says
    why a split is unusable: nothing held out, too few left for a batch, too few held out for ``alpha``."""
    m = data.train_x.shape[0]
    n = round(options.fraction * m)
    if n < 1 or m - n < 1:
        raise ValueError(f"--calibration-fraction {options.fraction} of the {m} training examples holds out {n}: "
                         f"both parts need at least one example")
    if m - n < batch_size:
        raise ValueError(f"--calibration-fraction {options.fraction} leaves {m - n} of the {m} training examples, "
                         f"fewer than --batch-size {batch_size}")
    needed = math.ceil((1 - options.alpha) / options.alpha - 1e-9)  # (n + 1)(1 - alpha) <= n
    if n < needed:
        raise ValueError(f"--alpha {options.alpha} needs at least {needed} held-out examples for a finite conformal "
                         f"threshold; --calibration-fraction {options.fraction} of {m} holds out {n}")
    order = torch.randperm(m, generator=torch.Generator().manual_seed(seed))
    held, kept = order[:n].sort().values, order[n:].sort().values
    train = dataclasses.replace(data, train_x=data.train_x[kept], train_y=data.train_y[kept])
    return train, (data.train_x[held], data.train_y[held])


def calibrate(fused: FusedEnsemble, held_out: tuple[torch.Tensor, torch.Tensor], test_x: torch.Tensor,
              test_y: torch.Tensor, options: CalibrationOptions, n_bins: int = 15) -> tuple[dict, torch.Tensor]:
    """Fits the temperature and the conformal predictor on the held-out examples and evaluates both on the test
    set: the summary's keys, and the calibrated test probabilities (for the reliability diagram)."""
    cal_x, cal_y = held_out
    cal_logits, test_logits = member_logits(fused, cal_x), member_logits(fused, test_x)
    test_y = test_y.cpu()
    try:
        scaling = TemperatureScaling("ensemble").fit(cal_logits, cal_y.cpu())
    except NoFiniteTemperature as error:  # reported, not fatal: the training and the other results stand
        scaling, temperature_note = None, str(error)
    calibrated = None if scaling is None else scaling(test_logits)
    conformal = SplitConformal(options.score, alpha=options.alpha)
    conformal.fit(ensemble_reduce(cal_logits, "mean_probs"), cal_y.cpu())
    test_probs = ensemble_reduce(test_logits, "mean_probs")
    summary = {
        "calibration_examples": int(cal_y.shape[0]),
        "temperature": None if scaling is None else scaling.temperature,
        "ensemble_nll_calibrated": None if scaling is None else metrics.nll(calibrated, test_y).item(),
        "ensemble_brier_calibrated": None if scaling is None else metrics.brier(calibrated, test_y).item(),
        "ensemble_ece_calibrated": None if scaling is None else metrics.ece(calibrated, test_y, n_bins).item(),
        "conformal_score": options.score, "alpha": options.alpha,
        "conformal_threshold": conformal.qhat,
        "conformal_coverage": conformal.coverage(test_probs, test_y),
        "conformal_mean_set_size": conformal.mean_set_size(test_probs),
    }
    if scaling is None:
        summary["temperature_note"] = temperature_note
    return summary, calibrated


def format_calibration(summary: dict) -> str:
    """One paragraph on what ``--calibrate`` found."""
    if summary["temperature"] is None:
        temperature = f"no temperature: {summary['temperature_note']}."
    else:
        temperature = (f"temperature {summary['temperature']:.3f}, ensemble ECE {summary['ensemble_ece']:.4f} -> "
                       f"{summary['ensemble_ece_calibrated']:.4f}, NLL {summary['ensemble_nll']:.4f} -> "
                       f"{summary['ensemble_nll_calibrated']:.4f}.")
    return (f"Calibrated on {summary['calibration_examples']} held-out examples: {temperature} Conformal "
            f"{summary['conformal_score']} sets at alpha {summary['alpha']}: coverage "
            f"{summary['conformal_coverage']:.4f}, mean size {summary['conformal_mean_set_size']:.3f}.")
