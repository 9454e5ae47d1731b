"""The fused ensemble head (members' final Linear + ensemble reduction) against the float64 reference.

The Triton kernels run under TRITON_INTERPRET=1 on CPU tensors (float32 only; conftest.py sets the interpreter
when there is no GPU), where tl.dot is an exact float32 matmul; tests marked ``gpu`` add float16/bfloat16/TF32
inputs and real sizes on CUDA.
"""

import dataclasses
import inspect
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fused_ensemble import REDUCTIONS, config, ensemble_linear_reduce
from fused_ensemble.ops import dispatch
from fused_ensemble.ops.reductions import KERNEL_REDUCTIONS
from fused_ensemble.ops.reference import reduce_reference

from interpreter_warnings import IGNORE_INTERPRETER_WARNINGS

triton = pytest.importorskip("triton")
from fused_ensemble.kernels import ensemble_head as kernels  # noqa: E402

pytestmark = IGNORE_INTERPRETER_WARNINGS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = dict(rtol=1e-5, atol=1e-5)

# (N, B, F, K): non-powers of two, and size 1 in every dim.
SHAPES = [(3, 7, 33, 41), (1, 5, 8, 10), (4, 3, 16, 1), (2, 1, 1, 17)]
# Tile choices: the launcher's heuristic (whole rows in one tile: one pass for every reduction), and 16-class
# blocks (multi-block: stored mean logits + row softmax, or the two-pass log-sum-exp).
PATHS = {"one_block": {}, "multi_block": {"block_k": 16}}


def _inputs(n, b, f, k, member_inputs, bias=True, dtype=torch.float32):
    x = torch.randn(n, b, f) if member_inputs else torch.randn(b, f)
    weight = torch.randn(n, k, f) / math.sqrt(f)  # logits of order 1, like a trained head
    bias_t = torch.randn(n, k) if bias else None
    return tuple(None if t is None else t.to(DEVICE, dtype) for t in (x, weight, bias_t))


def _reference(x, weight, bias, reduction):
    """The fp64 oracle: the member logits stored in full, then fused_ensemble.ops.reference."""
    x, weight = x.double().cpu(), weight.double().cpu()
    logits = torch.einsum("nbf,nkf->nbk" if x.dim() == 3 else "bf,nkf->nbk", x, weight)
    if bias is not None:
        logits = logits + bias.double().cpu().unsqueeze(1)
    return reduce_reference(logits, reduction)


def _members_x(x, n):
    return x if x.dim() == 3 else x.unsqueeze(0).expand(n, *x.shape)


def _assert_matches(actual, expected, rtol, atol):
    """Values within tolerance and the same NaN/inf pattern as the reference."""
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol,
                               equal_nan=True)


# ---------------------------------------------------------------------------------------------------------
# The Triton kernels (launcher level, so that the tile can be forced)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("member_inputs", [False, True], ids=["shared_x", "member_x"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", KERNEL_REDUCTIONS)
def test_kernels_match_reference(reduction, shape, member_inputs, path):
    n, b, f, k = shape
    x, weight, bias = _inputs(n, b, f, k, member_inputs)
    out = kernels.head_forward(_members_x(x, n), weight, bias, reduction, **PATHS[path])
    assert out.shape == (b, k) and out.dtype == torch.float32 and out.is_contiguous()
    _assert_matches(out, _reference(x, weight, bias, reduction), **FP32_TOL)


@pytest.mark.parametrize("reduction", KERNEL_REDUCTIONS)
def test_kernels_many_row_and_class_blocks_without_bias(reduction):
    # 3 row blocks x 3 class blocks x 2 feature chunks, no bias.
    x, weight, _ = _inputs(2, 40, 20, 41, member_inputs=True)
    out = kernels.head_forward(x, weight, None, reduction, block_b=16, block_k=16, block_f=16)
    _assert_matches(out, _reference(x, weight, None, reduction), **FP32_TOL)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", KERNEL_REDUCTIONS)
def test_kernels_read_any_strides(reduction, path):
    n, b, f, k = 3, 6, 20, 35
    # x: members in the middle of the storage (stride_n < stride_b) and every other feature;
    # weight stored [N, F, K] (stride_f > stride_k); bias every other class.
    x = torch.randn(b, n, 2 * f, device=DEVICE).permute(1, 0, 2)[:, :, ::2]
    weight = torch.randn(n, f, k, device=DEVICE).transpose(1, 2) / math.sqrt(f)
    bias = torch.randn(n, 2 * k, device=DEVICE)[:, ::2]
    out = kernels.head_forward(x, weight, bias, reduction, **PATHS[path])
    _assert_matches(out, _reference(x, weight, bias, reduction), **FP32_TOL)


