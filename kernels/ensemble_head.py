"""Triton kernels of the fused ensemble head: the members' final Linear layers and the ensemble reduction in one.

Every launcher takes features ``x`` of shape ``[N, B, F]`` (member n reads ``x[n]``; a shared input is an
``expand()`` with member stride 0), weights ``[N, K, F]`` and an optional bias ``[N, K]``, all with arbitrary
strides, and computes the reduction of ``fused_ensemble.ops.reference`` over the member logits
``z[n] = x[n] @ weight[n].T + bias[n]`` without ever storing the ``[N, B, K]`` logits.

A program owns one ``[BLOCK_B, BLOCK_K]`` tile of the output and loops over the N members; for each member it
computes the logits tile with ``tl.dot`` over F in ``BLOCK_F`` chunks (float32 accumulators, bias added in fp32),
so the weights are read once per row block and the logits live only in registers.

- ``"mean"`` / ``"softmax_of_mean"``: one pass that sums the member logits per tile. When one tile holds a whole
  row (K <= BLOCK_K), the row softmax is done in the kernel; otherwise the mean logits ``[B, K]`` (1/N of the
  logits' bytes) are stored and a row softmax finishes the job.
- ``"mean_probs"`` / ``"log_mean_probs"`` need every member row's log-sum-exp over all K first. When one tile holds
  a whole row, it is computed in registers and everything is one pass. Otherwise pass 1 recomputes the logits
  tiles and writes, per (member, K block, row), the block's max and sum of exp(z - max); a small combine turns
  them into the row max and log-sum [N, B]; pass 2 recomputes the logits tiles and accumulates the member
  probabilities (or their log-sum-exp over members) into the output. The GEMM runs twice: the known trade for
  never storing the logits (Liger-Kernel's fused linear cross-entropy makes the same one). Pass 1 is split over
  K blocks rather than looping over K in one program so that small batches with a large K still fill the GPU.

The row max and the log-sum are kept apart (not as one lse) so that ``log p = (z - max) - log_sum``: subtracting
the max first is exact for logits of any magnitude, ``z - lse`` is not. Index math is 64-bit (int64 row, class and
feature offsets; members are reached by advancing pointers). Inference only: there are no backward kernels.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fused_ensemble.kernels.ensemble_reduce import add_member, member_mean
from fused_ensemble.ops.reductions import check_kernel_reduction

MAX_SOFTMAX_BLOCK_K = 256
"""Widest class block the heuristic uses to hold a whole row in one tile (for the in-kernel softmax/log-sum-exp);
wider rows take the multi-block path. A [64, 256] fp32 accumulator is the most a program keeps in registers."""

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INPUT_PRECISIONS = ("ieee", "tf32", "tf32x3")


# ----------------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _logits_tile(x_n, w_n, b_n, rows, cols, B, K, F, stride_xb, stride_xf, stride_wk, stride_wf, stride_bk,
                 HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_F: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr):
    """One member's logits tile ``x_n[rows] @ w_n[cols].T + b_n[cols]`` as [BLOCK_B, BLOCK_K] float32.

    Out-of-range rows and classes are computed from zero padding (finite); the caller masks what it must."""
    row_ok = rows < B
    col_ok = cols < K
    acc = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        feats = f0 + tl.arange(0, BLOCK_F).to(tl.int64)
        feat_ok = feats < F
        x_tile = tl.load(x_n + rows[:, None] * stride_xb + feats[None, :] * stride_xf,
                         mask=row_ok[:, None] & feat_ok[None, :], other=0.0)
        w_tile = tl.load(w_n + cols[:, None] * stride_wk + feats[None, :] * stride_wf,
                         mask=col_ok[:, None] & feat_ok[None, :], other=0.0)
        acc = tl.dot(x_tile, tl.trans(w_tile), acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        bias = tl.load(b_n + cols * stride_bk, mask=col_ok, other=0.0).to(tl.float32)
        acc += bias[None, :]
    return acc


@triton.jit
def _tile_indices(BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    return rows, cols


# ----------------------------------------------------------------------------------------------------------
# "mean" and "softmax_of_mean"
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _head_mean_kernel(x_ptr, w_ptr, b_ptr, out_ptr, N, B, K, F,
                      stride_xn, stride_xb, stride_xf, stride_wn, stride_wk, stride_wf, stride_bn, stride_bk,
                      HAS_BIAS: tl.constexpr, SOFTMAX: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_F: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    # SOFTMAX is set only when one tile holds whole rows (a single class block).
    rows, cols = _tile_indices(BLOCK_B, BLOCK_K)
    mask = (rows[:, None] < B) & (cols[None, :] < K)
    total = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    x_n = x_ptr
    w_n = w_ptr
    b_n = b_ptr
    for _ in range(N):
        total += _logits_tile(x_n, w_n, b_n, rows, cols, B, K, F, stride_xb, stride_xf, stride_wk, stride_wf,
                              stride_bk, HAS_BIAS, BLOCK_B, BLOCK_K, BLOCK_F, INPUT_PRECISION)
        x_n += stride_xn
        w_n += stride_wn
        b_n += stride_bn
    result = total / N
    if SOFTMAX:
        # Padding classes get -inf so they take no probability; an all -inf row gives NaN, as torch.softmax.
        result = tl.where(mask, result, float("-inf"))
        e = tl.exp(result - tl.max(result, axis=1)[:, None])
        result = e / tl.sum(e, axis=1)[:, None]
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], result, mask=mask)


# ----------------------------------------------------------------------------------------------------------
# "mean_probs" and "log_mean_probs" (LOG_OUTPUT)
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _head_block_lse_kernel(x_ptr, w_ptr, b_ptr, block_max_ptr, block_sum_ptr, N, B, K, F,
                           stride_xn, stride_xb, stride_xf, stride_wn, stride_wk, stride_wf, stride_bn, stride_bk,
                           HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                           BLOCK_F: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    # Pass 1: per member and row, this class block's max and sum of exp(z - max), stored at
    # block_max[n, program_id(1), row] (contiguous [N, K blocks, B] buffers).
    rows, cols = _tile_indices(BLOCK_B, BLOCK_K)
    row_ok = rows < B
    col_ok = cols < K
    num_k_blocks = tl.num_programs(1).to(tl.int64)
    partial_offs = tl.program_id(1).to(tl.int64) * B + rows
    x_n = x_ptr
    w_n = w_ptr
    b_n = b_ptr
    for _ in range(N):
        z = _logits_tile(x_n, w_n, b_n, rows, cols, B, K, F, stride_xb, stride_xf, stride_wk, stride_wf,
                         stride_bk, HAS_BIAS, BLOCK_B, BLOCK_K, BLOCK_F, INPUT_PRECISION)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        block_max = tl.max(z, axis=1)
        # A block that is -inf everywhere keeps (max, sum) = (-inf, 0) instead of NaN from -inf - -inf.
        shift = tl.where(block_max == float("-inf"), 0.0, block_max)
        block_sum = tl.sum(tl.exp(z - shift[:, None]), axis=1)
        tl.store(block_max_ptr + partial_offs, block_max, mask=row_ok)
        tl.store(block_sum_ptr + partial_offs, block_sum, mask=row_ok)
        partial_offs += num_k_blocks * B
        x_n += stride_xn
        w_n += stride_wn
        b_n += stride_bn


@triton.jit
def _head_member_probs_kernel(x_ptr, w_ptr, b_ptr, row_max_ptr, row_log_sum_ptr, out_ptr, N, B, K, F,
                              stride_xn, stride_xb, stride_xf, stride_wn, stride_wk, stride_wf, stride_bn,
                              stride_bk, log_n, HAS_BIAS: tl.constexpr, LOG_OUTPUT: tl.constexpr,
                              ONE_K_BLOCK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                              BLOCK_F: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    # ONE_K_BLOCK: the tile holds whole rows, so each member's row statistics come from the tile itself (one
    # pass, the row_* pointers are unused); otherwise they are pass 1's [N, B] row max and log-sum.
    rows, cols = _tile_indices(BLOCK_B, BLOCK_K)
    row_ok = rows < B
    col_ok = cols < K
    # mean_probs: acc sums the member probabilities. log_mean_probs: an online log-sum-exp over the members of
    # log p_n per class (top = running max, acc = sum of exp(log p - top)), exact where p underflows.
    acc = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    top = tl.full([BLOCK_B, BLOCK_K], float("-inf"), dtype=tl.float32)
    stats_offs = rows
    x_n = x_ptr
    w_n = w_ptr
    b_n = b_ptr
    for _ in range(N):
        z = _logits_tile(x_n, w_n, b_n, rows, cols, B, K, F, stride_xb, stride_xf, stride_wk, stride_wf,
                         stride_bk, HAS_BIAS, BLOCK_B, BLOCK_K, BLOCK_F, INPUT_PRECISION)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        if ONE_K_BLOCK:
            # An all -inf member row gives max -inf and NaN probabilities, as the reference's softmax.
            shifted = z - tl.max(z, axis=1)[:, None]
            log_sum = tl.log(tl.sum(tl.exp(shifted), axis=1))
        else:
            row_max = tl.load(row_max_ptr + stats_offs, mask=row_ok, other=0.0)
            log_sum = tl.load(row_log_sum_ptr + stats_offs, mask=row_ok, other=0.0)
            shifted = z - row_max[:, None]
        log_p = shifted - log_sum[:, None]
        acc, top = add_member(acc, top, log_p, tl.exp(log_p), LOG_OUTPUT)
        stats_offs += B
        x_n += stride_xn
        w_n += stride_wn
        b_n += stride_bn
    result = member_mean(acc, top, log_n, N, LOG_OUTPUT)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], result, mask=row_ok[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------

_INTERPRETED = not isinstance(_head_mean_kernel, triton.runtime.JITFunction)  # True under TRITON_INTERPRET=1


class _Plan:
    """Tile of one launch: BLOCK_B rows x BLOCK_K classes, F in BLOCK_F chunks (powers of two >= 16: tl.dot)."""

    def __init__(self, B: int, K: int, F: int, element_size: int, num_sms: int, block_b: int | None,
                 block_k: int | None, block_f: int | None, num_warps: int | None):
        fit_b = max(16, triton.next_power_of_2(B))
        fit_k = max(16, triton.next_power_of_2(K))
        fit_f = max(16, triton.next_power_of_2(F))
        if _INTERPRETED:
            # The interpreter runs programs one after another with numpy: few, moderately sized tiles are fastest.
            default_b, default_k, default_f = min(fit_b, 32), min(fit_k, 64), min(fit_f, 64)
        else:
            # Whole rows up to MAX_SOFTMAX_BLOCK_K classes (one pass for every reduction); wide rows take 128-class
            # blocks. Fewer rows per tile when the row is wide keeps the accumulators in registers.
            default_k = fit_k if fit_k <= MAX_SOFTMAX_BLOCK_K else 128
            default_b = min(fit_b, 64 if default_k <= 128 else 32)
            # Small batches: shorter row blocks until there are programs for every SM (the members are a loop
            # inside a program, so rows and class blocks are the only parallelism).
            while default_b > 16 and triton.cdiv(B, default_b) * triton.cdiv(K, default_k) < num_sms:
                default_b //= 2
            default_f = min(fit_f, 64 if element_size < 4 else 32)  # 128-byte rows of x and weight tiles
        self.block_b = _check_block("block_b", block_b if block_b is not None else default_b)
        self.block_k = _check_block("block_k", block_k if block_k is not None else default_k)
        self.block_f = _check_block("block_f", block_f if block_f is not None else default_f)
        self.num_warps = num_warps or (8 if self.block_b * self.block_k >= 64 * 128 else 4)
        self.grid = (triton.cdiv(B, self.block_b), triton.cdiv(K, self.block_k))
        self.one_k_block = self.grid[1] == 1


def _check_block(name: str, value: int) -> int:
    if value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16 (tl.dot needs 16x16 tiles), got {value}")
    return value


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.dim() != 3 or weight.dim() != 3:
        raise ValueError(f"x must be [N, B, F] and weight [N, K, F], got shapes {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    N, K, F = weight.shape
    if x.shape[0] != N or x.shape[2] != F:
        raise ValueError(f"x must have shape [N={N}, B, F={F}] for weight of shape {tuple(weight.shape)}, "
                         f"got {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (N, K):
        raise ValueError(f"bias must have shape [N, K] = {(N, K)}, got {tuple(bias.shape)}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16 for the Triton kernels, got {t.dtype}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x and weight must have the same dtype (tl.dot), got {x.dtype} and {weight.dtype}")
    if N == 0 or K == 0:
        raise ValueError(f"weight must have at least one member and one class, got shape {tuple(weight.shape)}")


def _row_stats(block_max: torch.Tensor, block_sum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combines pass 1's per-class-block (max, sum of exp) [N, KB, B] into the row max and log-sum [N, B]."""
    row_max = block_max.amax(dim=1)
    # A block that is -inf everywhere contributes exp(-inf - row max) = 0. If the whole row is -inf, the NaN
    # from -inf - -inf is the right answer: the reference's softmax of such a row is NaN too.
    rescale = torch.exp(block_max - row_max.unsqueeze(1))
    return row_max.contiguous(), torch.log((block_sum * rescale).sum(dim=1))


