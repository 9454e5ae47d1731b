"""Triton ensemble-reduction kernels against the float64 reference.

Runs under TRITON_INTERPRET=1 on CPU tensors (fp32 only; conftest.py sets the interpreter when there is no GPU)
and on CUDA, where the tests marked ``gpu`` add float16/bfloat16 inputs and real sizes.
"""

import pytest
import torch

from fused_ensemble.ops.reductions import KERNEL_REDUCTIONS, SAVES_MEMBER_SOFTMAX
from fused_ensemble.ops.reference import reduce_reference, stats_reference

from interpreter_warnings import IGNORE_INTERPRETER_WARNINGS

triton = pytest.importorskip("triton")
from fused_ensemble.kernels import ensemble_reduce as er  # noqa: E402

pytestmark = IGNORE_INTERPRETER_WARNINGS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = dict(rtol=1e-5, atol=2e-6)

SHAPES = [(3, 7, 41), (1, 5, 10), (4, 3, 1), (2, 1, 17)]
# Tile choices: the launcher's heuristic (one tile per row), the long-row kernels forced on small K (one
# program per row block), and the split-K long-row kernels (programs per row block and column split).
PATHS = {
    "short": {},
    "long": {"block_k": 16, "splits": 1},
    "long_multirow": {"block_k": 16, "block_r": 4, "splits": 1},
    "split": {"block_k": 16, "splits": 2},
    "split_multirow": {"block_k": 16, "block_r": 2, "splits": 3},
}


def _backward_tiles(path):
    """The tile overrides of ``path`` that reduce_backward takes (it has no split-K)."""
    return {key: value for key, value in PATHS[path].items() if key != "splits"}


def _assert_matches(actual, expected, rtol, atol):
    """Values within tolerance and the same NaN/inf pattern as the reference."""
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol,
                               equal_nan=True)


def _logits(shape, layout="contiguous", scale=3.0):
    """Random [N, R, K] logits in the given memory layout (the kernels take any strides)."""
    n, r, k = shape
    if layout == "contiguous":
        x = torch.randn(n, r, k)
    elif layout == "member_middle":  # the member dim moved to the front from the middle: stride_n < stride_r
        x = torch.randn(r, n, k).permute(1, 0, 2)
    elif layout == "class_strided":  # the class dim is not the innermost one
        x = torch.randn(n, k, r).transpose(1, 2)
    elif layout == "sliced":
        x = torch.randn(n + 1, 2 * r, 2 * k)[1:, ::2, 1::2]
    elif layout == "expanded_members":  # every member the same tensor: stride_n == 0
        x = torch.randn(1, r, k).expand(n, r, k)
    elif layout == "expanded_rows":  # stride_r == 0
        x = torch.randn(n, 1, k).expand(n, r, k)
    else:
        raise AssertionError(layout)
    assert x.shape == (n, r, k)
    return (x * scale).to(DEVICE)


def _assert_saved_softmax(aux, x):
    """aux is [2, N, R]: each member row's max (exactly) and its sum of exp(x - max), against float64."""
    n, r, _ = x.shape
    assert aux.shape == (2, n, r) and aux.dtype == torch.float32 and aux.is_contiguous()
    x64 = x.double().cpu()
    row_max = x64.amax(-1)
    torch.testing.assert_close(aux[0].double().cpu(), row_max, rtol=0, atol=0)
    _assert_matches(aux[1], (x64 - row_max.unsqueeze(-1)).exp().sum(-1), **FP32_TOL)


def _reference_grad(x, grad_out, reduction):
    x64 = x.detach().double().cpu().requires_grad_(True)
    reduce_reference(x64, reduction).backward(grad_out.double().cpu())
    return x64.grad


# ---------------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", KERNEL_REDUCTIONS)
def test_reduce_forward_matches_reference(reduction, shape, path):
    x = _logits(shape)
    out, aux = er.reduce_forward(x, reduction, **PATHS[path])
    assert out.shape == shape[1:] and out.dtype == torch.float32 and out.is_contiguous()
    _assert_matches(out, reduce_reference(x.double(), reduction), **FP32_TOL)
    if reduction in SAVES_MEMBER_SOFTMAX:
        _assert_saved_softmax(aux, x)
    else:
        assert aux.shape == (0,) and aux.dtype == torch.float32


@pytest.mark.parametrize("path", ["short", "long", "split"])
@pytest.mark.parametrize("layout", ["member_middle", "class_strided", "sliced", "expanded_members",
                                    "expanded_rows"])
