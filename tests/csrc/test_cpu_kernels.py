"""The C++ CPU kernels (torch.ops.fused_ensemble_ext.*) against the float64 reference, called directly.

The kernels take [N, R, K] logits with any strides; the oracle is fused_ensemble.reference run in float64 on the
same values. Half and bfloat16 inputs are exact in float32, and the kernels accumulate in float32, so every
float32 output is held to float32 tolerances whatever the input dtype.
"""

import math

import pytest
import torch

from fused_ensemble import extension
from fused_ensemble.ops.reductions import KERNEL_REDUCTIONS, SAVES_MEMBER_SOFTMAX
from fused_ensemble.ops.reference import reduce_reference, stats_reference

if not extension.load_extension():
    pytest.skip(f"C++ extension unavailable: {extension.extension_status()}", allow_module_level=True)

ops = torch.ops.fused_ensemble_ext
STATS_FIELDS = ("probs", "entropy", "expected_entropy", "mutual_info", "confidence", "prediction", "disagreement")
LOW_PRECISION = (torch.float16, torch.bfloat16)


def assert_matches(actual, expected, classes, *, out_dtype=torch.float32, what=""):
    """float32 outputs: rtol 1.3e-6 and an atol that grows with the number of classes summed; float64: 1e-12."""
    if out_dtype == torch.float64:
        rtol, atol = 1e-12, 1e-12
    else:
        rtol, atol = 1.3e-6, 1e-6 * max(1.0, math.sqrt(classes))
    assert actual.dtype == out_dtype, what
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, equal_nan=True, msg=what)


def check_forward(x, reduction):
    out, aux = ops.reduce_forward(x, reduction)
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    N, R, K = x.shape
    assert out.shape == (R, K) and out.is_contiguous()
    assert_matches(out, reduce_reference(x.double(), reduction), K, out_dtype=out_dtype, what=reduction)
    if reduction in SAVES_MEMBER_SOFTMAX:
        # [2, N, R]: each member row's max (exactly) and its sum of exp(x - max), what the backward rebuilds the
        # member softmax from.
        assert aux.shape == (2, N, R) and aux.dtype == out_dtype and aux.is_contiguous()
        row_max = x.double().amax(-1)
        torch.testing.assert_close(aux[0].double(), row_max, rtol=0, atol=0, equal_nan=True, msg="row max")
        finite = torch.isfinite(row_max)  # rows without a softmax save unspecified sums
        sums = (x.double() - row_max.unsqueeze(-1)).exp().sum(-1)
        assert_matches(aux[1][finite], sums[finite], K, out_dtype=out_dtype, what=f"{reduction} sum of exp")
    else:
        assert aux.shape == (0,) and aux.dtype == out_dtype


def check_stats(x):
    got = ops.stats_forward(x)
    want = stats_reference(x.double())
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    K = x.shape[-1]
    for name, g, w in zip(STATS_FIELDS, got, want):
        if name == "prediction":
            assert g.dtype == torch.int64
            torch.testing.assert_close(g, w, rtol=0, atol=0, msg=name)
        else:
            assert_matches(g, w, K, out_dtype=out_dtype, what=name)


def check_all(x):
    for reduction in KERNEL_REDUCTIONS:
        check_forward(x, reduction)
    check_stats(x)


