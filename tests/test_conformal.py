"""SplitConformal: the scores by hand, the threshold as the exact finite-sample order statistic, and the coverage
guarantee over many independent calibration/test draws.

The coverage checks are statistical. Each of T = 200 trials draws a fresh calibration and test set, i.i.d., from one
distribution, so the T test coverages are independent; their mean estimates the expected coverage with standard
error SE = (sample std) / sqrt(T). The guarantee is E[coverage] >= 1 - alpha, so the test asserts
``mean >= 1 - alpha - 3 SE`` (a false alarm once in about 700 seeds; the seeds are fixed, so the outcome is too).
Where the scores have no ties (THR on continuous probabilities, randomized APS and RAPS), E[coverage] is at most
``1 - alpha + 1 / (n + 1)`` as well, and for THR exactly ``k / (n + 1)`` with ``k = ceil((n + 1)(1 - alpha))``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fused_ensemble import SplitConformal

TRIALS = 200


def _draw(trials: int, n: int, k: int, seed: int, temperature: float = 0.7):
    """``trials`` independent sets of n examples: a model's probabilities and labels drawn from a distribution the
    model is overconfident about (softmax of the same logits at ``temperature`` x their scale)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(trials, n, k, generator=g, dtype=torch.float64) * (
        0.5 + 2.5 * torch.rand(trials, n, 1, generator=g, dtype=torch.float64))
    probs = torch.softmax(logits, -1)
    truth = torch.softmax(logits * temperature, -1)
    labels = torch.multinomial(truth.reshape(-1, k), 1, generator=g).reshape(trials, n)
    return probs, labels


def _coverages(make, n_cal: int = 200, n_test: int = 200, k: int = 10, seed: int = 0, **draw):
    probs, labels = _draw(TRIALS, n_cal + n_test, k, seed, **draw)
    coverages, sizes = [], []
    for trial in range(TRIALS):
        conformal = make().fit(probs[trial, :n_cal], labels[trial, :n_cal])
        sets = conformal.predict_sets(probs[trial, n_cal:])
        coverages.append(sets.gather(-1, labels[trial, n_cal:, None]).double().mean().item())
        sizes.append(sets.sum(-1).double().mean().item())
    coverages = torch.tensor(coverages)
    return coverages.mean().item(), coverages.std().item() / math.sqrt(TRIALS), sum(sizes) / TRIALS


VARIANTS = {
    "thr": dict(score="thr"),
    "aps": dict(score="aps"),
    "aps-randomized": dict(score="aps", randomized=True),
    "raps": dict(score="raps", k_reg=2, lam=0.05),
    "raps-randomized": dict(score="raps", k_reg=2, lam=0.05, randomized=True),
}
NO_TIES = ("thr", "aps-randomized", "raps-randomized")


@pytest.mark.parametrize("alpha", [0.1, 0.05])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_mean_coverage_over_independent_draws_is_at_least_1_minus_alpha(variant, alpha):
    n_cal = 200
    generator = torch.Generator().manual_seed(1)
    kwargs = dict(VARIANTS[variant], **({"generator": generator} if VARIANTS[variant].get("randomized") else {}))
    mean, se, _ = _coverages(lambda: SplitConformal(alpha=alpha, **kwargs), n_cal=n_cal)
    assert mean >= 1 - alpha - 3 * se, (mean, se)
    if variant in NO_TIES:
        assert mean <= 1 - alpha + 1 / (n_cal + 1) + 3 * se, (mean, se)


def test_thr_coverage_is_k_over_n_plus_1_the_exact_order_statistic():
    # n = 50, alpha = 0.1: k = 46, E[coverage] = 46/51 = 0.902. The next order statistic (numpy's "higher" at
    # level k/n) would give 47/51 = 0.922, 6 standard errors away.
    mean, se, _ = _coverages(lambda: SplitConformal("thr", alpha=0.1), n_cal=50, n_test=500)
    assert abs(mean - 46 / 51) <= 3 * se, (mean, se)
    assert abs(mean - 47 / 51) > 3 * se


def test_raps_sets_are_no_larger_than_aps_sets_on_a_long_flat_tail():
    # 50 classes, a model that ranks well but spreads its probability thin (the labels follow the same logits at 4x
    # their scale): APS must sum far down the flat tail to reach its mass; RAPS penalizes ranks past k_reg.
    make_aps = lambda: SplitConformal("aps", alpha=0.1)  # noqa: E731
    make_raps = lambda: SplitConformal("raps", alpha=0.1, k_reg=2, lam=0.05)  # noqa: E731
    aps_mean, aps_se, aps_size = _coverages(make_aps, k=50, temperature=4.0)
    raps_mean, raps_se, raps_size = _coverages(make_raps, k=50, temperature=4.0)
    assert raps_size < 0.8 * aps_size  # 4.1 against 7.0 classes
    assert raps_mean >= 0.9 - 3 * raps_se and aps_mean >= 0.9 - 3 * aps_se


def test_qhat_is_numpys_inverted_cdf_quantile_at_ceil_n_plus_1_times_1_minus_alpha_over_n():
    g = torch.Generator().manual_seed(0)
    for n, alpha in [(9, 0.1), (100, 0.1), (57, 0.05), (1000, 0.2), (19, 0.05)]:
        probs = torch.softmax(torch.randn(n, 5, generator=g, dtype=torch.float64), -1)
        targets = torch.randint(0, 5, (n,), generator=g)
        conformal = SplitConformal("thr", alpha=alpha).fit(probs, targets)
        true_scores = 1 - probs.gather(-1, targets[:, None]).squeeze(-1)
        level = math.ceil((n + 1) * (1 - alpha) - 1e-9) / n
        assert conformal.qhat == np.quantile(true_scores.numpy(), level, method="inverted_cdf"), (n, alpha)
        assert conformal.n_calibration == n