@pytest.mark.parametrize("reduction", KERNEL_REDUCTIONS)
def test_reduce_forward_any_strides(reduction, layout, path):
    x = _logits((3, 6, 23), layout)
    out, _ = er.reduce_forward(x, reduction, **PATHS[path])
    _assert_matches(out, reduce_reference(x.double(), reduction), **FP32_TOL)


def _logits_with_neg_inf(shape=(3, 7, 41)):
    """Scattered -inf entries, a leading -inf chunk, a class that is -inf in every member, a member row that is
    -inf everywhere and a row that is -inf in every member."""
    x = _logits(shape)
    x[torch.rand(shape, device=DEVICE) < 0.2] = float("-inf")
    x[:, 3, :16] = float("-inf")  # the first long-row chunk holds nothing finite
    x[:, 4, 5] = float("-inf")
    x[1, 2, :] = float("-inf")
    x[:, 6, :] = float("-inf")
    return x


@pytest.mark.parametrize("path", ["short", "long", "split"])
@pytest.mark.parametrize("reduction", KERNEL_REDUCTIONS)
def test_reduce_forward_neg_inf(reduction, path):
    x = _logits_with_neg_inf()
    out, _ = er.reduce_forward(x, reduction, **PATHS[path])
    expected = reduce_reference(x.double(), reduction)
    assert not torch.isfinite(expected).all(), "the test must exercise non-finite outputs"
    _assert_matches(out, expected, **FP32_TOL)


def _logits_non_finite(shape=(3, 8, 41)):
    """Rows with a NaN, a +inf, both in different members, -inf scattered in one member, a member row of -inf, and
    finite rows around them (rows 0 and 7)."""
    x = _logits(shape)
    x[1, 1, 30] = float("nan")
    x[0, 2, 3] = float("inf")
    x[2, 3, 20] = float("nan")
    x[0, 3, 7] = float("inf")
    x[1, 4][torch.rand(shape[2], device=DEVICE) < 0.5] = float("-inf")  # still finite: -inf is probability 0
    x[2, 5, :] = float("-inf")
    x[0, 6, 9] = float("inf")
    x[1, 6, 9] = float("-inf")
    return x


@pytest.mark.parametrize("path", ["short", "long", "split"])
@pytest.mark.parametrize("reduction", KERNEL_REDUCTIONS)
def test_reduce_forward_non_finite_rows(reduction, path):
    # A NaN or +inf in one member (or a member row of -inf) makes the row NaN in every class, as the reference
    # says; "mean" averages element by element.
    x = _logits_non_finite()
    out, _ = er.reduce_forward(x, reduction, **PATHS[path])
    expected = reduce_reference(x.double(), reduction)
    if reduction != "mean":
        assert expected[1:4].isnan().all() and expected[5:7].isnan().all() and expected[[0, 4, 7]].isfinite().any()
    _assert_matches(out, expected, **FP32_TOL)


@pytest.mark.parametrize("path", ["short", "long", "split"])
def test_stats_non_finite_rows(path):
    x = _logits_non_finite()
    stats = er.stats_forward(x, **PATHS[path])
    _assert_stats_match(stats, x, **FP32_TOL)
    undefined = torch.tensor([False, True, True, True, False, True, True, False])
    for name, field in zip(("entropy", "expected_entropy", "mutual_info", "confidence", "disagreement"),
                           (stats[1], stats[2], stats[3], stats[4], stats[6])):
        assert torch.equal(field.isnan().cpu(), undefined), name
    assert (stats[5].cpu()[undefined] == 0).all()


@pytest.mark.parametrize("path", ["short", "long", "split"])
@pytest.mark.parametrize("reduction", KERNEL_REDUCTIONS)
def test_reduce_forward_large_logits(reduction, path):
    # Logits of magnitude 1e4 are exact to fp32 rounding only if the max is subtracted before exp.
    x = _logits((3, 5, 37), scale=1e4)
    out, _ = er.reduce_forward(x, reduction, **PATHS[path])
    expected = reduce_reference(x.double(), reduction)
    assert torch.isfinite(expected).all()
    _assert_matches(out, expected, **FP32_TOL)


@pytest.mark.parametrize("reduction", KERNEL_REDUCTIONS)
def test_reduce_forward_empty_batch(reduction):
    x = torch.randn(3, 0, 5, device=DEVICE)
    out, aux = er.reduce_forward(x, reduction)
    assert out.shape == (0, 5)
    assert aux.shape == ((2, 3, 0) if reduction in SAVES_MEMBER_SOFTMAX else (0,))
    grad = er.reduce_backward(torch.randn(0, 5, device=DEVICE), x, out, aux, reduction)
    assert grad.shape == ((3, 0, 5) if reduction in ("mean_probs", "log_mean_probs") else (0, 5))


