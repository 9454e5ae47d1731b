"""ensemble_reduce / ensemble_stats on every backend that runs here, against the float64 reference.

The reductions that the kernels implement (``KERNEL_REDUCTIONS``) run on every backend; ``"vote"`` runs on the
torch backend only and has its own tests (test_vote.py).

Backends are parametrized as (backend, device) cases: torch, cpp (when the extension is built) and triton (under
TRITON_INTERPRET=1 on CPU: float32 and small shapes only) on CPU; the same three on CUDA, marked ``gpu``.
Inputs are made on the CPU from the seeded generator and moved to the case's device, so every backend sees the
same numbers; the reference runs on the CPU in float64 on those exact (possibly low-precision) values. Outputs
accumulate in float32 whatever the input dtype, so forward tolerances are float32 ones for every input dtype.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch._inductor.utils import fresh_inductor_cache

from fused_ensemble import REDUCTIONS, EnsembleStats, ensemble_reduce, ensemble_stats
from fused_ensemble.ops import dispatch
from fused_ensemble.ops.ensemble_reduce import members_rows_classes
from fused_ensemble.ops.reductions import KERNEL_REDUCTIONS
from fused_ensemble.ops.reference import reduce_reference, stats_reference

# The Triton interpreter evaluates masked-off lanes too (numpy warns about exp(-inf - -inf) there).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

LOW_PRECISION = (torch.float16, torch.bfloat16)


def _case(backend: str, device: str):
    marks = []
    if device == "cuda":
        marks.append(pytest.mark.gpu)
    if device == "cpu" or torch.cuda.is_available():
        reason = dispatch.unavailable_reason(backend, device, torch.float32)
        if reason is not None:
            marks.append(pytest.mark.skip(reason=reason))
    return pytest.param((backend, device), id=f"{backend}-{device}", marks=marks)


ALL_CASES = [_case(b, d) for d in ("cpu", "cuda") for b in ("torch", "cpp", "triton")]
KERNEL_CASES = [_case(b, d) for d in ("cpu", "cuda") for b in ("cpp", "triton")]
FLOAT64_CASES = [_case(b, d) for d in ("cpu", "cuda") for b in ("torch", "cpp")]


def _interpreted(case) -> bool:
    return case == ("triton", "cpu")


def _skip_if_interpreted(case, why="the Triton interpreter has no bfloat16 and is too slow for this"):
    if _interpreted(case):
        pytest.skip(why)


def make_logits(shape, case, dtype=torch.float32, scale=1.0, offset=0.0):
    """Fresh random logits, made on the CPU (same numbers for every device) and moved to the case's device."""
    x = torch.randn(shape, dtype=torch.float64) * scale + offset
    return x.to(dtype).to(case[1])


def _atol(expected: torch.Tensor, relative: float) -> float:
    finite = expected[torch.isfinite(expected)]
    return relative * max(1.0, finite.abs().max().item()) if finite.numel() else relative


def assert_matches(actual, expected, rtol=2e-5, atol_rel=2e-6, atol=None):
    """Finiteness equal to the reference's (inf and NaN included), finite values within tolerance."""
    actual = actual.detach().cpu().double()
    expected = expected.detach().cpu().double()
    assert actual.shape == expected.shape
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite), "finiteness differs from the reference"
    torch.testing.assert_close(actual[~finite], expected[~finite], equal_nan=True, rtol=0, atol=0)
    atol = _atol(expected, atol_rel) if atol is None else atol
    torch.testing.assert_close(actual[finite], expected[finite], rtol=rtol, atol=atol)


def assert_stats_match(actual: EnsembleStats, expected: EnsembleStats, rtol=2e-5):
    assert isinstance(actual, EnsembleStats)
    for field in ("probs", "entropy", "expected_entropy", "confidence", "disagreement"):
        assert_matches(getattr(actual, field), getattr(expected, field), rtol=rtol)
    # mutual_info is a difference of two entropies: its error scales with the entropies, not with itself.
    assert_matches(actual.mutual_info, expected.mutual_info, rtol=rtol,
                   atol=_atol(expected.entropy, 10 * rtol))
    assert actual.prediction.dtype == torch.int64
    torch.testing.assert_close(actual.prediction.cpu(), expected.prediction)