def head_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, reduction: str, *,
                 block_b: int | None = None, block_k: int | None = None, block_f: int | None = None,
                 num_warps: int | None = None, input_precision: str | None = None) -> torch.Tensor:
    """Reduces the member logits ``x[n] @ weight[n].T + bias[n]`` over the N members without storing them.

    ``x`` is ``[N, B, F]`` (any strides; member stride 0 for a shared input), ``weight`` ``[N, K, F]``, ``bias``
    ``[N, K]`` or None, float32/float16/bfloat16 (x and weight of one dtype). Returns a contiguous float32
    ``[B, K]`` tensor: the ``reduction`` of ``fused_ensemble.ops.reference.reduce_reference`` over the logits.
    ``block_b`` / ``block_k`` / ``block_f`` / ``num_warps`` override the heuristic tile (powers of two >= 16;
    ``block_k < K`` forces the multi-block paths), for tests and tuning. ``input_precision`` is tl.dot's for
    float32 inputs: by default ``"tf32"`` if ``torch.backends.cuda.matmul.allow_tf32`` else ``"ieee"``.
    """
    check_kernel_reduction(reduction)
    _check_inputs(x, weight, bias)
    if input_precision is None:
        use_tf32 = x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
        input_precision = "tf32" if use_tf32 else "ieee"
    if input_precision not in _INPUT_PRECISIONS:
        raise ValueError(f"input_precision must be one of {_INPUT_PRECISIONS}, got {input_precision!r}")
    N, B, F = x.shape
    K = weight.shape[1]
    out = torch.empty((B, K), dtype=torch.float32, device=x.device)
    if B == 0:
        return out
    num_sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
    plan = _Plan(B, K, F, x.element_size(), num_sms, block_b, block_k, block_f, num_warps)
    has_bias = bias is not None
    # Without bias, weight stands in for the unused bias pointer (HAS_BIAS=False never reads it).
    bias_arg = bias if has_bias else weight
    bias_strides = bias.stride() if has_bias else (0, 0)
    operands = (x, weight, bias_arg)
    sizes_strides = (N, B, K, F, *x.stride(), *weight.stride(), *bias_strides)
    meta = dict(HAS_BIAS=has_bias, BLOCK_B=plan.block_b, BLOCK_K=plan.block_k, BLOCK_F=plan.block_f,
                INPUT_PRECISION=input_precision, num_warps=plan.num_warps)
    if reduction in ("mean", "softmax_of_mean"):
        softmax_in_kernel = reduction == "softmax_of_mean" and plan.one_k_block
        _head_mean_kernel[plan.grid](*operands, out, *sizes_strides, SOFTMAX=softmax_in_kernel, **meta)
        if reduction == "softmax_of_mean" and not softmax_in_kernel:
            out = torch.softmax(out, dim=-1)  # of the stored mean logits: 1/N of the logits' bytes
        return out
    if plan.one_k_block:
        row_max = row_log_sum = out  # unused by the one-pass kernel
    else:
        block_max = torch.empty((N, plan.grid[1], B), dtype=torch.float32, device=x.device)
        block_sum = torch.empty_like(block_max)
        _head_block_lse_kernel[plan.grid](*operands, block_max, block_sum, *sizes_strides, **meta)
        row_max, row_log_sum = _row_stats(block_max, block_sum)
    _head_member_probs_kernel[plan.grid](*operands, row_max, row_log_sum, out, *sizes_strides, math.log(N),
                                         LOG_OUTPUT=reduction == "log_mean_probs", ONE_K_BLOCK=plan.one_k_block,
                                         **meta)
    return out
