"""Uncertainty scores (fused_ensemble.ood) against SciPy, and the OOD and selective-prediction metrics against
torchmetrics and scikit-learn (AUPR, FPR at 95% TPR, AUROC), against the papers' definitions written out directly
(AURC, adaptive ECE), and adaptive ECE against torchmetrics' ECE where equal-mass and equal-width bins coincide."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_specificity_at_sensitivity,
    multiclass_calibration_error,
)

from fused_ensemble import ensemble_reduce, ensemble_stats, metrics, ood, uncertainty_scores

# ---- the scores ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 64, 10), (3, 7, 41), (1, 9, 3), (8, 2, 1000)])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_scores_equal_scipy(shape, backend):
    logits = torch.randn(shape) * 3
    scores = uncertainty_scores(logits, backend=backend)
    x = logits.double().numpy()
    member_probs = scipy.special.softmax(x, axis=-1)
    probs = member_probs.mean(0)
    entropy = scipy.stats.entropy(probs, axis=-1)
    votes = x.argmax(-1)
    expected = {
        "neg_max_prob": -probs.max(-1),
        "energy": -scipy.special.logsumexp(x.mean(0), axis=-1),
        "entropy": entropy,
        "mutual_info": entropy - scipy.stats.entropy(member_probs, axis=-1).mean(0),
        "variation_ratio": 1 - scipy.stats.mode(votes, axis=0).count / shape[0],
    }
    assert scores._fields == ood.SCORES
    for name, value in expected.items():
        got = getattr(scores, name)
        assert got.shape == shape[1:2] and got.dtype == torch.float32, name
        torch.testing.assert_close(got.double(), torch.from_numpy(np.asarray(value, dtype=np.float64)),
                                   rtol=1e-5, atol=2e-5, msg=name)


def test_scores_with_the_member_dim_elsewhere_and_float64():
    logits = torch.randn(6, 4, 3, 11, dtype=torch.float64)  # [B, N, R, K]
    moved = uncertainty_scores(logits, dim=1)
    first = uncertainty_scores(logits.movedim(1, 0))
    for name in ood.SCORES:
        assert getattr(moved, name).shape == (6, 3) and getattr(moved, name).dtype == torch.float64
        torch.testing.assert_close(getattr(moved, name), getattr(first, name), msg=name)


def test_variation_ratio_counts_the_modal_class_not_the_ensemble_prediction():
    # Four members on one example: two vote class 0 (barely), one each for class 1 and 2 (very sure of class 1).
    logits = torch.tensor([[[0.1, 0.0, 0.0]], [[0.1, 0.0, 0.0]], [[0.0, 9.0, 0.0]], [[0.0, 0.0, 0.5]]])
    assert ensemble_stats(logits).prediction.item() == 1
    assert ood.variation_ratio(logits).item() == pytest.approx(0.5)  # 1 - 2/4: the mode is class 0
    assert ensemble_stats(logits).disagreement.item() == pytest.approx(0.75)  # 3 of 4 differ from class 1
    assert ensemble_reduce(logits, "vote").argmax(-1).item() == 0  # the modal class is the hard vote's
    # Wherever the modal class is the ensemble's prediction, the two scores are one.
    many = torch.randn(5, 500, 4, generator=torch.Generator().manual_seed(0))
    same = ensemble_reduce(many, "vote").argmax(-1) == ensemble_stats(many).prediction
    assert 0 < same.sum() < 500
    torch.testing.assert_close(ood.variation_ratio(many)[same], ensemble_stats(many).disagreement[same])
    assert (ensemble_stats(many).disagreement >= ood.variation_ratio(many)).all()
    # A tie for the mode counts once; one member gives 0.
    assert ood.variation_ratio(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])).item() == pytest.approx(0.5)
    assert ood.variation_ratio(torch.randn(1, 5, 4)).tolist() == [0.0] * 5


def test_energy_sees_the_scale_of_the_logits_and_every_score_grows_with_uncertainty():
    sure = torch.tensor([[[8.0, 0.0, 0.0]]] * 4)
    unsure = torch.tensor([[[8.0, 0.0, 0.0]], [[0.0, 8.0, 0.0]], [[0.0, 0.0, 8.0]], [[8.0, 0.0, 0.0]]])
    small = sure / 8
    for name in ood.SCORES:
        assert getattr(uncertainty_scores(unsure), name) > getattr(uncertainty_scores(sure), name), name
    assert uncertainty_scores(small).energy > uncertainty_scores(sure).energy


def test_rows_in_which_a_member_has_no_softmax_are_nan_in_every_score():
    logits = torch.randn(3, 5, 4)
    logits[1, 0, 2] = float("nan")
    logits[0, 1, 3] = float("inf")
    logits[2, 2] = float("-inf")  # every class
    logits[:, 3, 1] = float("-inf")  # one class in every member: probability 0, the row stays defined
    scores = uncertainty_scores(logits)
    for name in ood.SCORES:
        value = getattr(scores, name)
        assert value[:3].isnan().all() and value[3:].isfinite().all(), (name, value)
    finite = uncertainty_scores(logits[:, 3:])
    for name in ood.SCORES:
        torch.testing.assert_close(getattr(scores, name)[3:], getattr(finite, name), msg=name)


# ---- OOD detection metrics -----------------------------------------------------------------------------------------

def _ood_data(ties: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    scores_in = torch.rand(300, generator=g, dtype=torch.float64)
    scores_out = torch.rand(120, generator=g, dtype=torch.float64) * 0.7 + 0.3
    if ties:
        scores_in, scores_out = (scores_in * 10).round() / 10, (scores_out * 10).round() / 10
    # torchmetrics reads scores in [0, 1] as probabilities (it applies a sigmoid to anything else).
    preds = torch.cat([scores_in, scores_out])
    labels = torch.cat([torch.zeros(300, dtype=torch.long), torch.ones(120, dtype=torch.long)])
    return scores_in, scores_out, preds, labels


@pytest.mark.parametrize("ties", [False, True])
def test_aupr_equals_torchmetrics_and_sklearn(ties):
    scores_in, scores_out, preds, labels = _ood_data(ties)
    out = metrics.aupr(scores_in, scores_out)
    assert out == pytest.approx(binary_average_precision(preds, labels).item(), abs=1e-6)  # torchmetrics: fp32
    assert out == pytest.approx(average_precision_score(labels.numpy(), preds.numpy()), abs=1e-12)
    # AUPR-In: in-distribution examples are the positives, found by a lower score.
    assert metrics.aupr(scores_in, scores_out, positive="in") == pytest.approx(
        average_precision_score(1 - labels.numpy(), -preds.numpy()), abs=1e-12)
    assert metrics.aupr(scores_in, scores_out, positive="in") == pytest.approx(
        binary_average_precision(1 - preds, 1 - labels).item(), abs=1e-6)


@pytest.mark.parametrize("ties", [False, True])
def test_fpr_at_95_tpr_equals_torchmetrics_and_sklearn(ties):
    scores_in, scores_out, preds, labels = _ood_data(ties)
    fpr = metrics.fpr_at_95_tpr(scores_in, scores_out)
    specificity, _ = binary_specificity_at_sensitivity(preds, labels, min_sensitivity=0.95)
    assert fpr == pytest.approx(1 - specificity.item(), abs=1e-6)
    sk_fpr, sk_tpr, _ = roc_curve(labels.numpy(), preds.numpy(), drop_intermediate=False)
    assert fpr == pytest.approx(sk_fpr[np.argmax(sk_tpr >= 0.95)], abs=1e-12)
    assert metrics.auroc(scores_in, scores_out) == pytest.approx(binary_auroc(preds, labels).item(), abs=1e-6)
    assert metrics.auroc(scores_in, scores_out) == pytest.approx(roc_auc_score(labels.numpy(), preds.numpy()),
                                                                 abs=1e-12)


def test_fpr_at_95_tpr_and_aupr_by_hand():
    scores_in = torch.tensor([0.1, 0.2, 0.3, 0.6])
    scores_out = torch.tensor([0.6, 0.7, 0.8, 0.9])
    # 95% of 4 positives needs all 4: threshold 0.6 flags the tied in-distribution 0.6 too (ties are never split).
    assert metrics.fpr_at_95_tpr(scores_in, scores_out) == 0.25
    assert metrics.fpr_at_95_tpr(scores_in, scores_out, tpr=0.75) == 0.0
    # Thresholds 0.9, 0.8, 0.7 give precision 1 at recall 1/4, 2/4, 3/4; 0.6 gives 4/5 at recall 1.
    assert metrics.aupr(scores_in, scores_out) == pytest.approx(0.75 + 0.25 * 0.8)
    assert metrics.aupr(torch.tensor([0.0]), torch.tensor([1.0])) == 1.0


# ---- selective prediction ------------------------------------------------------------------------------------------

def _errors_and_confidence(b: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(b, 10, generator=g, dtype=torch.float64) * 3, -1)
    targets = torch.randint(0, 10, (b,), generator=g)
    targets[: b // 2] = probs[: b // 2].argmax(-1)
    return probs, targets


def _aurc_by_definition(errors: torch.Tensor, uncertainty: torch.Tensor) -> float:
    """Geifman & El-Yaniv: accept from the least uncertain; the mean selective risk over coverages k/B."""
    errors = errors[uncertainty.argsort()]
    return (errors.cumsum(0) / torch.arange(1, len(errors) + 1)).mean().item()


@pytest.mark.parametrize("b", [1, 2, 37, 1000])
def test_aurc_equals_the_definition_without_ties(b):
    probs, targets = _errors_and_confidence(b)
    confidence, prediction = probs.max(-1)
    errors = (prediction != targets).double()
    assert metrics.aurc(probs, targets).item() == pytest.approx(_aurc_by_definition(errors, -confidence), abs=1e-12)
    uncertainty = torch.rand(b, dtype=torch.float64)
    assert metrics.aurc(probs, targets, uncertainty).item() == pytest.approx(
        _aurc_by_definition(errors, uncertainty), abs=1e-12)


def test_aurc_with_ties_is_the_mean_over_the_orders_of_the_tied_examples():
    probs = torch.eye(3, dtype=torch.float64)[[0, 0, 0, 1, 1, 2, 2]]
    targets = torch.tensor([0, 1, 1, 1, 0, 2, 2])  # errors at examples 1, 2 and 4
    uncertainty = torch.tensor([0.5, 0.5, 0.5, 0.1, 0.9, 0.1, 0.5])
    errors = (probs.argmax(-1) != targets).double()
    tied = [0, 1, 2, 6]
    values = []
    for order in itertools.permutations(tied):
        ranked = torch.tensor([3, 5, *order, 4])  # 0.1, 0.1 (no error either way), the 0.5 run, 0.9
        values.append(_aurc_by_definition(errors[ranked], torch.arange(7.0)))
    assert metrics.aurc(probs, targets, uncertainty).item() == pytest.approx(sum(values) / len(values), abs=1e-12)


def test_aurc_bounds_and_shapes():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.55, 0.45]], dtype=torch.float64)
    # The two least confident are wrong: risk 0, 0, 1/3, 2/4 at coverages 1/4..1.
    assert metrics.aurc(probs, torch.tensor([0, 0, 1, 1])).item() == pytest.approx((1 / 3 + 1 / 2) / 4)
    # The two most confident are wrong: risk 1, 1, 2/3, 2/4.
    assert metrics.aurc(probs, torch.tensor([1, 1, 0, 0])).item() == pytest.approx((1 + 1 + 2 / 3 + 1 / 2) / 4)
    member_probs = torch.softmax(torch.randn(3, 50, 4), -1)
    targets = torch.randint(0, 4, (50,))
    per_member = metrics.aurc(member_probs, targets)
    assert per_member.shape == (3,)
    for i in range(3):
        assert per_member[i].item() == pytest.approx(metrics.aurc(member_probs[i], targets).item(), abs=1e-12)
    with pytest.raises(ValueError, match="uncertainty must be"):
        metrics.aurc(member_probs[0], targets, torch.rand(49))


# ---- adaptive ECE ----------------------------------------------------------------------------------------------------

def _adaptive_ece_by_definition(probs: torch.Tensor, targets: torch.Tensor, n_bins: int) -> float:
    confidence, prediction = probs.max(-1)
    order = confidence.argsort(stable=True)
    correct = (prediction == targets).double()[order]
    confidence = confidence[order]
    total = 0.0
    for conf_bin, correct_bin in zip(confidence.tensor_split(n_bins), correct.tensor_split(n_bins)):
        if len(conf_bin):
            total += len(conf_bin) / len(confidence) * abs(correct_bin.mean() - conf_bin.mean()).item()
    return total


@pytest.mark.parametrize("b, n_bins", [(1000, 15), (37, 15), (5, 15), (64, 1), (100, 10)])
def test_adaptive_ece_equals_the_definition(b, n_bins):
    probs, targets = _errors_and_confidence(b)
    assert metrics.adaptive_ece(probs, targets, n_bins).item() == pytest.approx(
        _adaptive_ece_by_definition(probs, targets, n_bins), abs=1e-12)


def test_adaptive_ece_equals_torchmetrics_ece_where_the_bins_coincide():
    # 20 confidences in each of [0.5, 0.6), ..., [0.9, 1.0): 5 equal-mass bins are torchmetrics' 10 equal-width
    # bins (the first five empty for two classes).
    g = torch.Generator().manual_seed(0)
    confidence = (torch.arange(5, dtype=torch.float64).repeat_interleave(20) + 5
                  + 0.05 + 0.9 * torch.rand(100, generator=g, dtype=torch.float64)) / 10
    probs = torch.stack([confidence, 1 - confidence], -1)
    targets = (torch.rand(100, generator=g) < 0.3).long()
    expected = multiclass_calibration_error(probs, targets, num_classes=2, n_bins=10, norm="l1").item()
    assert metrics.adaptive_ece(probs, targets, n_bins=5).item() == pytest.approx(expected, abs=1e-6)


def test_ece_equals_torchmetrics_off_the_bin_edges_and_differs_on_them():
    probs = torch.softmax(torch.randn(500, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2, -1)
    targets = torch.randint(0, 7, (500,), generator=torch.Generator().manual_seed(1))
    expected = multiclass_calibration_error(probs, targets, num_classes=7, n_bins=15, norm="l1").item()
    assert metrics.ece(probs, targets).item() == pytest.approx(expected, abs=1e-6)  # torchmetrics: fp32
    # A confidence on an edge (0.75 of 4 bins): ours counts it in the bin it closes, (0.5, 0.75]; torchmetrics in
    # the bin it opens, [0.75, 1).
    edge = torch.tensor([[0.75, 0.25], [0.875, 0.125]], dtype=torch.float64)
    targets = torch.tensor([0, 1])
    assert metrics.ece(edge, targets, n_bins=4).item() == pytest.approx(0.5 * 0.25 + 0.5 * 0.875)
    assert multiclass_calibration_error(edge, targets, num_classes=2, n_bins=4, norm="l1").item() == pytest.approx(
        0.8125 - 0.5)


def test_adaptive_ece_per_member_and_bad_bins():
    member_probs = torch.softmax(torch.randn(3, 40, 5), -1)
    targets = torch.randint(0, 5, (40,))
    per_member = metrics.adaptive_ece(member_probs, targets)
    for i in range(3):
        assert per_member[i].item() == pytest.approx(metrics.adaptive_ece(member_probs[i], targets).item())
    with pytest.raises(ValueError, match="n_bins must be a positive int"):
        metrics.adaptive_ece(member_probs, targets, n_bins=0)


def test_ood_metrics_reject_empty_or_non_finite_scores():
    for metric in (metrics.aupr, metrics.fpr_at_95_tpr, metrics.auroc):
        with pytest.raises(ValueError, match="at least one"):
            metric(torch.tensor([]), torch.tensor([1.0]))
        with pytest.raises(ValueError, match="finite"):
            metric(torch.tensor([float("nan")]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="positive must be"):
        metrics.aupr(torch.rand(3), torch.rand(3), positive="ood")
    with pytest.raises(ValueError, match="tpr must be"):
        metrics.fpr_at_95_tpr(torch.rand(3), torch.rand(3), tpr=0)