def _exact_large_logits(n, b, f, k, regime):
    """Integer-valued inputs, so that the fp32 GEMM is exact. "spread": logits of magnitude ~1e3, ~1e3 apart
    (every exp(z) overflows fp32); "offset": logits 3000 +- 20, so several classes share each row's mass."""
    x = torch.randint(-3, 4, (b, f)).float()
    if regime == "spread":
        weight = torch.randint(-150, 151, (n, k, f)).float()
        bias = torch.randint(-1000, 1001, (n, k)).float()
    else:
        weight = torch.randint(-1, 2, (n, k, f)).float()
        bias = 3000.0 + torch.randint(-3, 4, (n, k)).float()
    return x.to(DEVICE), weight.to(DEVICE), bias.to(DEVICE)


@pytest.mark.parametrize("regime", ["spread", "offset"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", KERNEL_REDUCTIONS)
def test_kernels_large_logits_are_exact(reduction, path, regime):
    # Every softmax must subtract the row max first, and log p is formed as (z - max) - log_sum: at z ~ 3000
    # (fp32 spacing 2.4e-4) z - lse would be off by ~1e-4, ten times the tolerance.
    # N = 4 keeps the mean logits exact too (sum / 4 of integers); / 3 would round them by up to 1.2e-4.
    x, weight, bias = _exact_large_logits(4, 7, 33, 41, regime)
    expected = _reference(x, weight, bias, reduction)
    assert expected.isfinite().all()
    out = kernels.head_forward(_members_x(x, 4), weight, bias, reduction, **PATHS[path])
    _assert_matches(out, expected, **FP32_TOL)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", KERNEL_REDUCTIONS)
def test_kernels_minus_inf_bias(reduction, path):
    # A -inf bias masks classes out: classes 16..31 of members 0 and 1, a whole 16-class block of their rows in
    # the multi-block path. The result has no NaN: masked classes get probability 0 (mean: -inf).
    n, b, f, k = 3, 5, 12, 41
    x, weight, bias = _inputs(n, b, f, k, member_inputs=False)
    bias[:2, 16:32] = float("-inf")
    masked = kernels.head_forward(_members_x(x, 2), weight[:2], bias[:2], reduction, **PATHS[path])
    _assert_matches(masked, _reference(x, weight[:2], bias[:2], reduction), **FP32_TOL)
    assert not masked.isnan().any()
    # Member 2 masks every class: its softmax is NaN, and so is each reduction exactly where the reference's is.
    bias[2] = float("-inf")
    out = kernels.head_forward(_members_x(x, n), weight, bias, reduction, **PATHS[path])
    _assert_matches(out, _reference(x, weight, bias, reduction), **FP32_TOL)


def test_kernels_empty_batch():
    x, weight, bias = _inputs(3, 0, 8, 10, member_inputs=True)
    for reduction in KERNEL_REDUCTIONS:
        assert kernels.head_forward(x, weight, bias, reduction).shape == (0, 10)


def test_kernels_reject_bad_tiles_and_precision():
    x, weight, bias = _inputs(2, 3, 8, 10, member_inputs=True)
    with pytest.raises(ValueError, match="block_k must be a power of two >= 16"):
        kernels.head_forward(x, weight, bias, "mean", block_k=8)
    with pytest.raises(ValueError, match="block_b must be a power of two >= 16"):
        kernels.head_forward(x, weight, bias, "mean", block_b=24)
    with pytest.raises(ValueError, match="input_precision"):
        kernels.head_forward(x, weight, bias, "mean", input_precision="fp8")


# ---------------------------------------------------------------------------------------------------------
# The public function: backends, dispatch, errors
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", [
    "torch", "triton",
    pytest.param("cpp", marks=pytest.mark.skipif(dispatch.unavailable_reason("cpp", DEVICE, torch.float32) is not None,
                                                 reason="needs the C++ extension"))])