@pytest.mark.parametrize("reduction", KERNEL_REDUCTIONS)
def test_reduce_vocabulary_sized_rows(reduction):
    # K = 131072 takes the long-row kernels by the launcher's own choice (32 chunks of 4096).
    x = _logits((2, 2, 131072))
    out, aux = er.reduce_forward(x, reduction)
    _assert_matches(out, reduce_reference(x.double(), reduction), **FP32_TOL)
    grad_out = torch.randn(2, 131072, device=DEVICE)
    grad = er.reduce_backward(grad_out, x, out, aux, reduction)
    _assert_matches(grad.expand_as(x), _reference_grad(x, grad_out, reduction), **FP32_TOL)


# ---------------------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(3, 7, 41), (1, 2, 1), (2, 5, 10)], ids=str)
@pytest.mark.parametrize("reduction", KERNEL_REDUCTIONS)
def test_reduce_backward_matches_autograd(reduction, shape, path):
    x = _logits(shape)
    out, aux = er.reduce_forward(x, reduction, **PATHS[path])
    grad_out = torch.randn(shape[1:], device=DEVICE)
    grad = er.reduce_backward(grad_out, x, out, aux, reduction, **_backward_tiles(path))
    if reduction in ("mean", "softmax_of_mean"):
        # One [R, K] gradient shared by every member (the op layer expands it over N).
        assert grad.shape == shape[1:] and grad.dtype == torch.float32
        grad = grad.expand(shape)
    else:
        assert grad.shape == shape and grad.dtype == x.dtype and grad.is_contiguous()
    _assert_matches(grad, _reference_grad(x, grad_out, reduction), **FP32_TOL)


@pytest.mark.parametrize("layout", ["member_middle", "class_strided", "expanded_members"])
@pytest.mark.parametrize("reduction", ["mean_probs", "log_mean_probs"])
def test_reduce_backward_any_strides(reduction, layout):
    x = _logits((3, 6, 23), layout)
    out, aux = er.reduce_forward(x, reduction)
    grad_out = torch.randn(6, 23, device=DEVICE)
    grad = er.reduce_backward(grad_out, x, out, aux, reduction)
    _assert_matches(grad, _reference_grad(x, grad_out, reduction), **FP32_TOL)


@pytest.mark.parametrize("path", ["short", "long", "split"])
@pytest.mark.parametrize("reduction", ["mean_probs", "log_mean_probs"])
def test_reduce_backward_neg_inf_entries(reduction, path):
    # -inf logits in one member: zero probability there, zero gradient, everything else finite.
    x = _logits((3, 7, 41))
    x[0][torch.rand(7, 41, device=DEVICE) < 0.3] = float("-inf")
    out, aux = er.reduce_forward(x, reduction, **PATHS[path])
    grad_out = torch.randn(7, 41, device=DEVICE)
    grad = er.reduce_backward(grad_out, x, out, aux, reduction, **_backward_tiles(path))
    expected = _reference_grad(x, grad_out, reduction)
    assert torch.isfinite(expected).all()
    _assert_matches(grad, expected, **FP32_TOL)


