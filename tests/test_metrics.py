"""Metrics against values computed by hand on small tensors."""

import math

import pytest
import torch

from fused_ensemble import metrics
from fused_ensemble.ops.reference import stats_reference

# Four examples, three classes; confidences 0.7, 0.55, 0.38, 0.5 (none on a bin edge); predictions 0, 1, 2, 1.
PROBS = torch.tensor([[0.7, 0.2, 0.1],
                      [0.1, 0.55, 0.35],
                      [0.3, 0.32, 0.38],
                      [0.25, 0.5, 0.25]], dtype=torch.float64)
TARGETS = torch.tensor([0, 2, 2, 1])


def test_accuracy():
    assert metrics.accuracy(PROBS, TARGETS).item() == 0.75


def test_nll():
    expected = -(math.log(0.7) + math.log(0.35) + math.log(0.38) + math.log(0.5)) / 4
    assert metrics.nll(PROBS, TARGETS).item() == pytest.approx(expected, rel=1e-12)


def test_nll_of_a_zero_probability_is_large_but_finite():
    probs = torch.tensor([[1.0, 0.0]])
    assert metrics.nll(probs, torch.tensor([1])).item() == pytest.approx(-math.log(torch.finfo(torch.float32).tiny))


def test_brier():
    # Sum of squared differences to the one-hot target, per row: 0.14, 0.735, 0.5768, 0.375.
    assert metrics.brier(PROBS, TARGETS).item() == pytest.approx((0.14 + 0.735 + 0.5768 + 0.375) / 4, rel=1e-12)


def test_ece_and_reliability_diagram():
    # 5 bins of width 0.2: 0.38 -> bin 1 (correct), 0.55 and 0.5 -> bin 2 (one correct), 0.7 -> bin 3 (correct).
    diagram = metrics.reliability_diagram(PROBS, TARGETS, n_bins=5)
    assert diagram.count.tolist() == [0, 1, 2, 1, 0]
    torch.testing.assert_close(diagram.confidence, torch.tensor([0, 0.38, 0.525, 0.7, 0], dtype=torch.float64))
    torch.testing.assert_close(diagram.accuracy, torch.tensor([0, 1, 0.5, 1, 0], dtype=torch.float64))
    torch.testing.assert_close(diagram.edges, torch.linspace(0, 1, 6, dtype=torch.float64))
    expected = 0.62 * 1 / 4 + 0.025 * 2 / 4 + 0.3 * 1 / 4
    assert metrics.ece(PROBS, TARGETS, n_bins=5).item() == pytest.approx(expected, rel=1e-12)


def test_ece_default_is_15_bins_and_full_confidence_lands_in_the_last_bin():
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    diagram = metrics.reliability_diagram(probs, torch.tensor([0, 0]))
    assert diagram.count.tolist() == [0] * 14 + [2]
    assert metrics.ece(probs, torch.tensor([0, 0])).item() == pytest.approx(0.5)
    assert metrics.ece(probs, torch.tensor([0, 1])).item() == 0.0