@pytest.mark.parametrize("member_inputs", [False, True], ids=["shared_x", "member_x"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_public_backends_match_reference(reduction, member_inputs, backend):
    x, weight, bias = _inputs(3, 7, 33, 41, member_inputs)
    if backend != "torch" and reduction not in KERNEL_REDUCTIONS:
        with pytest.raises(RuntimeError, match=f"do not implement reduction '{reduction}'"):
            ensemble_linear_reduce(x, weight, bias, reduction, backend=backend)
        return
    out = ensemble_linear_reduce(x, weight, bias, reduction, backend=backend)
    assert out.shape == (7, 41) and out.dtype == torch.float32
    _assert_matches(out, _reference(x, weight, bias, reduction), **FP32_TOL)


@pytest.mark.parametrize("member_inputs", [False, True], ids=["shared_x", "member_x"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_backend_float64_and_no_bias(reduction, member_inputs):
    x, weight, _ = _inputs(2, 4, 9, 6, member_inputs, bias=False, dtype=torch.float64)
    out = ensemble_linear_reduce(x, weight, None, reduction, backend="torch")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.cpu(), _reference(x, weight, None, reduction), rtol=1e-12, atol=1e-12)


def test_auto_is_differentiable_and_triton_refuses_grad():
    x, weight, bias = _inputs(2, 4, 9, 6, member_inputs=False)
    weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="inference only"):
        ensemble_linear_reduce(x, weight, bias, "log_mean_probs", backend="triton")
    ensemble_linear_reduce(x, weight, bias, "log_mean_probs").sum().backward()  # auto: the torch path
    weight64 = weight.detach().double().cpu().requires_grad_(True)
    _reference(x, weight64, bias, "log_mean_probs").sum().backward()
    torch.testing.assert_close(weight.grad.double().cpu(), weight64.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # no graph to build: the Triton path may run
        ensemble_linear_reduce(x, weight, bias, "mean", backend="triton")


def test_auto_uses_torch_for_cpu_tensors(monkeypatch):
    def no_kernel(*args, **kwargs):
        raise AssertionError("the Triton kernels ran for CPU tensors under backend='auto'")

    monkeypatch.setattr(kernels, "head_forward", no_kernel)
    x, weight, bias = _inputs(2, 4, 9, 6, member_inputs=False)
    out = ensemble_linear_reduce(x.cpu(), weight.cpu(), bias.cpu(), "mean_probs")
    _assert_matches(out, _reference(x, weight, bias, "mean_probs"), **FP32_TOL)


def test_triton_unavailable_reasons(monkeypatch):
    x, weight, bias = _inputs(2, 4, 9, 6, member_inputs=False)
    with pytest.raises(RuntimeError, match="float16, bfloat16 or float32"):
        ensemble_linear_reduce(x.double(), weight.double(), bias.double(), backend="triton")
    monkeypatch.setattr(config, "settings", dataclasses.replace(config.settings, triton_interpret=False))
    with pytest.raises(RuntimeError, match="need a CUDA tensor"):
        ensemble_linear_reduce(x.cpu(), weight.cpu(), bias.cpu(), backend="triton")


@pytest.mark.parametrize(("args", "error", "message"), [
    (dict(x=torch.randn(4, 8)), ValueError, r"x must have shape \[B, F=9\]"),
    (dict(x=torch.randn(3, 4, 9)), ValueError, r"x must have shape \[B, F=9\] or \[N=2, B, F=9\]"),
    (dict(x=torch.randn(2, 4, 8)), ValueError, r"\[N=2, B, F=9\]"),
    (dict(x=torch.randn(1, 2, 4, 9)), ValueError, r"x must have shape \[B, F\] .* got shape \(1, 2, 4, 9\)"),
    (dict(weight=torch.randn(6, 9)), ValueError, r"weight must have shape \[N, K, F\]"),
    (dict(weight=torch.randn(0, 6, 9)), ValueError, "at least one member and one class"),
    (dict(bias=torch.randn(2, 5)), ValueError, r"bias must have shape \[N, K\] = \(2, 6\)"),
    (dict(x=torch.ones(4, 9, dtype=torch.int64)), TypeError, "x must be a floating-point tensor.*int64"),
    (dict(weight=torch.ones(2, 6, 9, dtype=torch.int32)), TypeError, "weight must be a floating-point.*int32"),
    (dict(x=torch.randn(4, 9, dtype=torch.float64)), TypeError, "x has dtype torch.float64 but weight has"),
    (dict(x=[[1.0] * 9]), TypeError, "x must be a torch.Tensor, got list"),
    (dict(reduction="median"), ValueError, "unknown reduction 'median'"),
    (dict(backend="cuda"), ValueError, "unknown backend 'cuda'"),
])
def test_errors(args, error, message):
    call = dict(x=torch.randn(4, 9), weight=torch.randn(2, 6, 9), bias=torch.randn(2, 6))
    call.update(args)
    with pytest.raises(error, match=message):
        ensemble_linear_reduce(**call)


# ---------------------------------------------------------------------------------------------------------
# The compiled (non-interpreted) kernels, built for an H100 without one
# ---------------------------------------------------------------------------------------------------------

_COMPILE_FOR_SM90 = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fused_ensemble.kernels import ensemble_head as eh

    for dtype, precision in (("fp32", "tf32"), ("bf16", "ieee")):
        meta = dict(HAS_BIAS=True, SOFTMAX=True, LOG_OUTPUT=True, ONE_K_BLOCK=False, BLOCK_B=64, BLOCK_K=128,
                    BLOCK_F=32, INPUT_PRECISION=precision)
        for fn in (eh._head_mean_kernel, eh._head_block_lse_kernel, eh._head_member_probs_kernel):
            inputs = ("x_ptr", "w_ptr", "b_ptr")
            signature = {name: "constexpr" if name in meta else
                         "*" + dtype if name in inputs else "*fp32" if name.endswith("_ptr") else
                         "fp32" if name == "log_n" else "i32" for name in fn.arg_names}
            constexprs = {name: meta[name] for name in fn.arg_names if name in meta}
            kernel = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32))
            assert "mma" in kernel.asm["ptx"], (fn.__name__, dtype)  # tl.dot became tensor-core code

    # The reduction kernels that share the member accumulation with the head, both ways.
    from fused_ensemble.kernels import ensemble_reduce as er
    for log_output in (False, True):
        meta = dict(LOG_OUTPUT=log_output, BLOCK_R=4, BLOCK_K=64, BLOCK_N=8, BLOCK_S=4)
        for fn in (er._member_probs_short_kernel, er._member_probs_long_kernel, er._member_probs_split_kernel):
            signature = {name: "constexpr" if name in meta else "*fp32" if name.endswith("_ptr") else
                         "fp32" if name == "log_n" else "i64" for name in fn.arg_names}
            constexprs = {name: meta[name] for name in fn.arg_names if name in meta}
            triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32))
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run the compiled kernels for real")
def test_kernels_compile_for_sm90():
    from triton.compiler import ASTSource
    if "constexprs" not in inspect.signature(ASTSource.__init__).parameters:
        pytest.skip("this triton's ASTSource predates the signature-with-constexprs API")
    # The interpreter skips Triton's type checks and lowering; compiling ahead of time for sm_90 (no GPU needed)
    # catches what it would miss, in a process without TRITON_INTERPRET.
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------
# GPU: half precision, TF32, real sizes, the "auto" fallback
# ---------------------------------------------------------------------------------------------------------