@pytest.mark.parametrize("path", ["short", "long", "split"])
@pytest.mark.parametrize("scale, offset", [(1.0, 1e4), (30.0, 1e3)], ids=["1e4+", "30*1e3+"])
@pytest.mark.parametrize("reduction", ["mean_probs", "log_mean_probs"])
def test_reduce_backward_large_logits_are_exact(reduction, scale, offset, path):
    # The member softmax is rebuilt from the saved row max and sum of exp(x - max): exact to fp32 rounding however
    # large the logits (from a saved fp32 log-sum-exp, rounded to the logits' magnitude, it was off by ~1e-3).
    x = (torch.randn(3, 5, 37, dtype=torch.float64) * scale + offset).float().to(DEVICE)
    out, aux = er.reduce_forward(x, reduction, **PATHS[path])
    _assert_saved_softmax(aux, x)
    grad_out = torch.randn(5, 37, device=DEVICE)
    grad = er.reduce_backward(grad_out, x, out, aux, reduction, **_backward_tiles(path))
    expected = _reference_grad(x, grad_out, reduction)
    _assert_matches(grad, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("path", ["short", "long"])
def test_log_mean_probs_backward_where_member_probabilities_underflow(path):
    # exp(-110) underflows float32: the ratio s / p of the log_mean_probs gradient must be taken in log space.
    # Member 0 puts 1e-48 on class 2, member 1 one half: d out_2 / d x_1 = [-0.5, 0, 0.5] up to 1e-48.
    x = torch.tensor([[[0.0, 0.0, -110.0]], [[0.0, -110.0, 0.0]]], device=DEVICE)
    grad_out = torch.tensor([[0.0, 0.0, 1.0]], device=DEVICE)
    out, aux = er.reduce_forward(x, "log_mean_probs", **PATHS[path])
    grad = er.reduce_backward(grad_out, x, out, aux, "log_mean_probs", **_backward_tiles(path))
    torch.testing.assert_close(grad.cpu(), torch.tensor([[[0.0, 0.0, 0.0]], [[-0.5, 0.0, 0.5]]]), rtol=0, atol=1e-7)
    one = torch.tensor([[[0.0, 0.0, -110.0]]], device=DEVICE)  # one member: d out_2 / d x = [-0.5, -0.5, 1]
    out, aux = er.reduce_forward(one, "log_mean_probs", **PATHS[path])
    grad = er.reduce_backward(grad_out, one, out, aux, "log_mean_probs", **_backward_tiles(path))
    torch.testing.assert_close(grad.cpu(), torch.tensor([[[-0.5, -0.5, 1.0]]]), rtol=0, atol=1e-7)
    # Random logits of scale 30: many member probabilities underflow.
    x = _logits((4, 6, 41), scale=30.0)
    out, aux = er.reduce_forward(x, "log_mean_probs", **PATHS[path])
    grad_out = torch.randn(6, 41, device=DEVICE)
    grad = er.reduce_backward(grad_out, x, out, aux, "log_mean_probs", **_backward_tiles(path))
    expected = _reference_grad(x, grad_out, "log_mean_probs")
    _assert_matches(grad, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


# ---------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------


def _assert_stats_match(stats, x, **tol):
    expected = stats_reference(x.double().cpu())
    stats = [s.cpu() for s in stats]
    assert len(stats) == len(expected._fields)
    for name, actual, want in zip(expected._fields, stats, expected):
        if name == "prediction":
            assert actual.dtype == torch.int64
        else:
            assert actual.dtype == torch.float32, name
        assert actual.shape == want.shape, name
    for name, actual, want in zip(expected._fields, stats, expected):
        if name in ("prediction", "disagreement"):  # exact, NaN rows included
            torch.testing.assert_close(actual, want.to(actual.dtype), rtol=0, atol=0, equal_nan=True, msg=name)
        else:
            try:
                _assert_matches(actual, want, **tol)
            except AssertionError as error:
                raise AssertionError(f"{name}: {error}") from None


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES + [(5, 4, 100)], ids=str)
def test_stats_match_reference(shape, path):
    x = _logits(shape)
    _assert_stats_match(er.stats_forward(x, **PATHS[path]), x, **FP32_TOL)


@pytest.mark.parametrize("path", ["short", "long", "split"])
def test_stats_ties_and_disagreement(path):
    x = _logits((3, 8, 41), scale=1.0)
    x[..., 2] += 6.0
    x[..., 5] = x[..., 2]  # exact tie in the same chunk of 16 classes
    x[..., 20] = x[..., 2]  # exact tie across chunks: the first index must win
    x[0, ::2, 30] = x[0, ::2, 2] + 1.0  # member 0 disagrees on even rows
    x[1, ::4, 9] = x[1, ::4, 2] + 1.0  # member 1 too, on every fourth row
    stats = er.stats_forward(x, **PATHS[path])
    _assert_stats_match(stats, x, **FP32_TOL)
    assert (stats[5] == 2).all()
    expected_disagreement = torch.zeros(8)
    expected_disagreement[::2] += 1 / 3
    expected_disagreement[::4] += 1 / 3
    torch.testing.assert_close(stats[6].cpu(), expected_disagreement)


@pytest.mark.parametrize("path", ["short", "long", "split"])
def test_stats_neg_inf(path):
    x = _logits_with_neg_inf()
    _assert_stats_match(er.stats_forward(x, **PATHS[path]), x, **FP32_TOL)


@pytest.mark.parametrize("path", ["short", "long", "split"])
@pytest.mark.parametrize("layout", ["member_middle", "class_strided", "expanded_rows"])
def test_stats_any_strides(layout, path):
    x = _logits((3, 6, 23), layout)
    _assert_stats_match(er.stats_forward(x, **PATHS[path]), x, **FP32_TOL)


def test_stats_large_logits_and_vocabulary_sized_rows():
    x = _logits((3, 4, 37), scale=1e4)
    _assert_stats_match(er.stats_forward(x), x, **FP32_TOL)
    x = _logits((2, 2, 131072))
    _assert_stats_match(er.stats_forward(x), x, **FP32_TOL)


def test_stats_empty_batch():
    stats = er.stats_forward(torch.randn(4, 0, 7, device=DEVICE))
    assert stats[0].shape == (0, 7) and all(s.shape == (0,) for s in stats[1:])


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


def test_bad_input_raises():
    x = torch.randn(2, 3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="unknown reduction 'median'"):
        er.reduce_forward(x, "median")
    with pytest.raises(ValueError, match="do not implement reduction 'vote'"):
        er.reduce_forward(x, "vote")
    with pytest.raises(ValueError, match=r"shape \[N, R, K\]"):
        er.reduce_forward(x[0], "mean")
    with pytest.raises(ValueError, match=r"shape \[N, R, K\]"):
        er.stats_forward(x[None])
    with pytest.raises(TypeError, match="int64"):
        er.reduce_forward(torch.ones(2, 3, 4, dtype=torch.int64, device=DEVICE), "mean")
    with pytest.raises(ValueError, match="no members"):
        er.stats_forward(x[:0])
    with pytest.raises(ValueError, match="block_k must be a power of two"):
        er.reduce_forward(x, "mean_probs", block_k=12)
    with pytest.raises(ValueError, match="splits must be >= 1"):
        er.stats_forward(x, block_k=2, splits=0)
    out, aux = er.reduce_forward(x, "mean_probs")
    with pytest.raises(ValueError, match="aux must be"):
        er.reduce_backward(torch.ones_like(out), x, out, aux[:1], "mean_probs")


# ---------------------------------------------------------------------------------------------------------
# GPU: half-precision inputs, real sizes, torch.compile
# ---------------------------------------------------------------------------------------------------------

# Few rows of long K take split-K by the launcher's choice; (2, 280, 16384) has enough rows not to.
GPU_SHAPES = [(3, 423, 1000), (16, 4096, 10), (4, 9, 32000), (2, 3, 131072), (8, 7, 8192), (2, 280, 16384)]
# Gradient tolerance relative to the largest gradient: h - s * sum_k h sums K terms in fp32.
GRAD_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-3),
            torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("reduction", KERNEL_REDUCTIONS)