SHAPES = [(1, 1, 1), (3, 7, 41), (8, 5, 1000), (1, 3, 10), (4, 2, 1), (5, 1, 33), (2, 70, 9)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_stats_match_reference(shape, dtype):
    check_all(torch.randn(shape, dtype=torch.float64).mul(3).to(dtype))


@pytest.mark.parametrize("classes", [1, 2, 7, 16, 17, 255, 4099, 32000, 131072])
def test_class_counts_up_to_128k(classes):
    check_all(torch.randn(3, 2, classes) * 4)


def test_many_rows_split_over_threads():
    check_all(torch.randn(4, 300, 37))


def test_member_dim_not_first():
    base = torch.randn(6, 4, 29)  # [rows, members, classes]
    check_all(base.movedim(1, 0))  # [members, rows, classes], strides (29, 116, 1)


@pytest.mark.parametrize("layout", ["class_stride_2", "class_dim_transposed", "row_slice", "offset"])
def test_non_contiguous(layout):
    if layout == "class_stride_2":
        x = torch.randn(3, 5, 82)[:, :, ::2]
    elif layout == "class_dim_transposed":
        x = torch.randn(3, 41, 5).transpose(1, 2)
    elif layout == "row_slice":
        x = torch.randn(3, 10, 41)[:, 1::3]
    else:
        x = torch.randn(4, 6, 50)[1:, 2:, 3:44]
    assert not x.is_contiguous()
    check_all(x)
    check_all(x.to(torch.bfloat16))


@pytest.mark.parametrize("expanded_dim", [0, 1, 2])
def test_zero_strides(expanded_dim):
    shape = [3, 5, 41]
    base_shape = list(shape)
    base_shape[expanded_dim] = 1
    x = torch.randn(base_shape).expand(shape)
    assert x.stride(expanded_dim) == 0
    check_all(x)  # expanded_dim == 2: every class ties, so argmax must take the first index


def test_negative_infinity_entries():
    x = torch.randn(4, 6, 41)
    x[torch.rand_like(x) < 0.3] = -math.inf
    x[:, :, 0] = torch.randn(4, 6)  # every member row keeps a finite entry
    x[:, 2, 5] = -math.inf  # a class that every member rules out
    check_all(x)


def test_member_row_all_negative_infinity_gives_nan_like_reference():
    x = torch.randn(3, 4, 17)
    x[1, 2] = -math.inf
    x[:, 3] = -math.inf
    check_all(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_magnitude_logits(dtype):
    x = (torch.randn(4, 5, 300) * 1e4).to(dtype)
    for reduction in ("mean_probs", "log_mean_probs"):
        check_forward(x, reduction)
    check_stats(x)
    # The member mean of 1e4-sized logits is exact only to float32 rounding of the inputs' size (the reference
    # in float32 errs as much), and softmax_of_mean exponentiates that error.
    rounding = 4 * torch.finfo(torch.float32).eps * x.abs().max().item()
    out, _ = ops.reduce_forward(x, "mean")
    torch.testing.assert_close(out.double(), reduce_reference(x.double(), "mean"), rtol=0, atol=rounding)
    out, _ = ops.reduce_forward(x, "softmax_of_mean")
    torch.testing.assert_close(out.double(), reduce_reference(x.double(), "softmax_of_mean"), rtol=rounding,
                               atol=1e-30)


def test_empty_batch():
    x = torch.randn(3, 0, 11)
    for reduction in KERNEL_REDUCTIONS:
        out, aux = ops.reduce_forward(x, reduction)
        assert out.shape == (0, 11)
        grad = ops.reduce_backward(torch.randn(0, 11), x, out, aux, reduction)
        assert grad.shape == ((0, 11) if reduction in ("mean", "softmax_of_mean") else (3, 0, 11))
    stats = ops.stats_forward(x)
    assert stats[0].shape == (0, 11) and all(t.shape == (0,) for t in stats[1:])


def reference_grad(x, reduction, grad_out):
    x64 = x.detach().double().requires_grad_(True)
    reduce_reference(x64, reduction).backward(grad_out.double())
    return x64.grad


def check_backward(x, reduction):
    out, aux = ops.reduce_forward(x, reduction)
    grad_out = torch.randn_like(out)
    grad = ops.reduce_backward(grad_out, x, out, aux, reduction)
    want = reference_grad(x, reduction, grad_out)
    N, R, K = x.shape
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if reduction in ("mean", "softmax_of_mean"):
        assert grad.shape == (R, K) and grad.dtype == out_dtype
        grad = grad.expand(N, R, K)
    else:
        assert grad.shape == (N, R, K) and grad.dtype == x.dtype and grad.is_contiguous()
    if x.dtype in LOW_PRECISION:  # the member gradients are rounded to the logits' dtype
        rtol, atol = (1e-3, 1e-5) if x.dtype == torch.float16 else (1.6e-2, 1e-4)
        torch.testing.assert_close(grad.double(), want, rtol=rtol, atol=atol, equal_nan=True, msg=reduction)
    else:
        assert_matches(grad.to(out_dtype), want, K, out_dtype=out_dtype, what=reduction)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", KERNEL_REDUCTIONS)
def test_backward_matches_autograd_of_reference(reduction, dtype):
    for shape in [(3, 7, 41), (1, 1, 1), (4, 3, 1000)]:
        check_backward(torch.randn(shape, dtype=torch.float64).mul(2).to(dtype), reduction)


@pytest.mark.parametrize("reduction", KERNEL_REDUCTIONS)
def test_backward_strided_and_infinite_inputs(reduction):
    x = torch.randn(5, 3, 4, 60).movedim(1, 0)[:, :, 1, ::2]  # [3, 5, 30], member dim moved, class stride 2
    check_backward(x, reduction)
    y = torch.randn(3, 5, 30, dtype=torch.float64)
    # -inf in members 1 and 2 only: where every member is -inf, the reference's logsumexp backward is NaN.
    y[1:][torch.rand_like(y[1:]) < 0.3] = -math.inf
    y[..., 0] = 0.5
    check_backward(y, reduction)


def test_log_mean_probs_backward_class_ruled_out_by_every_member():
    # The contract takes h = 0 where a member's probability is 0; with class 5 at -inf in every member the
    # gradient is then that of the logits without class 5, and 0 at class 5 (the reference's logsumexp backward
    # gives NaN there instead).
    x = torch.randn(3, 4, 12, dtype=torch.float64)
    x[:, :, 5] = -math.inf
    out, aux = ops.reduce_forward(x, "log_mean_probs")
    grad_out = torch.randn_like(out)
    grad = ops.reduce_backward(grad_out, x, out, aux, "log_mean_probs")
    kept = [k for k in range(12) if k != 5]
    want = reference_grad(x[:, :, kept], "log_mean_probs", grad_out[:, kept])
    torch.testing.assert_close(grad[:, :, kept], want, rtol=1e-12, atol=1e-12)
    assert torch.equal(grad[:, :, 5], torch.zeros(3, 4, dtype=torch.float64))


@pytest.mark.parametrize("classes", [10, 41], ids=["short-rows", "rows"])
@pytest.mark.parametrize("scale, offset", [(1.0, 1e4), (30.0, 1e3)], ids=["1e4+", "30*1e3+"])
@pytest.mark.parametrize("reduction", ["mean_probs", "log_mean_probs"])
def test_backward_at_large_logit_offsets_is_exact(reduction, scale, offset, classes):
    # The backward rebuilds each member softmax from the saved row max and sum of exp(x - max): exact to fp32
    # rounding at any offset (from a float32 log-sum-exp, rounded to the logits' magnitude, it erred by ~1e-3).
    x = (torch.randn(4, 37, classes, dtype=torch.float64) * scale + offset).float()
    out, aux = ops.reduce_forward(x, reduction)
    grad_out = torch.randn_like(out)
    grad = ops.reduce_backward(grad_out, x, out, aux, reduction)
    want = reference_grad(x, reduction, grad_out)
    torch.testing.assert_close(grad.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_log_mean_probs_backward_where_member_probabilities_underflow():
    # exp(-110) underflows float32; the gradient's ratio s / p is taken in log space and stays right.
    x = torch.tensor([[[0.0, 0.0, -110.0]], [[0.0, -110.0, 0.0]]])
    for classes in (3, 20):  # the short-row and the row path
        padded = torch.cat([x, torch.full((2, 1, classes - 3), -math.inf)], -1)
        out, aux = ops.reduce_forward(padded, "log_mean_probs")
        grad_out = torch.zeros(1, classes)
        grad_out[0, 2] = 1.0
        grad = ops.reduce_backward(grad_out, padded, out, aux, "log_mean_probs")
        torch.testing.assert_close(grad[..., :3], torch.tensor([[[0.0, 0.0, 0.0]], [[-0.5, 0.0, 0.5]]]), rtol=0,
                                   atol=1e-7)
    for classes in (10, 41):  # random logits of scale 30: many member probabilities underflow
        x = torch.randn(4, 6, classes) * 30
        out, aux = ops.reduce_forward(x, "log_mean_probs")
        grad_out = torch.randn_like(out)
        grad = ops.reduce_backward(grad_out, x, out, aux, "log_mean_probs")
        want = reference_grad(x, "log_mean_probs", grad_out)
        torch.testing.assert_close(grad.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("classes", [10, 41], ids=["short-rows", "rows"])
def test_stats_rows_without_a_member_softmax_are_nan(classes):
    # A NaN or +inf logit in one member, or a member row of -inf: NaN in every field of that row, prediction 0.
    x = torch.randn(3, 8, classes)
    x[1, 1, 5] = math.nan
    x[0, 2, 3] = math.inf
    x[2, 3, :] = -math.inf
    x[0, 4, 2], x[1, 4, 2] = math.inf, -math.inf
    x[1, 5][torch.rand(classes) < 0.5] = -math.inf  # -inf entries alone are probabilities of 0
    x[1, 5, 0] = 1.0
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        y = x.to(dtype)
        check_stats(y)
        probs, entropy, expected_entropy, mutual_info, confidence, prediction, disagreement = ops.stats_forward(y)
        undefined = torch.tensor([False, True, True, True, True, False, False, False])
        assert torch.equal(probs.isnan().all(-1), undefined) and not probs[~undefined].isnan().any()
        for field in (entropy, expected_entropy, mutual_info, confidence, disagreement):
            assert torch.equal(field.isnan(), undefined)
        assert (prediction[undefined] == 0).all()


@pytest.mark.parametrize("classes", [10, 41], ids=["short-rows", "rows"])
def test_stats_mutual_information_is_never_negative(classes):
    # Every member the same: the mutual information is 0 exactly, where entropy - expected_entropy rounds either way.
    x = torch.randn(1, 300, classes).mul(5).expand(6, 300, classes)
    mutual_info = ops.stats_forward(x)[3]
    assert (mutual_info >= 0).all() and mutual_info.max() < 1e-5


class ExtensionReduce(torch.autograd.Function):
    """The forward and backward ops, wired as autograd does it in the op layer."""

    @staticmethod
    def forward(ctx, x, reduction):
        out, aux = ops.reduce_forward(x, reduction)
        ctx.save_for_backward(x, out, aux)
        ctx.reduction = reduction
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, out, aux = ctx.saved_tensors
        grad = ops.reduce_backward(grad_out.contiguous(), x, out, aux, ctx.reduction)
        if ctx.reduction in ("mean", "softmax_of_mean"):
            grad = grad.expand(x.shape)
        return grad, None


@pytest.mark.parametrize("reduction", KERNEL_REDUCTIONS)
def test_gradcheck_float64(reduction):
    x = torch.randn(3, 4, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ExtensionReduce.apply(t, reduction), (x,))
    strided = torch.randn(4, 3, 14, dtype=torch.float64)[:, :, ::2].transpose(0, 1).detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: ExtensionReduce.apply(t, reduction), (strided,))


def test_errors():
    x = torch.randn(2, 3, 5)
    with pytest.raises(RuntimeError, match="3 dims"):
        ops.reduce_forward(x[0], "mean")
    with pytest.raises(RuntimeError, match="3 dims"):
        ops.stats_forward(x[None])
    with pytest.raises(RuntimeError, match="float16, bfloat16, float32 or float64"):
        ops.reduce_forward(x.to(torch.int32), "mean")
    with pytest.raises(RuntimeError, match="unknown reduction 'median'"):
        ops.reduce_forward(x, "median")
    with pytest.raises(RuntimeError, match="unknown reduction 'vote'"):  # the dispatch never sends it here
        ops.reduce_forward(x, "vote")
    with pytest.raises(RuntimeError, match="no members"):
        ops.reduce_forward(x[:0], "mean")
    with pytest.raises(RuntimeError, match="no classes"):
        ops.stats_forward(x[:, :, :0])
    out, aux = ops.reduce_forward(x, "mean_probs")
    with pytest.raises(RuntimeError, match=r"aux \(member row max and sum of exp\) must have shape \[2, 2, 3\]"):
        ops.reduce_backward(torch.randn(3, 5), x, out, aux[:1], "mean_probs")
    with pytest.raises(RuntimeError, match="grad_out must be Float"):
        ops.reduce_backward(torch.randn(3, 5, dtype=torch.float64), x, out, aux, "mean_probs")


def test_extension_reports_itself():
    assert extension.extension_status() == "loaded"
    assert isinstance(extension.has_cuda_kernels(), bool)


@pytest.mark.parametrize("classes", [3, 10, 16])
@pytest.mark.parametrize("layout", ["contiguous", "member_dim_not_first", "class_stride_2", "expanded_members",
                                    "expanded_classes", "infinities"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_short_rows(classes, layout, dtype):
    # Rows of at most 16 classes run the member-softmax reductions, their backward and the statistics W rows at a
    # time (a [W rows x K] tile transposed into vectors): 37 rows leave a partial block at the end of every range.
    if layout == "contiguous":
        x = torch.randn(5, 37, classes)
    elif layout == "member_dim_not_first":
        x = torch.randn(37, 5, classes).movedim(1, 0)
    elif layout == "class_stride_2":
        x = torch.randn(5, 37, 2 * classes)[:, :, ::2]
    elif layout == "expanded_members":
        x = torch.randn(1, 37, classes).expand(5, 37, classes)
    elif layout == "expanded_classes":
        x = torch.randn(5, 37, 1).expand(5, 37, classes)  # every class ties
    else:
        x = torch.randn(5, 37, classes)
        x[torch.rand_like(x) < 0.3] = -math.inf
        x[:, :, 0] = torch.randn(5, 37)
        x[2, 4] = -math.inf  # a member row with nothing finite: NaN probabilities, like the reference
    x = (x * 3).to(dtype)
    check_forward(x, "mean_probs")
    check_all(x)
    if layout != "infinities":  # the reference's gradient of a member row of -inf is NaN; see the test below
        for reduction in ("mean_probs", "log_mean_probs"):
            check_backward(x, reduction)


@pytest.mark.parametrize("reduction", ["mean_probs", "log_mean_probs"])
def test_short_rows_backward_with_infinities(reduction):
    # -inf in members 1 and 2 only (as in test_backward_strided_and_infinite_inputs), 10 classes, 37 rows.
    y = torch.randn(3, 37, 10, dtype=torch.float64)
    y[1:][torch.rand_like(y[1:]) < 0.3] = -math.inf
    y[..., 0] = 0.5
    check_backward(y, reduction)
    check_backward(y.float(), reduction)


def test_short_rows_backward_uses_their_saved_log_sum_exp():
    x = torch.randn(4, 21, 10, dtype=torch.float64, requires_grad=True)  # several row blocks, a partial one
    assert torch.autograd.gradcheck(lambda t: ExtensionReduce.apply(t, "mean_probs"), (x,))
