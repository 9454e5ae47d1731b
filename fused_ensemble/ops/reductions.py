"""The ensemble reductions and their contract, written once for every backend and for ``FusedEnsemble``.

Every reduction takes logits with a member dim (anywhere but last) and the class dim last, accumulates in float32
(float64 stays float64) whatever the input dtype, and returns float32 (or float64). The kernels see the logits as
``[N, R, K]`` (members, rows, classes) with any strides.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

REDUCTIONS = ("mean", "mean_probs", "softmax_of_mean", "log_mean_probs", "vote")
"""Reductions over the member dim, shared by ``ensemble_reduce``, ``ensemble_linear_reduce`` and ``FusedEnsemble``:

- ``"mean"``: mean of the raw outputs (any output, regression too).
- ``"mean_probs"``: mean over members of ``softmax(logits)``: the deep-ensemble predictive distribution.
- ``"softmax_of_mean"``: ``softmax`` of the member-averaged logits.
- ``"log_mean_probs"``: ``log(mean_probs)``, computed stably as ``logsumexp_n(log_softmax) - log N``.
- ``"vote"``: hard voting. Each member votes for its argmax class (first index on ties); the result is the one-hot
  ``[..., K]`` of the class with the most votes (the lowest class on ties), in the reductions' float dtype. Not
  differentiable: the result never requires grad (as ``torch.argmax``'s), so no gradient flows back through it.

Non-finite logits, the same on every backend. ``-inf`` is a probability of 0. A row (all but the class dim) in
which some member's logits hold a NaN or a ``+inf``, or are ``-inf`` in every class, has no member softmax: every
reduction but ``"mean"`` is NaN in every class of that row (``"softmax_of_mean"`` also where the averaged logits of
a row are ``-inf`` in every class). ``"mean"`` averages raw outputs element by element with IEEE arithmetic
(a NaN or an infinity stays in its own class), as ``torch.mean`` does.
"""

KERNEL_REDUCTIONS = ("mean", "mean_probs", "softmax_of_mean", "log_mean_probs")
"""The reductions that the kernel backends (Triton, C++ and CUDA C++) implement; the others run on the ``"torch"``
backend only, which ``backend="auto"`` then chooses."""

MEMBER_INDEPENDENT_GRAD = ("mean", "softmax_of_mean")
"""Reductions whose gradient is the same for every member: the backward kernels return it once, ``[R, K]``."""

SAVES_MEMBER_SOFTMAX = ("mean_probs", "log_mean_probs")
"""Reductions whose forward kernels save each member row's softmax normalizer for the backward pass, as ``aux``
(see ``aux_shape``): ``aux[0, n, r]`` is the max of member n's row r, ``aux[1, n, r]`` the sum over classes of
``exp(x - max)``. The backward rebuilds ``softmax = exp(x - aux[0]) / aux[1]`` from them, exact for logits of any
magnitude (a log-sum-exp rounded to the logits' magnitude would not be: about 1e-3 relative at logits near 1e4).
A member row with no softmax (a NaN or ``+inf``, or ``-inf`` everywhere) saves unspecified values there."""


def aux_shape(reduction: str, members: int, rows: int) -> tuple[int, ...]:
    """The shape of the ``aux`` tensor that the forward kernels return next to ``out`` for ``reduction`` over
    ``[members, rows, K]`` logits: ``[2, N, R]`` for ``SAVES_MEMBER_SOFTMAX``, else empty ``(0,)``. Its dtype is the
    output's: float32, or float64 for float64 logits."""
    return (2, members, rows) if reduction in SAVES_MEMBER_SOFTMAX else (0,)


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class EnsembleStats(NamedTuple):
    """Predictive distribution and uncertainty statistics of an ensemble, per row (all but the class dim).

    - ``probs``: mean of the member softmaxes ``[..., K]``.
    - ``entropy``: predictive entropy of ``probs`` (nats), with ``0 log 0 = 0``.
    - ``expected_entropy``: mean of the member entropies (the aleatoric part).
    - ``mutual_info``: ``max(entropy - expected_entropy, 0)`` (the epistemic part; never negative: a difference
      that rounding takes below zero is 0).
    - ``confidence``: max of ``probs``.
    - ``prediction``: argmax of ``probs`` (int64, first index on ties).
    - ``disagreement``: the share of members whose own prediction, the argmax of their logits (first index on
      ties), differs from the ensemble's ``prediction``: ``1 - #{n : argmax(logits_n) == prediction} / N``. This is
      the variation ratio of torch-uncertainty (``VariationRatio(probabilistic=False)``), not its ``Disagreement``
      metric (the share of disagreeing member pairs).

    A row in which some member has no softmax (its logits hold a NaN or a ``+inf``, or are ``-inf`` in every class)
    has NaN in every float field, ``probs`` in every class included, and ``prediction`` 0 (``torch.argmax`` of
    that all-NaN ``probs`` row: its first NaN): find such rows with ``confidence.isnan()``. ``-inf`` logits
    elsewhere are probabilities of 0.
    """

    probs: torch.Tensor
    entropy: torch.Tensor
    expected_entropy: torch.Tensor
    mutual_info: torch.Tensor
    confidence: torch.Tensor
    prediction: torch.Tensor
    disagreement: torch.Tensor


def check_reduction(reduction: str) -> None:
    """Raises a ValueError unless ``reduction`` is one of ``REDUCTIONS``."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {', '.join(map(repr, REDUCTIONS))}")


def check_kernel_reduction(reduction: str) -> None:
    """Raises a ValueError unless ``reduction`` is one of ``KERNEL_REDUCTIONS`` (for the kernels' own launchers)."""
    if reduction not in KERNEL_REDUCTIONS:
        check_reduction(reduction)
        raise ValueError(f"the kernels do not implement reduction {reduction!r}; they implement "
                         f"{', '.join(map(repr, KERNEL_REDUCTIONS))} (the torch backend runs every reduction)")


def check_float_tensor(t, name: str) -> None:
    """Raises unless ``t`` is a dense (strided) float16/bfloat16/float32/float64 tensor (``name`` says which
    argument)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}; convert it with "
                        f".to_dense()")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                        f"got {t.dtype}")


def normalize_member_dim(logits: torch.Tensor, dim: int) -> int:
    """Checks ``logits`` and returns ``dim`` as a non-negative index of the member dim."""
    check_float_tensor(logits, "logits")
    if logits.dim() < 2:
        raise ValueError(f"logits must have a member dim and a class dim (at least 2 dims), "
                         f"got shape {tuple(logits.shape)}")
    if not -logits.dim() <= dim < logits.dim():
        raise ValueError(f"dim={dim} is out of range for logits with {logits.dim()} dims")
    dim = dim % logits.dim()
    if dim == logits.dim() - 1:
        raise ValueError(f"dim={dim} is the class dim (the last one); the member dim must be another dim")
    if logits.shape[dim] == 0:
        raise ValueError("the ensemble has no members: logits.shape[dim] == 0")
    return dim


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