def test_gpu_reduce(reduction, shape, dtype):
    # The math is fp32 whatever the input dtype, so outputs match the fp64 reference of the same
    # (rounded) inputs to fp32 accuracy; only gradients stored in x's dtype carry its rounding.
    x = _logits(shape).to(dtype)
    out, aux = er.reduce_forward(x, reduction)
    _assert_matches(out, reduce_reference(x.double(), reduction), rtol=2e-5, atol=2e-6)
    grad_out = torch.randn(shape[1:], device=DEVICE)
    grad = er.reduce_backward(grad_out, x, out, aux, reduction)
    expected = _reference_grad(x, grad_out, reduction)
    tol = GRAD_TOL[dtype]
    _assert_matches(grad.expand(shape), expected, rtol=tol["rtol"], atol=tol["atol"] * expected.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_gpu_stats(shape, dtype):
    x = _logits(shape).to(dtype)
    _assert_stats_match(er.stats_forward(x), x, rtol=2e-5, atol=2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", KERNEL_REDUCTIONS)
def test_gpu_neg_inf_and_strides(reduction):
    x = _logits_with_neg_inf()
    _assert_matches(er.reduce_forward(x, reduction)[0], reduce_reference(x.double(), reduction), **FP32_TOL)
    x = _logits((5, 300, 1000), "member_middle").to(torch.bfloat16)
    _assert_matches(er.reduce_forward(x, reduction)[0], reduce_reference(x.double(), reduction), **FP32_TOL)


@pytest.mark.gpu
def test_gpu_torch_compile_traces_the_launchers():
    x = _logits((4, 33, 1000))

    def probs_and_stats(logits):
        return er.reduce_forward(logits, "mean_probs")[0], er.stats_forward(logits)[1]

    compiled = torch.compile(probs_and_stats, fullgraph=True)
    for actual, expected in zip(compiled(x), probs_and_stats(x)):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
def test_gpu_fake_tracing_records_the_kernels():
    # make_fx with fake tensors is how triton_op / AOTAutograd trace: the launches must appear in the graph.
    from torch.fx.experimental.proxy_tensor import make_fx

    x = _logits((3, 5, 100))
    graph = make_fx(lambda logits: er.reduce_forward(logits, "log_mean_probs")[0], tracing_mode="fake")(x)
    assert "triton_kernel_wrapper" in graph.code
    # Split-K: both passes are recorded.
    x = _logits((3, 2, 20000))
    graph = make_fx(lambda logits: er.stats_forward(logits)[1], tracing_mode="fake")(x)
    assert graph.code.count("triton_kernel_wrapper") >= 3