HALF_TOL = {torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(8, 64, 512, 10), (4, 33, 200, 1000), (3, 5, 64, 4099)], ids=str)
@pytest.mark.parametrize("reduction", KERNEL_REDUCTIONS)
def test_gpu_half_inputs(reduction, shape, dtype):
    # The oracle gets the same half-precision inputs (upcast exactly), so only accumulation error is measured.
    n, b, f, k = shape
    x, weight, bias = _inputs(n, b, f, k, member_inputs=False, dtype=dtype)
    out = ensemble_linear_reduce(x, weight, bias, reduction, backend="triton")
    assert out.dtype == torch.float32
    _assert_matches(out, _reference(x, weight, bias, reduction), **HALF_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", KERNEL_REDUCTIONS)
def test_gpu_fp32_ieee_and_tf32(reduction, monkeypatch):
    x, weight, bias = _inputs(8, 64, 512, 1000, member_inputs=True)
    expected = _reference(x, weight, bias, reduction)
    _assert_matches(ensemble_linear_reduce(x, weight, bias, reduction, backend="triton"), expected, rtol=1e-4,
                    atol=1e-4)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    _assert_matches(ensemble_linear_reduce(x, weight, bias, reduction, backend="triton"), expected, rtol=5e-3,
                    atol=5e-3)


@pytest.mark.gpu
def test_gpu_auto_falls_back_after_a_kernel_failure(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("broken kernel")

    monkeypatch.setattr(kernels, "head_forward", broken)
    monkeypatch.setattr(dispatch, "_failed_under_auto", set())
    x, weight, bias = _inputs(2, 4, 9, 6, member_inputs=False)
    with pytest.warns(RuntimeWarning, match="broken kernel"):
        out = ensemble_linear_reduce(x, weight, bias, "mean_probs")
    _assert_matches(out, _reference(x, weight, bias, "mean_probs"), **FP32_TOL)
    assert ("triton", "cuda", "linear_reduce") in dispatch._failed_under_auto