def reference(x, reduction, dim=0):
    return reduce_reference(x.detach().cpu().double(), reduction, dim)


def expected_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# (N, R, K): size 1 everywhere, non-powers of two, K from 1 to 131072.
SHAPES = [(1, 1, 1), (1, 3, 5), (4, 1, 1), (3, 7, 33), (5, 4, 1000), (2, 3, 4099), (3, 2, 32000), (2, 2, 131072)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("reduction", KERNEL_REDUCTIONS)
@pytest.mark.parametrize("case", ALL_CASES)
def test_reduce_matches_reference(case, reduction, shape):
    x = make_logits(shape, case)
    out = ensemble_reduce(x, reduction, backend=case[0])
    assert out.dtype == torch.float32 and out.device == x.device
    assert_matches(out, reference(x, reduction))


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("reduction", KERNEL_REDUCTIONS)
@pytest.mark.parametrize("case", ALL_CASES)
def test_reduce_low_precision_inputs_accumulate_in_float32(case, reduction, dtype):
    _skip_if_interpreted(case)
    for shape in [(3, 5, 1000), (4, 3, 33)]:
        x = make_logits(shape, case, dtype)
        out = ensemble_reduce(x, reduction, backend=case[0])
        assert out.dtype == torch.float32
        assert_matches(out, reference(x, reduction))


@pytest.mark.parametrize("reduction", KERNEL_REDUCTIONS)
@pytest.mark.parametrize("case", FLOAT64_CASES)
def test_reduce_float64(case, reduction):
    x = make_logits((3, 5, 77), case, torch.float64)
    out = ensemble_reduce(x, reduction, backend=case[0])
    assert out.dtype == torch.float64
    assert_matches(out, reference(x, reduction), rtol=1e-12, atol_rel=1e-13)


# (shape, member dim): member dim first, in the middle, negative; several batch dims.
LAYOUTS = {
    "first-2d": ((4, 17), 0),
    "first-multibatch": ((3, 2, 5, 19), 0),
    "middle": ((6, 3, 23), 1),
    "negative": ((2, 3, 4, 11), -3),
    "negative-last-batch": ((5, 3, 7), -2),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("reduction", KERNEL_REDUCTIONS)
@pytest.mark.parametrize("case", ALL_CASES)
def test_member_dim_anywhere_but_last(case, reduction, layout):
    shape, dim = LAYOUTS[layout]
    x = make_logits(shape, case)
    out = ensemble_reduce(x, reduction, dim=dim, backend=case[0])
    expected = reference(x, reduction, dim)
    assert out.shape == expected.shape
    assert_matches(out, expected)


def _strided(kind, case):
    """[N, R, K] = [4, 6, 45] logits with unusual strides."""
    if kind == "transposed":
        return make_logits((6, 4, 45), case).transpose(0, 1)
    if kind == "class-stride-2":
        return make_logits((4, 6, 90), case)[..., ::2]
    if kind == "classes-not-innermost":
        return make_logits((4, 45, 6), case).transpose(1, 2)
    if kind == "expanded-members":
        return make_logits((1, 6, 45), case).expand(4, 6, 45)
    if kind == "expanded-rows":
        return make_logits((4, 1, 45), case).expand(4, 6, 45)
    if kind == "expanded-classes":
        return make_logits((4, 6, 1), case).expand(4, 6, 45)
    raise AssertionError(kind)


STRIDED = ["transposed", "class-stride-2", "classes-not-innermost", "expanded-members", "expanded-rows",
           "expanded-classes"]


@pytest.mark.parametrize("kind", STRIDED)
@pytest.mark.parametrize("reduction", KERNEL_REDUCTIONS)
@pytest.mark.parametrize("case", ALL_CASES)
def test_strided_and_expanded_inputs(case, reduction, kind):
    x = _strided(kind, case)
    assert_matches(ensemble_reduce(x, reduction, backend=case[0]), reference(x, reduction))


def test_member_rows_classes_is_a_view_whenever_strides_allow():
    x = torch.randn(3, 5, 4, 7)
    for logits, dim in [(x, 0), (x.transpose(0, 1), 1), (x[:1].expand(6, 5, 4, 7), 0), (x[..., ::2], 0)]:
        view = members_rows_classes(logits, dim)
        members, classes = logits.shape[dim], logits.shape[-1]
        assert view.shape == (members, logits.numel() // (members * classes), classes)
        assert view.data_ptr() == logits.data_ptr() and view._base is not None
    assert members_rows_classes(x[:1].expand(6, 5, 4, 7), 0).stride(0) == 0


def _with_neg_inf(case, dtype=torch.float32):
    x = make_logits((4, 6, 37), case, torch.float64).cpu()
    x[torch.rand(x.shape) < 0.3] = -math.inf
    x[:, 0, 5] = -math.inf           # a class that no member can predict
    x[:, 1, :36] = -math.inf         # rows where only the last class is possible
    x[1, 2, :] = -math.inf           # one member row entirely -inf: NaN wherever the reference has NaN
    return x.to(dtype).to(case[1])


@pytest.mark.parametrize("reduction", KERNEL_REDUCTIONS)
@pytest.mark.parametrize("case", ALL_CASES)
def test_neg_inf_logits(case, reduction):
    x = _with_neg_inf(case)
    assert_matches(ensemble_reduce(x, reduction, backend=case[0]), reference(x, reduction))


@pytest.mark.parametrize("scale, offset", [(1.0, 1e4), (1e4, 0.0), (3.0, -1e4)], ids=["1e4+", "1e4*", "-1e4+"])
@pytest.mark.parametrize("reduction", KERNEL_REDUCTIONS)
@pytest.mark.parametrize("case", ALL_CASES)
def test_large_magnitude_logits_are_exact_to_float32_rounding(case, reduction, scale, offset):
    x = make_logits((3, 5, 301), case, scale=scale, offset=offset)
    rtol = 2e-5
    if reduction == "softmax_of_mean":
        # The averaged logits are rounded to float32 before the softmax: an absolute error of a few ulps of
        # |x| ~ 1e4 in the logit domain is a relative error of the same size in every probability.
        rtol += 4 * torch.finfo(torch.float32).eps * x.abs().max().item()
    assert_matches(ensemble_reduce(x, reduction, backend=case[0]), reference(x, reduction), rtol=rtol)


@pytest.mark.parametrize("shape", [(3, 0, 10), (2, 4, 0, 7)], ids=["N-0-K", "N-B-0-K"])
@pytest.mark.parametrize("reduction", KERNEL_REDUCTIONS)
@pytest.mark.parametrize("case", ALL_CASES)
def test_empty_batch(case, reduction, shape):
    x = make_logits(shape, case).requires_grad_()
    out = ensemble_reduce(x, reduction, backend=case[0])
    assert out.shape == shape[1:]
    out.sum().backward()
    assert x.grad.shape == x.shape
    s = ensemble_stats(x.detach(), backend=case[0])
    assert s.probs.shape == shape[1:] and s.entropy.shape == shape[1:-1]


def _grad_tolerance(dtype):
    # The gradient of mean_probs / log_mean_probs comes back in the logits' dtype.
    return {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(dtype, 2e-5)


def check_gradient(case, reduction, x, dim=0):
    """Gradient of <ensemble_reduce(x), g> w.r.t. x (a leaf, or a view of one) vs autograd of the fp64 reference."""
    leaf = x if x.is_leaf else x._base
    out = ensemble_reduce(x, reduction, dim=dim, backend=case[0])
    g = torch.randn(out.shape, dtype=torch.float64)
    (grad,) = torch.autograd.grad(out, leaf, g.to(out.dtype).to(out.device))
    assert grad.dtype == leaf.dtype and grad.shape == leaf.shape
    leaf64 = leaf.detach().cpu().double().requires_grad_()
    x64 = leaf64 if x.is_leaf else leaf64.as_strided(x.shape, x.stride(), x.storage_offset())
    (expected,) = torch.autograd.grad(reduce_reference(x64, reduction, dim), leaf64, g)
    tol = _grad_tolerance(leaf.dtype)
    assert_matches(grad, expected, rtol=tol, atol_rel=tol / 10)


@pytest.mark.parametrize("reduction", KERNEL_REDUCTIONS)
@pytest.mark.parametrize("case", ALL_CASES)
def test_gradients_match_float64_autograd(case, reduction):
    for shape in [(1, 1, 1), (3, 4, 33), (5, 2, 1000)]:
        check_gradient(case, reduction, make_logits(shape, case).requires_grad_())
    check_gradient(case, reduction, make_logits((4, 3, 21), case).requires_grad_(), dim=1)
    # Zero strides: the gradient of an expanded leaf sums over the expanded dims.
    check_gradient(case, reduction, make_logits((1, 3, 21), case).requires_grad_().expand(4, 3, 21))
    check_gradient(case, reduction, make_logits((5, 3, 12), case).requires_grad_().transpose(0, 1), dim=1)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("reduction", KERNEL_REDUCTIONS)
@pytest.mark.parametrize("case", ALL_CASES)
def test_gradients_low_precision(case, reduction, dtype):
    _skip_if_interpreted(case)
    check_gradient(case, reduction, make_logits((4, 3, 257), case, dtype).requires_grad_())


@pytest.mark.parametrize("classes", [10, 37])
@pytest.mark.parametrize("scale, offset", [(1.0, 1e4), (30.0, 1e3), (1.0, -1e4)], ids=["1e4+", "30*1e3+", "-1e4+"])
@pytest.mark.parametrize("reduction", ["mean_probs", "log_mean_probs"])
@pytest.mark.parametrize("case", ALL_CASES)
def test_gradients_at_large_logit_offsets_are_exact(case, reduction, scale, offset, classes):
    # Every backend's gradient is exact to float32 rounding at any offset, against float64 autograd of the same
    # (float32) logits: the kernels rebuild each member softmax from the saved row max and sum of exp(x - max).
    check_gradient(case, reduction, make_logits((3, 4, classes), case, scale=scale, offset=offset).requires_grad_())


@pytest.mark.parametrize("case", ALL_CASES)
def test_log_mean_probs_gradient_where_member_probabilities_underflow(case):
    # exp(-110) underflows float32: the gradient's ratio s / p must be taken in log space, not guarded to 0.
    grad_out = torch.tensor([[0.0, 0.0, 1.0]], device=case[1])
    for logits, expected in [([[[0.0, 0.0, -110.0]]], [[[-0.5, -0.5, 1.0]]]),   # d log p_2 / dx = e_2 - p
                             ([[[0.0, 0.0, -110.0]], [[0.0, -110.0, 0.0]]], [[[0.0, 0.0, 0.0]], [[-0.5, 0.0, 0.5]]])]:
        x = torch.tensor(logits, device=case[1], requires_grad=True)
        (grad,) = torch.autograd.grad(ensemble_reduce(x, "log_mean_probs", backend=case[0]), x, grad_out)
        torch.testing.assert_close(grad.cpu(), torch.tensor(expected), rtol=0, atol=1e-7)
    check_gradient(case, "log_mean_probs", make_logits((4, 6, 41), case, scale=30.0).requires_grad_())


@pytest.mark.parametrize("reduction", KERNEL_REDUCTIONS)
@pytest.mark.parametrize("case", FLOAT64_CASES)
def test_gradcheck_float64(case, reduction):
    x = make_logits((3, 2, 5), case, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ensemble_reduce(t, reduction, backend=case[0]), (x,))
    y = make_logits((2, 3, 4), case, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ensemble_reduce(t, reduction, dim=1, backend=case[0]), (y,))


def _opcheck_samples(case):
    yield make_logits((3, 4, 10), case)
    yield make_logits((4, 3, 10), case).transpose(0, 1)
    yield make_logits((1, 4, 10), case).expand(3, 4, 10)
    yield make_logits((2, 0, 7), case)


@pytest.mark.parametrize("reduction", KERNEL_REDUCTIONS)
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_opcheck_reduce_and_backward(case, reduction):
    for x in _opcheck_samples(case):
        for requires_grad in (False, True):
            torch.library.opcheck(torch.ops.fused_ensemble.reduce.default,
                                  (x.detach().requires_grad_(requires_grad), reduction, case[0]))
        out, aux = torch.ops.fused_ensemble.reduce(x, reduction, case[0])
        grad_out = torch.randn_like(out)
        torch.library.opcheck(torch.ops.fused_ensemble.reduce_backward.default,
                              (grad_out, x, out, aux, reduction, case[0]))


@pytest.mark.parametrize("case", KERNEL_CASES)
def test_opcheck_stats(case):
    for x in _opcheck_samples(case):
        torch.library.opcheck(torch.ops.fused_ensemble.stats.default, (x, case[0]))


@pytest.mark.parametrize("case", KERNEL_CASES)
def test_torch_compile_fullgraph_matches_eager(case):
    """One compiled graph with reduce (forward + fused backward) and stats: no graph break, same numbers."""
    backend = case[0]

    def loss_and_stats(logits):
        probs = ensemble_reduce(logits, "log_mean_probs", dim=1, backend=backend)
        mean = ensemble_reduce(logits, "softmax_of_mean", dim=1, backend=backend)
        s = ensemble_stats(logits.detach(), dim=1, backend=backend)
        return (probs * mean).sum() + s.mutual_info.sum(), s

    compiled = torch.compile(loss_and_stats, fullgraph=True)
    x = make_logits((5, 4, 37), case).requires_grad_()
    # A fresh cache: TorchInductor's graph cache keys do not cover a custom op's fake implementation, so a graph
    # compiled against an older contract of these ops (another checkout's, say) would be reused.
    with fresh_inductor_cache():
        loss, s = compiled(x)
        loss.backward()
    compiled_grad, x.grad = x.grad, None
    eager_loss, eager_s = loss_and_stats(x)
    eager_loss.backward()
    assert_matches(loss, eager_loss.detach(), rtol=1e-6)
    assert_matches(compiled_grad, x.grad, rtol=1e-6, atol_rel=1e-7)
    assert_stats_match(s, EnsembleStats(*(t.cpu() for t in eager_s)), rtol=1e-6)


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 7, 33), (5, 4, 1000), (2, 2, 131072)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("case", ALL_CASES)
def test_stats_match_reference(case, shape):
    x = make_logits(shape, case)
    s = ensemble_stats(x, backend=case[0])
    assert s.probs.dtype == torch.float32 and s.prediction.device == x.device
    assert_stats_match(s, stats_reference(x.cpu().double()))


@pytest.mark.parametrize("case", ALL_CASES)
def test_stats_on_awkward_inputs(case):
    for x, dim in [(make_logits((6, 5, 2, 23), case).transpose(0, 1), 1),   # member dim in the middle, strided
                   (make_logits((1, 6, 45), case).expand(4, 6, 45), -3),     # every member agrees
                   (_strided("class-stride-2", case), 0),
                   (make_logits((3, 5, 301), case, offset=1e4), 0),          # large magnitude
                   (_with_neg_inf(case), 0)]:
        assert_stats_match(ensemble_stats(x, dim=dim, backend=case[0]), stats_reference(x.cpu().double(), dim))


def _non_finite_rows(classes, case, dtype=torch.float32):
    """[3, 9, classes] logits; rows 1, 2, 4, 5, 6 and 7 have a member without a softmax, rows 0, 3 and 8 do not."""
    x = make_logits((3, 9, classes), case, torch.float64).cpu()
    x[1, 1, classes // 2] = math.nan                               # a NaN in one member
    x[0, 2, 1 % classes] = math.inf                                # a +inf in one member
    x[2, 3][torch.rand(classes) < 0.5] = -math.inf                 # -inf entries: probabilities of 0
    x[2, 3, 0] = 1.0
    x[1, 4, :] = -math.inf                                         # a member row of -inf
    x[:, 5, :] = -math.inf                                         # a row of -inf in every member
    x[0, 6, 0], x[2, 6, classes - 1] = math.nan, math.inf          # mixed: NaN and +inf in two members
    x[0, 7, 0], x[1, 7, 0] = math.inf, -math.inf                   # +inf and -inf in one class
    return x.to(dtype).to(case[1])


UNDEFINED_ROWS = torch.tensor([False, True, True, False, True, True, True, True, False])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("classes", [1, 5, 37])
@pytest.mark.parametrize("case", ALL_CASES)
def test_non_finite_logits_give_the_same_answer_on_every_backend(case, classes, dtype):
    """The rule of the reductions' contract: a row in which some member's logits hold a NaN or +inf (or are all
    -inf) is NaN in every class of every reduction but "mean" (element by element), and NaN in every float field
    of ensemble_stats with prediction 0; -inf entries alone are probabilities of 0."""
    if dtype == torch.float64 and case[0] == "triton":
        pytest.skip("the Triton kernels take float16/bfloat16/float32")
    x = _non_finite_rows(classes, case, dtype)
    for reduction in KERNEL_REDUCTIONS:
        out = ensemble_reduce(x, reduction, backend=case[0])
        expected = reference(x, reduction)
        assert_matches(out, expected)
        if reduction != "mean":
            assert torch.equal(out.isnan().all(-1).cpu(), UNDEFINED_ROWS), reduction
            assert not out[~UNDEFINED_ROWS.to(out.device)].isnan().any(), reduction
    s = ensemble_stats(x, backend=case[0])
    assert_stats_match(s, stats_reference(x.cpu().double()))
    assert torch.equal(s.probs.isnan().all(-1).cpu(), UNDEFINED_ROWS)
    for field in ("entropy", "expected_entropy", "mutual_info", "confidence", "disagreement"):
        assert torch.equal(getattr(s, field).isnan().cpu(), UNDEFINED_ROWS), field
    assert (s.prediction.cpu()[UNDEFINED_ROWS] == 0).all()


@pytest.mark.parametrize("case", ALL_CASES)
def test_mutual_information_is_never_negative(case):
    # Identical members: the mutual information is 0, which entropy - expected_entropy misses by rounding either way.
    for classes in (5, 37):
        x = make_logits((1, 300, classes), case, scale=5.0).expand(6, 300, classes)
        mutual_info = ensemble_stats(x, backend=case[0]).mutual_info
        assert (mutual_info >= 0).all() and mutual_info.max() < 1e-5
    assert (stats_reference(torch.randn(1, 300, 7, dtype=torch.float64).expand(4, 300, 7)).mutual_info >= 0).all()


@pytest.mark.parametrize("dtype", LOW_PRECISION + (torch.float64,), ids=str)
@pytest.mark.parametrize("case", ALL_CASES)
def test_stats_other_dtypes(case, dtype):
    _skip_if_interpreted(case)
    if dtype == torch.float64 and case[0] == "triton":
        pytest.skip("the Triton kernels take float16/bfloat16/float32")
    x = make_logits((4, 9, 129), case, dtype)
    s = ensemble_stats(x, backend=case[0])
    assert s.entropy.dtype == expected_dtype(x)
    assert_stats_match(s, stats_reference(x.cpu().double()), rtol=1e-12 if dtype == torch.float64 else 2e-5)


@pytest.mark.parametrize("case", ALL_CASES)
def test_out_dtype(case):
    x = make_logits((3, 4, 10), case)
    out = ensemble_reduce(x, "mean_probs", backend=case[0], out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert_matches(out, reference(x, "mean_probs"), rtol=1.6e-2, atol_rel=1e-3)
    with pytest.raises(TypeError, match="out_dtype must be a floating-point dtype"):
        ensemble_reduce(x, "mean", backend=case[0], out_dtype=torch.int64)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")
def test_bad_inputs_give_clear_errors():
    x = torch.randn(3, 4, 5)
    with pytest.raises(TypeError, match="floating-point"):
        ensemble_reduce(torch.ones(3, 4, 5, dtype=torch.int64))
    with pytest.raises(TypeError, match="floating-point"):
        ensemble_stats(torch.ones(3, 4, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match="unknown reduction 'median'") as error:
        ensemble_reduce(x, "median")
    assert all(repr(name) in str(error.value) for name in REDUCTIONS)  # every valid name, "vote" included
    for sparse in (x.to_sparse(), x[0].to_sparse_csr()):
        with pytest.raises(TypeError, match=r"logits must be a dense \(strided\) tensor, got layout torch.sparse"):
            ensemble_reduce(sparse)
        with pytest.raises(TypeError, match=r"logits must be a dense \(strided\) tensor"):
            ensemble_stats(sparse)
    for dim in (2, -1):
        with pytest.raises(ValueError, match="class dim"):
            ensemble_reduce(x, dim=dim)
        with pytest.raises(ValueError, match="class dim"):
            ensemble_stats(x, dim=dim)
    with pytest.raises(ValueError, match="out of range"):
        ensemble_reduce(x, dim=3)
    with pytest.raises(ValueError, match="at least 2 dims"):
        ensemble_reduce(torch.randn(5))
    with pytest.raises(ValueError, match="no members"):
        ensemble_reduce(torch.randn(0, 4, 5))
    with pytest.raises(ValueError, match="no classes"):
        ensemble_reduce(torch.randn(3, 4, 0))
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        ensemble_reduce(x, backend="cuda")


def test_stats_kernels_refuse_inputs_that_need_grad():
    x = torch.randn(3, 4, 5, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        ensemble_stats(x, backend="cpp")
    s = ensemble_stats(x)  # auto: the differentiable reference
    s.entropy.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.skipif(dispatch.unavailable_reason("cpp", "cpu", torch.float32) is not None,
                    reason="needs the C++ extension")
def test_plain_eager_calls_skip_the_custom_op_and_everything_else_goes_through_it(monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode

    from fused_ensemble.ops import library

    x = torch.randn(3, 5, 7)
    expected = ensemble_reduce(x, "mean_probs", backend="cpp")
    expected_stats = ensemble_stats(x, backend="cpp")

    class SeenOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    with SeenOps() as seen:  # a dispatch mode must see the op, not the kernels inside it
        torch.testing.assert_close(ensemble_reduce(x, "mean_probs", backend="cpp"), expected)
        ensemble_stats(x, backend="cpp")
    assert any(name.startswith("fused_ensemble.reduce") for name in seen.names), seen.names
    assert any(name.startswith("fused_ensemble.stats") for name in seen.names), seen.names

    def no_custom_op(*args):
        raise AssertionError("the custom op ran")
    monkeypatch.setattr(library, "reduce_op", no_custom_op)
    monkeypatch.setattr(library, "stats_op", no_custom_op)
    torch.testing.assert_close(ensemble_reduce(x, "mean_probs", backend="cpp"), expected)
    for got, want in zip(ensemble_stats(x, backend="cpp"), expected_stats):
        torch.testing.assert_close(got, want)
    leaf = x.clone().requires_grad_()
    with pytest.raises(AssertionError, match="the custom op ran"):  # autograd needs the op's backward
        ensemble_reduce(leaf, "mean_probs", backend="cpp")