def test_too_few_calibration_examples_give_full_sets():
    probs = torch.softmax(torch.randn(8, 4), -1)
    conformal = SplitConformal("aps", alpha=0.1).fit(probs, torch.zeros(8, dtype=torch.long))  # k = 9 > n = 8
    assert conformal.qhat == math.inf
    assert conformal.predict_sets(probs).all() and conformal.mean_set_size(probs) == 4


def test_scores_by_hand():
    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25]], dtype=torch.float64)  # ranks: 1 -> 1st, 3 -> 2nd, 2, 0
    thr = SplitConformal("thr").scores(probs)
    torch.testing.assert_close(thr, torch.tensor([[0.9, 0.5, 0.85, 0.75]], dtype=torch.float64))
    aps = SplitConformal("aps").scores(probs)
    torch.testing.assert_close(aps, torch.tensor([[1.0, 0.5, 0.9, 0.75]], dtype=torch.float64))
    raps = SplitConformal("raps", k_reg=1, lam=0.1).scores(probs)  # + 0.1 per rank past the first
    torch.testing.assert_close(raps, torch.tensor([[1.3, 0.5, 1.1, 0.85]], dtype=torch.float64))
    u = torch.rand(1, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    randomized = SplitConformal("aps", randomized=True, generator=torch.Generator().manual_seed(3)).scores(probs)
    exclusive = torch.tensor([[0.9, 0.0, 0.75, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(randomized, exclusive + u * probs)
    # Tied probabilities rank by class index: the first tied class counts first.
    tied = SplitConformal("aps").scores(torch.tensor([[0.4, 0.4, 0.2]], dtype=torch.float64))
    torch.testing.assert_close(tied, torch.tensor([[0.4, 0.8, 1.0]], dtype=torch.float64))


def test_sets_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.05, 0.05, 0.9]], dtype=torch.float64)
    targets = torch.tensor([0, 1, 2])
    aps = SplitConformal("aps", alpha=0.5).fit(probs, targets)  # true scores 0.7, 0.75, 0.9: k = 2, qhat = 0.75
    assert aps.qhat == pytest.approx(0.75)
    # Cumulative mass by rank: 0.7, 0.9 | 0.4, 0.75, 1 | 0.9: down to the first class past qhat, included.
    assert aps.predict_sets(probs).tolist() == [[True, True, False], [True, True, True], [False, False, True]]
    assert aps.coverage(probs, targets) == 1.0
    assert aps.mean_set_size(probs) == pytest.approx(2.0)
    thr = SplitConformal("thr", alpha=0.5).fit(probs, targets)  # true scores 0.3, 0.65, 0.1: qhat = 0.3
    # THR: exactly {y : 1 - p_y <= 0.3}; the second example has no class that probable: an empty set.
    assert thr.predict_sets(probs).tolist() == [[True, False, False], [False, False, False], [False, False, True]]
    assert thr.coverage(probs, targets) == pytest.approx(2 / 3)
    # Randomized APS: exactly {y : s(x, y, u) <= qhat}, empty when u * p_top is past qhat.
    randomized = SplitConformal("aps", alpha=0.5, randomized=True, generator=torch.Generator().manual_seed(0))
    randomized.qhat = 0.1
    scores = randomized.scores(probs)
    randomized.generator.manual_seed(0)
    assert torch.equal(randomized.predict_sets(probs), scores <= 0.1)


def test_randomization_is_optional_and_seeded():
    probs, labels = _draw(1, 400, 10, seed=5)
    probs, labels = probs[0], labels[0]

    def sets(seed):
        conformal = SplitConformal("aps", randomized=True, generator=torch.Generator().manual_seed(seed))
        return conformal.fit(probs[:200], labels[:200]).predict_sets(probs[200:])

    assert torch.equal(sets(0), sets(0))
    assert not torch.equal(sets(0), sets(1))
    state = torch.get_rng_state()
    deterministic = SplitConformal("aps").fit(probs[:200], labels[:200])
    assert torch.equal(deterministic.predict_sets(probs[200:]), deterministic.predict_sets(probs[200:]))
    assert torch.equal(torch.get_rng_state(), state)  # the deterministic sets draw nothing


def test_bad_arguments_are_refused_with_a_reason():
    probs = torch.softmax(torch.randn(10, 3), -1)
    with pytest.raises(ValueError, match="unknown score 'lac'"):
        SplitConformal("lac")
    with pytest.raises(ValueError, match=r"alpha must be a number in \(0, 1\)"):
        SplitConformal(alpha=1.5)
    with pytest.raises(ValueError, match="k_reg and lam are parameters of score 'raps', not 'aps'"):
        SplitConformal("aps", lam=0.1)
    with pytest.raises(ValueError, match="score 'thr' has no randomized form"):
        SplitConformal("thr", randomized=True)
    with pytest.raises(ValueError, match="a generator draws the randomization"):
        SplitConformal("aps", generator=torch.Generator())
    with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
        SplitConformal("raps", lam=-1.0)
    with pytest.raises(RuntimeError, match="not fitted"):
        SplitConformal().predict_sets(probs)
    with pytest.raises(ValueError, match=r"targets of shape \(9,\) do not match probs of shape \(10, 3\)"):
        SplitConformal().fit(probs, torch.zeros(9, dtype=torch.long))
    with pytest.raises(TypeError, match=r"probs must be a floating-point tensor of class probabilities \[B, K\]"):
        SplitConformal().fit(probs[None], torch.zeros(10, dtype=torch.long))
