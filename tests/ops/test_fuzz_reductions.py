"""Property-based fuzzing of ensemble_reduce and ensemble_stats on every CPU backend against the float64 reference.

Hypothesis draws the shape (size 1 and non-powers of two included, K up to a few thousand), the layout (member dim
in the middle, transposed, expanded with zero strides, sliced, extra batch dims), the dtype (float32 and float64;
float16 and bfloat16 on the torch and cpp backends), the logits' scale (1e-3 to 1e4) and offset, a non-finite entry
now and then, and the reduction. Every example checks the output, the gradient (``torch.autograd.grad`` with a
random upstream gradient, finite logits only) and the ensemble_stats fields against the reference run in float64
on the same (rounded) logits. The Triton kernels run under TRITON_INTERPRET=1: float32 and small shapes only.

Deterministic (``derandomize=True``: the same examples on every run) and bounded in time: about a minute for the
whole file on a 2-core CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fused_ensemble import REDUCTIONS, ensemble_reduce, ensemble_stats
from fused_ensemble.ops import dispatch
from fused_ensemble.ops.reductions import KERNEL_REDUCTIONS
from fused_ensemble.ops.reference import reduce_reference, stats_reference

from interpreter_warnings import IGNORE_INTERPRETER_WARNINGS

# The interpreter's max of an all-NaN row (a member row holding one NaN class) warns through numpy.
pytestmark = IGNORE_INTERPRETER_WARNINGS + [pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")]

EPS32 = torch.finfo(torch.float32).eps
LAYOUTS = ("contiguous", "member-middle", "transposed", "expanded-members", "expanded-rows", "sliced", "batch-dims")
SCALES = (1e-3, 1.0, 30.0, 1e4)
OFFSETS = (0.0, 0.0, 1e3, -1e4, 1e4)
NON_FINITE = ("none", "none", "none", "none", "nan", "+inf", "-inf", "-inf-member-row")
GRAD_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-5, torch.float64: 1e-10}


def _unavailable(backend: str) -> str | None:
    return dispatch.unavailable_reason(backend, "cpu", torch.float32)


@st.composite
def cases(draw, small: bool, dtypes: tuple[torch.dtype, ...], reductions: tuple[str, ...]):
    """One fuzz case: the leaf logits, how to view them as the op's input, the member dim, and what to check."""
    members = draw(st.integers(1, 3 if small else 5))
    rows = draw(st.sampled_from((1, 2, 3) if small else (0, 1, 2, 3, 5, 7)))
    if small:
        classes = draw(st.sampled_from((1, 2, 5, 16, 33)))
    else:
        classes = draw(st.one_of(st.integers(1, 40), st.sampled_from((100, 127, 1000, 2049, 4099))))
    return dict(members=members, rows=rows, classes=classes, layout=draw(st.sampled_from(LAYOUTS)),
                dtype=draw(st.sampled_from(dtypes)), scale=draw(st.sampled_from(SCALES)),
                offset=draw(st.sampled_from(OFFSETS)), non_finite=draw(st.sampled_from(NON_FINITE)),
                reduction=draw(st.sampled_from(reductions)), seed=draw(st.integers(0, 2**31 - 1)))


def _leaf_and_view(case):
    """Fresh logits ``leaf`` (float64, before the cast to the case's dtype), a function that views a tensor like the
    leaf as the op's input, and the member dim of that input."""
    n, r, k = case["members"], case["rows"], case["classes"]
    shapes = {"contiguous": (n, r, k), "member-middle": (r, n, k), "transposed": (k, r, n),
              "expanded-members": (1, r, k), "expanded-rows": (n, 1, k), "sliced": (n + 1, 2 * r, 2 * k),
              "batch-dims": (n, 2, r, k)}
    views = {"contiguous": (lambda t: t, 0), "member-middle": (lambda t: t, 1),
             "transposed": (lambda t: t.permute(2, 1, 0), 0), "expanded-members": (lambda t: t.expand(n, r, k), 0),
             "expanded-rows": (lambda t: t.expand(n, r, k), 0), "sliced": (lambda t: t[1:, ::2, 1::2], 0),
             "batch-dims": (lambda t: t, 0)}
    generator = torch.Generator().manual_seed(case["seed"])
    leaf = torch.randn(shapes[case["layout"]], generator=generator, dtype=torch.float64)
    leaf = leaf * case["scale"] + case["offset"]
    view, dim = views[case["layout"]]
    if case["non_finite"] != "none" and leaf.numel():
        # One entry, or one member row (every class of one member in one row: the leaf's class dim is its last, but
        # for "transposed" its first).
        index = [int(torch.randint(size, (1,), generator=generator)) for size in leaf.shape]
        if case["non_finite"] == "-inf-member-row":
            index[0 if case["layout"] == "transposed" else -1] = slice(None)
        leaf[tuple(index)] = {"nan": math.nan, "+inf": math.inf}.get(case["non_finite"], -math.inf)
    return leaf.to(case["dtype"]), view, dim


def _tolerance_scale(x64: torch.Tensor) -> float:
    """The largest finite logit magnitude: float32 rounds a logit-sized sum (a mean, ``out`` of log_mean_probs) to
    about EPS32 times it."""
    finite = x64[torch.isfinite(x64)]
    return finite.abs().max().item() if finite.numel() else 0.0


