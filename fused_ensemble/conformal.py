"""Split conformal prediction sets for classifiers: sets of classes that contain the true class with probability at
least ``1 - alpha``.

``SplitConformal(score, alpha).fit(probs, targets)`` computes a nonconformity score ``s(x, y)`` of the true class of
every example of a calibration split and keeps ``q_hat``, the ``ceil((n + 1)(1 - alpha))``-th smallest of the n
scores; ``predict_sets(probs)`` returns, per example, the classes whose score is within ``q_hat`` (see below). When
the calibration and test examples are exchangeable (for instance, drawn i.i.d. from one distribution), the true
class of a new example lies in its set with probability at least ``1 - alpha`` (and at most
``1 - alpha + 1 / (n + 1)`` for the sets ``{y : s(x, y) <= q_hat}`` when the scores have no ties, as with
``randomized=True``). The probability is over the calibration split and the test
example together: the guarantee is marginal (on average over inputs), not conditional on the input or its class, and
says nothing of examples drawn from another distribution.

Scores (``p`` the probabilities of one example, classes ranked by decreasing ``p``, ties by class index; ``rank(y)``
1-based; ``u`` uniform on [0, 1], one per example):

- ``"thr"`` (Sadinle et al., 2019, "least ambiguous set-valued classifiers"): ``1 - p_y``. The smallest sets on
  average; they adapt little to how hard an input is.
- ``"aps"`` (Romano et al., 2020, adaptive prediction sets): the probability mass of the classes ranked above y,
  plus ``p_y`` (``randomized=False``) or ``u * p_y`` (``randomized=True``). Sets grow with the input's ambiguity.
- ``"raps"`` (Angelopoulos et al., 2021, regularized APS): the APS score plus ``lam * max(0, rank(y) - k_reg)``, which
  penalizes classes ranked below the ``k_reg``-th: smaller sets than APS when the tail of ``p`` is long and flat.

Prediction sets: THR and the randomized scores give exactly ``{y : s(x, y) <= q_hat}``; with continuous scores their
coverage is close to ``1 - alpha`` from above, and a set may be empty (THR: no class is probable enough;
randomized APS: ``u`` times the top class's probability is past ``q_hat``). Deterministic APS and RAPS give the
papers' sets: the top ``L`` classes with ``L = |{y : s(x, y) <= q_hat}| + 1``, that is, down to and including the
first class whose score passes ``q_hat`` (Angelopoulos et al.'s Algorithm 2 without its randomization step; Romano
et al.'s generalized quantile sets, up to a score exactly equal to ``q_hat``). These sets hold
``{y : s(x, y) <= q_hat}``, so they cover at least as often, and they are never empty; when the top class carries
most of the mass they are conservative and larger than the randomized ones.

``q_hat`` is an order statistic, never interpolated: with ``k = ceil((n + 1)(1 - alpha))`` it is the score at
sorted position k (1-based), numpy's ``quantile(scores, k / n, method="inverted_cdf")``. (numpy's
``method="higher"`` at level ``k / n`` picks the next order statistic for most n: valid, but more conservative.)
When ``k > n`` (``alpha < 1 / (n + 1)``) no finite threshold is valid: ``q_hat = inf`` and every set holds every
class.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["SplitConformal", "SCORES"]

SCORES = ("thr", "aps", "raps")
"""The nonconformity scores of ``SplitConformal``."""


def _check_probs(probs, name: str = "probs") -> Tensor:
    if not isinstance(probs, torch.Tensor) or not probs.is_floating_point() or probs.dim() != 2:
        raise TypeError(f"{name} must be a floating-point tensor of class probabilities [B, K]")
    if probs.shape[1] == 0:
        raise ValueError(f"{name} of shape {tuple(probs.shape)} have no classes")
    return probs.detach().to(torch.float64)


def _check_targets(probs: Tensor, targets) -> Tensor:
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32, torch.uint8):
        raise TypeError("targets must be an integer tensor of class indices, shape [B]")
    if targets.shape != probs.shape[:1]:
        raise ValueError(f"targets of shape {tuple(targets.shape)} do not match probs of shape "
                         f"{tuple(probs.shape)} (expected [B] against [B, K])")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= probs.shape[1]):
        raise ValueError(f"targets must lie in [0, {probs.shape[1] - 1}] (K = {probs.shape[1]} classes)")
    return targets.long().to(probs.device)


class SplitConformal:
    """Split conformal prediction sets with coverage at least ``1 - alpha`` (see the module doc).

    Args:
        score: ``"thr"``, ``"aps"`` or ``"raps"``.
        alpha: the miscoverage level, in (0, 1): sets contain the true class with probability >= ``1 - alpha``.
        k_reg: ``"raps"`` only: classes ranked below the ``k_reg``-th are penalized (default 1).
        lam: ``"raps"`` only: the penalty per rank below ``k_reg`` (default 0.01; 0 gives APS).
        randomized: ``"aps"``/``"raps"`` only: count a uniform fraction ``u`` of the class's own probability instead
            of all of it (Romano et al.'s randomized sets: coverage close to ``1 - alpha`` from above rather than
            conservative). ``u`` is drawn per example, at ``fit`` and at every ``predict_sets`` call.
        generator: the ``torch.Generator`` that draws ``u`` (seed it for reproducible sets); default: torch's global
            generator. Only with ``randomized=True``.

    Example::

        >>> conformal = SplitConformal("aps", alpha=0.1).fit(calibration_probs, calibration_targets)
        >>> sets = conformal.predict_sets(test_probs)          # bool [B, K]
        >>> conformal.coverage(test_probs, test_targets), conformal.mean_set_size(test_probs)
    """

    def __init__(self, score: str = "aps", alpha: float = 0.1, k_reg: int | None = None, lam: float | None = None,
                 randomized: bool = False, generator: torch.Generator | None = None):
        if score not in SCORES:
            raise ValueError(f"unknown score {score!r}; expected one of {', '.join(map(repr, SCORES))}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
            raise ValueError(f"alpha must be a number in (0, 1), got {alpha!r}")
        if score != "raps" and (k_reg is not None or lam is not None):
            raise ValueError(f"k_reg and lam are parameters of score 'raps', not {score!r}")
        k_reg = 1 if k_reg is None else k_reg
        lam = 0.01 if lam is None else lam
        if isinstance(k_reg, bool) or not isinstance(k_reg, int) or k_reg < 0:
            raise ValueError(f"k_reg must be a non-negative int, got {k_reg!r}")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0 or math.isinf(lam):
            raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
        if not isinstance(randomized, bool):
            raise TypeError(f"randomized must be a bool, got {randomized!r}")
        if randomized and score == "thr":
            raise ValueError("score 'thr' has no randomized form; randomized=True is for 'aps' and 'raps'")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator is not None and not randomized:
            raise ValueError("a generator draws the randomization of randomized=True; the sets are deterministic "
                             "without it")
        self.score, self.alpha, self.k_reg, self.lam = score, float(alpha), k_reg, float(lam)
        self.randomized, self.generator = randomized, generator
        self.qhat: float | None = None
        """The fitted threshold on the score (``inf`` when the calibration split is too small for ``alpha``)."""
        self.n_calibration: int | None = None

    def _ranked_scores(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        """APS/RAPS scores of the classes in rank order ``[B, K]``, and the class at each rank."""
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        if self.randomized:
            u = torch.rand(probs.shape[0], 1, dtype=torch.float64, generator=self.generator)
            sorted_scores = sorted_probs.cumsum(-1) - (1 - u.to(probs.device)) * sorted_probs
        else:
            sorted_scores = sorted_probs.cumsum(-1)
        if self.score == "raps":
            rank = torch.arange(1, probs.shape[1] + 1, dtype=torch.float64, device=probs.device)
            sorted_scores = sorted_scores + self.lam * (rank - self.k_reg).clamp_min(0)
        return sorted_scores, order

    def scores(self, probs: Tensor) -> Tensor:
        """The nonconformity score ``s(x, y)`` of every class of every example of ``probs [B, K]``: ``[B, K]``
        float64 (randomized scores draw a fresh ``u`` per example)."""
        probs = _check_probs(probs)
        if self.score == "thr":
            return 1 - probs
        sorted_scores, order = self._ranked_scores(probs)
        return torch.empty_like(sorted_scores).scatter_(-1, order, sorted_scores)

    def fit(self, probs: Tensor, targets: Tensor) -> SplitConformal:
        """Calibrates ``q_hat`` on a calibration split: class probabilities ``[n, K]`` (the ensemble's, or any
        classifier's) and true classes ``[n]``. Returns ``self``."""
        probs = _check_probs(probs)
        targets = _check_targets(probs, targets)
        n = targets.numel()
        if n == 0:
            raise ValueError("fit needs at least one calibration example (n = 0)")
        true_scores = self.scores(probs).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        # The k-th smallest score, k = ceil((n + 1)(1 - alpha)); the small tolerance keeps (n + 1)(1 - alpha) that
        # is an integer up to rounding (n = 9, alpha = 0.1: 9.000000000000002) from moving up one rank.
        k = math.ceil((n + 1) * (1 - self.alpha) - 1e-9)
        self.qhat = math.inf if k > n else true_scores.sort().values[k - 1].item()
        self.n_calibration = n
        return self

    def predict_sets(self, probs: Tensor) -> Tensor:
        """The prediction sets of ``probs [B, K]`` as a boolean mask ``[B, K]``: the classes y with
        ``s(x, y) <= q_hat``, and for deterministic ``"aps"``/``"raps"`` also the class ranked next (see the module
        doc)."""
        if self.qhat is None:
            raise RuntimeError("SplitConformal is not fitted: call fit(probs, targets) on a calibration split")
        probs = _check_probs(probs)
        if self.score == "thr":
            return 1 - probs <= self.qhat
        sorted_scores, order = self._ranked_scores(probs)
        if self.randomized:
            sorted_sets = sorted_scores <= self.qhat
        else:
            # The top class always; each next class while the one ranked before it is within q_hat.
            sorted_sets = torch.ones_like(sorted_scores, dtype=torch.bool)
            sorted_sets[:, 1:] = sorted_scores[:, :-1] <= self.qhat
        return torch.empty_like(sorted_sets).scatter_(-1, order, sorted_sets)

    def coverage(self, probs: Tensor, targets: Tensor) -> float:
        """The fraction of examples whose true class is in their prediction set."""
        targets = _check_targets(_check_probs(probs), targets)
        if targets.numel() == 0:
            raise ValueError("coverage needs at least one example (B = 0)")
        sets = self.predict_sets(probs)
        return sets.gather(-1, targets.unsqueeze(-1)).to(torch.float64).mean().item()

    def mean_set_size(self, probs: Tensor) -> float:
        """The mean number of classes per prediction set (empty sets count 0)."""
        sets = self.predict_sets(probs)
        if sets.shape[0] == 0:
            raise ValueError("mean_set_size needs at least one example (B = 0)")
        return sets.sum(-1).to(torch.float64).mean().item()

    def __repr__(self) -> str:
        extra = f", k_reg={self.k_reg}, lam={self.lam}" if self.score == "raps" else ""
        extra += ", randomized=True" if self.randomized else ""
        fitted = "not fitted" if self.qhat is None else f"qhat={self.qhat:.6g} from {self.n_calibration} examples"
        return f"SplitConformal({self.score!r}, alpha={self.alpha}{extra}, {fitted})"