def test_a_confidence_on_a_bin_edge_falls_in_the_bin_below():
    # Confidences 0.25, 0.5, 0.75 and 1 (exact in float32 and float64) with 4 bins: each closes a bin.
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.5, 0.25, 0.125, 0.125], [0.75, 0.125, 0.0625, 0.0625],
                          [1.0, 0.0, 0.0, 0.0]])
    diagram = metrics.reliability_diagram(probs, torch.zeros(4, dtype=torch.long), n_bins=4)
    assert diagram.count.tolist() == [1, 1, 1, 1]
    torch.testing.assert_close(diagram.confidence, torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    # The convention is stated where a user reads about ECE.
    for doc in (metrics.ece.__doc__, metrics.__doc__):
        assert "(0, 1]" in doc and "bin below" in doc
    assert "15" in metrics.ece.__doc__


def test_member_probs_give_one_value_per_member():
    member_probs = torch.stack([PROBS, PROBS.flip(-1), torch.full_like(PROBS, 1 / 3)])
    for name in ("accuracy", "nll", "brier", "ece"):
        metric = getattr(metrics, name)
        per_member = metric(member_probs, TARGETS)
        assert per_member.shape == (3,)
        for i in range(3):
            assert per_member[i].item() == pytest.approx(metric(member_probs[i], TARGETS).item(), rel=1e-12), name


def test_entropy_and_mutual_information_by_hand():
    disagree = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # two confident members that disagree
    agree = torch.tensor([[[0.5, 0.5]], [[0.5, 0.5]]])  # two members equally unsure
    assert metrics.predictive_entropy(torch.tensor([0.5, 0.5])).item() == pytest.approx(math.log(2))
    assert metrics.predictive_entropy(torch.tensor([1.0, 0.0])).item() == 0.0
    assert metrics.mutual_information(disagree).item() == pytest.approx(math.log(2))
    assert metrics.mutual_information(agree).item() == pytest.approx(0.0, abs=1e-15)


def test_mutual_information_matches_the_reference_stats():
    logits = torch.randn(5, 7, 4, dtype=torch.float64) * 3
    reference = stats_reference(logits)
    torch.testing.assert_close(metrics.mutual_information(logits.softmax(-1)), reference.mutual_info)
    torch.testing.assert_close(metrics.predictive_entropy(reference.probs), reference.entropy)


def _pairwise_disagreement_loop(member_probs):
    """The fraction of member pairs (i < j) whose argmax differs, example by example."""
    predictions = member_probs.argmax(-1)
    n, b = predictions.shape
    values = []
    for example in range(b):
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        differ = sum(int(predictions[i, example] != predictions[j, example]) for i, j in pairs)
        values.append(differ / len(pairs) if pairs else 0.0)
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize("n, k", [(1, 3), (2, 2), (3, 3), (5, 3), (8, 10), (9, 4)])
def test_pairwise_disagreement_matches_a_loop_over_member_pairs(n, k):
    generator = torch.Generator().manual_seed(n * 100 + k)
    member_probs = (torch.randn(n, 37, k, generator=generator) * 2).softmax(-1)
    if n > 2:
        member_probs[:, 0] = member_probs[0, 0]  # an example where all members agree
    got = metrics.pairwise_disagreement(member_probs)
    assert got.shape == (37,) and got.dtype == torch.float64
    torch.testing.assert_close(got, _pairwise_disagreement_loop(member_probs), rtol=1e-12, atol=1e-12)
    if n > 2:
        assert got[0].item() == 0.0


def test_pairwise_disagreement_by_hand_beside_the_variation_ratio():
    # Four members, two predict class 0 and two class 1: 4 of the 6 pairs differ; two of the four members differ
    # from the ensemble's prediction (the variation-ratio style disagreement of ensemble_stats).
    logits = torch.tensor([[[3.0, 0.0]], [[2.0, 0.0]], [[0.0, 1.0]], [[0.0, 1.5]]], dtype=torch.float64)
    assert metrics.pairwise_disagreement(logits.softmax(-1)).tolist() == [pytest.approx(2 / 3)]
    assert stats_reference(logits).disagreement.tolist() == [0.5]
    all_differ = torch.eye(3, dtype=torch.float64).unsqueeze(1)  # three members, three classes
    assert metrics.pairwise_disagreement(all_differ).tolist() == [1.0]
    with pytest.raises(ValueError, match=r"member_probs must be \[N, B, K\]"):
        metrics.pairwise_disagreement(torch.rand(4, 3))


def test_auroc_by_hand_with_ties():
    scores_in = torch.tensor([0.1, 0.4, 0.35, 0.8])
    scores_out = torch.tensor([0.9, 0.4, 0.65])
    # Pairs where OOD scores higher: 0.9 beats 4, 0.4 beats 2 and ties 1, 0.65 beats 3: (4 + 2.5 + 3) / 12.
    assert metrics.auroc(scores_in, scores_out) == pytest.approx(9.5 / 12)
    assert metrics.auroc(torch.tensor([0.0, 0.1]), torch.tensor([0.5])) == 1.0
    assert metrics.auroc(torch.tensor([0.5]), torch.tensor([0.5])) == 0.5


def test_ood_auroc_separates_disagreeing_members():
    confident = torch.tensor([[[0.9, 0.1]] * 3, [[0.85, 0.15]] * 3])  # [N=2, B=3, K=2], members agree
    split = torch.tensor([[[0.9, 0.1]] * 2, [[0.1, 0.9]] * 2])  # members disagree on OOD inputs
    assert metrics.ood_auroc(confident, split, score="mutual_info") == 1.0
    assert metrics.ood_auroc(confident, split, score="entropy") == 1.0
    with pytest.raises(ValueError, match="unknown score 'variance'"):
        metrics.ood_auroc(confident, split, score="variance")


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"targets of shape \(3,\) do not match probs of shape \(4, 3\)"):
        metrics.accuracy(PROBS, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 2\]"):
        metrics.nll(PROBS, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(TypeError, match="targets must be an integer tensor"):
        metrics.brier(PROBS, TARGETS.float())
    with pytest.raises(ValueError, match="n_bins must be a positive int"):
        metrics.ece(PROBS, TARGETS, n_bins=0)
    with pytest.raises(ValueError, match="auroc needs at least one"):
        metrics.auroc(torch.tensor([]), torch.tensor([1.0]))