def _assert_close(actual, expected, rtol, atol_rel, what):
    """Same NaN/inf pattern as the reference; finite values within rtol and an atol relative to the largest one."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, what
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite), f"{what}: finiteness differs from the reference"
    torch.testing.assert_close(actual[~finite], expected[~finite], rtol=0, atol=0, equal_nan=True, msg=what)
    if finite.any():
        atol = atol_rel * max(1.0, expected[finite].abs().max().item())
        torch.testing.assert_close(actual[finite], expected[finite], rtol=rtol, atol=atol, msg=what)


def _check_reduce(backend, case):
    leaf, view, dim = _leaf_and_view(case)
    reduction, dtype = case["reduction"], case["dtype"]
    x64 = view(leaf.double())  # the reference sees exactly the (rounded) values the backend sees
    expected = reduce_reference(x64, reduction, dim)
    finite_input = bool(torch.isfinite(leaf).all())
    differentiable = finite_input and reduction != "vote"
    leaf.requires_grad_(differentiable)
    out = ensemble_reduce(view(leaf), reduction, dim=dim, backend=backend)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # float32 accumulation; the member mean (mean, softmax_of_mean) and log_mean_probs' logs are rounded to the
    # logits' magnitude, which softmax_of_mean exponentiates into a relative error.
    rtol = 1e-10 if dtype == torch.float64 else 2e-5 + 8 * EPS32 * _tolerance_scale(x64)
    atol_rel = 1e-11 if dtype == torch.float64 else 2e-6
    if reduction == "vote":
        rtol = atol_rel = 0.0
        if dtype != torch.float64 and not case["scale"] >= 1.0:
            return  # logits 1e-3 apart: float32 and float64 argmaxes may tie differently
    _assert_close(out, expected, rtol, atol_rel, f"{backend} {reduction}")
    if not differentiable or out.numel() == 0:
        return
    generator = torch.Generator().manual_seed(case["seed"] + 1)
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    (grad,) = torch.autograd.grad(out, leaf, grad_out.to(out.dtype))
    assert grad.dtype == leaf.dtype and grad.shape == leaf.shape
    leaf64 = leaf.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(reduce_reference(view(leaf64), reduction, dim), leaf64, grad_out)
    tol = GRAD_TOL[dtype]
    if dtype != torch.float64 and reduction in ("softmax_of_mean", "log_mean_probs"):
        # Their backward takes the float32 output, rounded to the logits' magnitude (see the forward's rtol).
        tol += 16 * EPS32 * _tolerance_scale(x64)
    _assert_close(grad, want, tol, tol / 10 if dtype in (torch.float32, torch.float64) else tol,
                  f"{backend} {reduction} gradient")


def _check_stats(backend, case):
    leaf, view, dim = _leaf_and_view(case)
    dtype = case["dtype"]
    x = view(leaf)
    x64 = view(leaf.double())
    got = ensemble_stats(x, dim=dim, backend=backend)
    want = stats_reference(x64, dim)
    assert got.probs.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    rtol, atol_rel = (1e-10, 1e-11) if dtype == torch.float64 else (2e-5, 2e-6)
    for field in ("probs", "entropy", "expected_entropy", "confidence"):
        _assert_close(getattr(got, field), getattr(want, field), rtol, atol_rel, f"{backend} stats {field}")
    # A difference of two entropies: its error scales with the entropies, not with itself.
    entropy_scale = _tolerance_scale(want.entropy)
    _assert_close(got.mutual_info, want.mutual_info, rtol, max(atol_rel, 10 * rtol * entropy_scale),
                  f"{backend} stats mutual_info")
    assert bool(((got.mutual_info >= 0) | got.mutual_info.isnan()).all()), "negative mutual information"
    # The prediction may differ from float64's only between probabilities equal to rounding; the disagreement is
    # then the kernel's own prediction's (the member argmaxes are exact: the same logits, the same tie rule).
    picked = want.probs.double().gather(-1, got.prediction.unsqueeze(-1)).squeeze(-1)
    undefined = want.confidence.isnan()
    near_tie = (picked - want.confidence).abs() <= 4 * rtol * want.confidence.abs()
    assert bool(((got.prediction == want.prediction) | near_tie).all()), f"{backend} stats prediction"
    assert bool((got.prediction[undefined] == 0).all())
    member_prediction = x64.argmax(-1)
    own = (member_prediction != got.prediction.unsqueeze(dim)).double().mean(dim)
    own[undefined] = math.nan
    _assert_close(got.disagreement, own, 0, 1e-6, f"{backend} stats disagreement")


FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("backend", [
    "torch",
    pytest.param("cpp", marks=pytest.mark.skipif(_unavailable("cpp") is not None, reason=str(_unavailable("cpp")))),
])
@settings(FUZZ, max_examples=300)
@given(case=cases(small=False, dtypes=(torch.float32, torch.float64, torch.float16, torch.bfloat16),
                  reductions=REDUCTIONS + ("stats",)))
def test_fuzz_torch_and_cpp_against_float64(backend, case):
    if case["reduction"] == "stats":
        _check_stats(backend, case)
    elif backend == "torch" or case["reduction"] in KERNEL_REDUCTIONS:
        _check_reduce(backend, case)


@pytest.mark.skipif(_unavailable("triton") is not None, reason=str(_unavailable("triton")))
@settings(FUZZ, max_examples=150)
@given(case=cases(small=True, dtypes=(torch.float32,), reductions=KERNEL_REDUCTIONS + ("stats",)))
def test_fuzz_triton_interpreted_against_float64(case):
    if case["reduction"] == "stats":
        _check_stats("triton", case)
    else:
        _check_reduce("triton", case)
