"""Triton kernels of the ensemble reduction: ``reduce_forward``, ``reduce_backward`` and ``stats_forward``.

Every kernel sees logits ``x`` of shape ``[N, R, K]`` (N members, R rows, K classes) with arbitrary strides,
zero strides from ``expand()`` included; x is never copied. Math runs in float32 whatever the input dtype
(float32, float16, bfloat16). The contract (shapes, aux tensors, non-finite logits) is the one of the C++ ops
(``fused_ensemble.ops.reductions``); the semantics are those of ``fused_ensemble.ops.reference``.

Two regimes, chosen by the launchers from K:

- short rows (next_pow2(K) <= 8192): a program holds a ``[BLOCK_R, BLOCK_K]`` tile of BLOCK_R whole rows and
  loops over the N members, so each member row is read exactly once and the result is written once. Several
  rows per program keep the GPU busy when K is tiny (K=10 with 65536 rows).
- long rows (vocabulary-sized K): a program takes BLOCK_R rows (usually 1) and walks K in ``BLOCK_K`` chunks,
  so no tile is larger than BLOCK_K and nothing spills whatever K is. Pass 1 reads every member row once for
  its log-sum-exp (online max/sum with rescaling); pass 2 walks the chunks once more and, per chunk, sums the
  N members in registers, so the output is written exactly once. That is 2 reads of x plus one write of the
  output; the second read hits L2 only when N rows of K fit there per resident program.
- split-K (long rows, too few row blocks to fill the GPU: 8 rows of K=128256): the grid is (row blocks,
  column splits). Pass 1 stores each split's (max, log sum exp) per member row in small [N, R, S] buffers;
  pass 2, on the same grid, combines a row's partials (every program does it: S is at most a few hundred)
  and finishes its own split. ensemble_stats adds a third, per-row launch that combines the splits'
  entropy sums and (confidence, prediction).

Index math is 64-bit: row and column offsets are int64 and members are reached by advancing a pointer.
Under tracing, launches go through ``torch.library.wrap_triton`` when torch has it, so that the op layer can
wrap the launchers in ``torch.library.triton_op`` and ``torch.compile`` traces them (see ``_launch``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fused_ensemble.ops.reductions import MEMBER_INDEPENDENT_GRAD, aux_shape, check_kernel_reduction

MAX_SHORT_ROW_BLOCK = 8192
"""Largest power-of-two row width that one tile holds; wider rows take the long-row (chunked) kernels."""

SHORT_TILE_ELEMENTS = 1024
"""Target tile size (rows x padded classes) of the short-row kernels (best on an H100 for K=10 and K=1000)."""

LONG_ROW_BLOCK = 8192
"""Chunk width of the long-row kernels (with 16 warps: faster than 4096 on an H100 at K=128256)."""

MEAN_BLOCK_K = 2048
"""Widest column block of the "mean" kernel (its 2D grid needs no whole row per program)."""

SPLIT_PROGRAMS_PER_SM = 4
"""Long rows are split (split-K) until about this many programs per SM run; not when the row blocks alone
give half of that."""

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_wrap_triton = getattr(torch.library, "wrap_triton", None)  # torch >= 2.6


def _launch(kernel, grid, x, *args, **meta):
    """Launches ``kernel[grid](x, *args, **meta)``.

    Under dispatcher-level tracing (make_fx, AOTAutograd inside torch.compile, a ``triton_op``'s fake/functional
    pass) the tensors are subclasses and the launch must go through ``wrap_triton`` to be recorded. On plain
    tensors it launches directly: wrap_triton's eager path costs a large host overhead per launch, and
    Dynamo traces a direct launch itself. The interpreter's kernels (TRITON_INTERPRET=1) are never wrapped.
    """
    if _wrap_triton is not None and _COMPILED_KERNELS and type(x) is not torch.Tensor:
        kernel = _wrap_triton(kernel)
    kernel[grid](x, *args, **meta)


# ----------------------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _tile_offsets(rows, cols, R, K, stride_r, stride_k):
    """Element offsets and in-bounds mask of a [rows, cols] tile (rows, cols are int64 vectors)."""
    mask = (rows[:, None] < R) & (cols[None, :] < K)
    offs = rows[:, None] * stride_r + cols[None, :] * stride_k
    return offs, mask


@triton.jit
def _online_lse_update(m_run, s_run, x):
    """One chunk of an online log-sum-exp over axis 1: returns the new running (max, sum of exp(x - max)).

    A running max of -inf (nothing finite seen yet) must not turn into NaN through -inf - -inf, so the
    rescale factor and the shift are guarded; a row that is -inf everywhere keeps (max, sum) = (-inf, 0).
    """
    m_new = tl.maximum(m_run, tl.max(x, axis=1))
    alpha = tl.where(m_run == m_new, 1.0, tl.exp(m_run - m_new))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    s_new = s_run * alpha + tl.sum(tl.exp(x - shift[:, None]), axis=1)
    return m_new, s_new


@triton.jit
def _column_split(SPLIT_COLS, K):
    """This program's column split (grid axis 1) and its columns [k_start, k_end)."""
    split = tl.program_id(1)
    k_start = split.to(tl.int64) * SPLIT_COLS
    return split, k_start, tl.minimum(k_start + SPLIT_COLS, K)


@triton.jit
def _combine_lse_partials(max_ptr, log_sum_ptr, rows, R, S, BLOCK_S: tl.constexpr):
    """Combines the split-K partials of rows (row r's S partials at r * S + s: max and log sum exp(x - max)
    of one column split) into the row's (max, log sum exp(x - max)). Splits with nothing finite (max -inf)
    weigh 0, so an all -inf row gives (-inf, -inf) like the unsplit pass."""
    splits = tl.arange(0, BLOCK_S)
    offs = rows[:, None] * S + splits[None, :]
    mask = (rows[:, None] < R) & (splits[None, :] < S)
    m = tl.load(max_ptr + offs, mask=mask, other=float("-inf"))
    log_s = tl.load(log_sum_ptr + offs, mask=mask, other=float("-inf"))
    m_row = tl.max(m, axis=1)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_row[:, None] + log_s))
    return m_row, tl.log(tl.sum(w, axis=1))


@triton.jit
def _member_argmax(x):
    """First index of the max over axis 1 of member logits, NaN skipped: a row with a NaN has no member prediction
    (its statistics are NaN whatever this gives), and the interpreter's argmax raises on a row of NaN only."""
    return tl.argmax(tl.where(x == x, x, float("-inf")), axis=1, tie_break_left=True)


@triton.jit
def _logaddexp(a, b):
    """log(exp(a) + exp(b)) with one exp and one log; -inf and -inf give -inf, NaN propagates."""
    top = tl.maximum(a, b)
    gap = tl.where(a == b, 0.0, -tl.abs(a - b))
    return top + tl.log(1.0 + tl.exp(gap))


@triton.jit
def _plogp(p, log_p):
    """p * log p with 0 log 0 = 0 (classes with -inf logits), like the reference's member entropy."""
    return tl.where(p > 0, p * log_p, 0.0)


@triton.jit
def _entropy_terms(probs):
    """probs * log(probs) with 0 log 0 = 0 and NaN kept (torch.special.xlogy semantics)."""
    return tl.where(probs == 0, 0.0, probs * tl.log(probs))


# ----------------------------------------------------------------------------------------------------------
# Forward: "mean" (any K; 2D grid over row blocks and class blocks)
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _mean_kernel(x_ptr, out_ptr, N, R, K, stride_n, stride_r, stride_k,
                 BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs, mask = _tile_offsets(rows, cols, R, K, stride_r, stride_k)
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    x_n = x_ptr
    for _ in range(N):
        acc += tl.load(x_n + offs, mask=mask, other=0.0).to(tl.float32)
        x_n += stride_n
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], acc / N, mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Forward: "softmax_of_mean"
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _softmax_of_mean_short_kernel(x_ptr, out_ptr, N, R, K, stride_n, stride_r, stride_k,
                                  BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_K).to(tl.int64)
    offs, mask = _tile_offsets(rows, cols, R, K, stride_r, stride_k)
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    x_n = x_ptr
    for _ in range(N):
        acc += tl.load(x_n + offs, mask=mask, other=float("-inf")).to(tl.float32)
        x_n += stride_n
    logits = acc / N
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], e / tl.sum(e, axis=1)[:, None], mask=mask)


@triton.jit
def _mean_logits_pass(x_ptr, out_ptr, rows, N, R, K, stride_n, stride_r, stride_k, k_start, k_end,
                      BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Writes the mean logits of columns [k_start, k_end) into out and returns their online (max, sum exp)."""
    m_run = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    s_run = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        offs, mask = _tile_offsets(rows, cols, R, k_end, stride_r, stride_k)
        acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
        x_n = x_ptr
        for _ in range(N):
            acc += tl.load(x_n + offs, mask=mask, other=float("-inf")).to(tl.float32)
            x_n += stride_n
        logits = acc / N
        tl.store(out_ptr + rows[:, None] * K + cols[None, :], logits, mask=mask)
        m_run, s_run = _online_lse_update(m_run, s_run, logits)
    return m_run, s_run


@triton.jit
def _softmax_normalize_pass(out_ptr, rows, R, K, k_start, k_end, m_run, s_run, BLOCK_K: tl.constexpr):
    """out = exp(out - max) / sum on columns [k_start, k_end), in place."""
    inv_s = 1.0 / s_run
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask = (rows[:, None] < R) & (cols[None, :] < k_end)
        out_ptrs = out_ptr + rows[:, None] * K + cols[None, :]
        logits = tl.load(out_ptrs, mask=mask, other=float("-inf"))
        # An all -inf row gives exp(-inf - -inf) = NaN, as torch.softmax does.
        tl.store(out_ptrs, tl.exp(logits - m_run[:, None]) * inv_s[:, None], mask=mask)


@triton.jit
def _softmax_of_mean_long_kernel(x_ptr, out_ptr, N, R, K, stride_n, stride_r, stride_k,
                                 BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    # Pass 1 writes the mean logits into out while taking their online max/sum; pass 2 normalizes in place.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_run, s_run = _mean_logits_pass(x_ptr, out_ptr, rows, N, R, K, stride_n, stride_r, stride_k, 0, K,
                                     BLOCK_R, BLOCK_K)
    _softmax_normalize_pass(out_ptr, rows, R, K, 0, K, m_run, s_run, BLOCK_K)


@triton.jit
def _softmax_of_mean_split_kernel(x_ptr, out_ptr, max_part_ptr, log_sum_part_ptr, N, R, K, stride_n, stride_r,
                                  stride_k, SPLIT_COLS, S, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    # Split-K pass 1, grid (row blocks, S): mean logits of one column split into out, and that split's
    # (max, sum exp) into the [R, S] partial buffers.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    split, k_start, k_end = _column_split(SPLIT_COLS, K)
    m_run, s_run = _mean_logits_pass(x_ptr, out_ptr, rows, N, R, K, stride_n, stride_r, stride_k, k_start,
                                     k_end, BLOCK_R, BLOCK_K)
    tl.store(max_part_ptr + rows * S + split, m_run, mask=rows < R)
    tl.store(log_sum_part_ptr + rows * S + split, tl.log(s_run), mask=rows < R)


@triton.jit
def _softmax_of_mean_split_finish_kernel(out_ptr, max_part_ptr, log_sum_part_ptr, R, K, SPLIT_COLS, S,
                                         BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr):
    # Split-K pass 2, grid (row blocks, S): every program combines the row's partials and normalizes its split.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    split, k_start, k_end = _column_split(SPLIT_COLS, K)
    m_run, log_s = _combine_lse_partials(max_part_ptr, log_sum_part_ptr, rows, R, S, BLOCK_S)
    _softmax_normalize_pass(out_ptr, rows, R, K, k_start, k_end, m_run, tl.exp(log_s), BLOCK_K)


# ----------------------------------------------------------------------------------------------------------
# Forward: "mean_probs" and "log_mean_probs" (LOG_OUTPUT), which also save each member row's max and sum of
# exp(x - max) into aux [2, N, R] (aux[0] then aux[1]: the softmax normalizer that the backward rebuilds)
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _logsumexp_add(acc, top, log_p):
    """Adds one member's log p to an online log-sum-exp over members kept as (top = running max, acc = sum of
    exp(log p - top)): one exp per element, the smaller of (top, log_p) rescaled against the larger; exact where
    the probabilities themselves underflow."""
    gap = tl.where(log_p == top, 0.0, log_p - top)
    w = tl.exp(-tl.abs(gap))
    return tl.where(gap > 0, acc * w + 1.0, acc + w), tl.maximum(top, log_p)


@triton.jit
def add_member(acc, top, log_p, p, LOG_OUTPUT: tl.constexpr):
    """Adds one member to the accumulators that ``member_mean`` finishes: its probabilities ``p`` to acc, or
    (LOG_OUTPUT) its ``log_p`` to the online log-sum-exp of ``_logsumexp_add`` (the unused one of ``p`` and
    ``log_p`` is compiled away)."""
    if LOG_OUTPUT:
        return _logsumexp_add(acc, top, log_p)
    return acc + p, top


@triton.jit
def member_mean(acc, top, log_n, N, LOG_OUTPUT: tl.constexpr):
    """The mean over members from the accumulators: acc / N, or (LOG_OUTPUT) log of it from the online
    log-sum-exp kept by ``_logsumexp_add``."""
    if LOG_OUTPUT:
        return top + tl.log(acc) - log_n
    return acc / N


@triton.jit
def _member_probs_short_kernel(x_ptr, out_ptr, aux_ptr, N, R, K, stride_n, stride_r, stride_k, log_n,
                               LOG_OUTPUT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_K).to(tl.int64)
    offs, mask = _tile_offsets(rows, cols, R, K, stride_r, stride_k)
    row_ok = rows < R
    # mean_probs: acc is the sum of member probabilities. log_mean_probs: an online log-sum-exp over members
    # of log p_n per class (top = running max, acc = sum of exp(log p - top)), exact where p underflows.
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    top = tl.full([BLOCK_R, BLOCK_K], float("-inf"), dtype=tl.float32)
    x_n = x_ptr
    aux_n = aux_ptr
    for _ in range(N):
        x = tl.load(x_n + offs, mask=mask, other=float("-inf")).to(tl.float32)
        m = tl.max(x, axis=1)
        shifted = x - m[:, None]  # exact for large logits, unlike x - lse
        e = tl.exp(shifted)
        s = tl.sum(e, axis=1)
        log_s = tl.log(s)
        tl.store(aux_n + rows, m, mask=row_ok)
        tl.store(aux_n + N * R + rows, s, mask=row_ok)
        acc, top = add_member(acc, top, shifted - log_s[:, None], e * (1.0 / s)[:, None], LOG_OUTPUT)
        x_n += stride_n
        aux_n += R
    result = member_mean(acc, top, log_n, N, LOG_OUTPUT)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], result, mask=mask)


@triton.jit
def _long_rows_pass1(x_ptr, rows, N, R, K, stride_n, stride_r, stride_k, k_start, k_end,
                     WITH_ARGMAX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """Pass 1 of the long-row kernels over columns [k_start, k_end): for every member row, max,
    log sum exp(x - max) and (WITH_ARGMAX) the first index of the max, as [BLOCK_R, BLOCK_N] register tensors
    (column n = member n)."""
    members = tl.arange(0, BLOCK_N)[None, :]
    row_max = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    row_log_sum = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    row_argmax = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.int32)
    x_n = x_ptr
    for n in range(N):
        m_run = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
        s_run = tl.zeros([BLOCK_R], dtype=tl.float32)
        best_idx = tl.zeros([BLOCK_R], dtype=tl.int32)
        for k0 in range(k_start, k_end, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            offs, mask = _tile_offsets(rows, cols, R, k_end, stride_r, stride_k)
            x = tl.load(x_n + offs, mask=mask, other=float("-inf")).to(tl.float32)
            if WITH_ARGMAX:
                # First index on ties: only a strictly larger chunk maximum replaces the running one.
                better = tl.max(x, axis=1) > m_run
                best_idx = tl.where(better, (_member_argmax(x) + k0).to(tl.int32), best_idx)
            m_run, s_run = _online_lse_update(m_run, s_run, x)
        row_max = tl.where(members == n, m_run[:, None], row_max)
        row_log_sum = tl.where(members == n, tl.log(s_run)[:, None], row_log_sum)
        row_argmax = tl.where(members == n, best_idx[:, None], row_argmax)
        x_n += stride_n
    return row_max, row_log_sum, row_argmax


@triton.jit
def _store_member_softmax(aux_ptr, rows, R, N, row_max, row_log_sum, BLOCK_N: tl.constexpr):
    """Stores the member row maxima (aux[0]) and sums of exp(x - max) (aux[1], from their logs) of
    [BLOCK_R, BLOCK_N] into aux ([2, N, R])."""
    members = tl.arange(0, BLOCK_N)[None, :].to(tl.int64)
    offs = members * R + rows[:, None]
    mask = (rows[:, None] < R) & (members < N)
    tl.store(aux_ptr + offs, row_max, mask=mask)
    tl.store(aux_ptr + N * R + offs, tl.exp(row_log_sum), mask=mask)


@triton.jit
def _store_member_partials(max_part_ptr, log_sum_part_ptr, argmax_part_ptr, rows, split, R, S, N, row_max,
                           row_log_sum, row_argmax, WITH_ARGMAX: tl.constexpr, BLOCK_N: tl.constexpr):
    """Stores one column split's pass-1 results into the [N, R, S] partial buffers."""
    members = tl.arange(0, BLOCK_N)[None, :].to(tl.int64)
    offs = (members * R + rows[:, None]) * S + split
    mask = (rows[:, None] < R) & (members < N)
    tl.store(max_part_ptr + offs, row_max, mask=mask)
    tl.store(log_sum_part_ptr + offs, row_log_sum, mask=mask)
    if WITH_ARGMAX:
        tl.store(argmax_part_ptr + offs, row_argmax, mask=mask)


@triton.jit
def _combine_member_partials(max_part_ptr, log_sum_part_ptr, argmax_part_ptr, rows, N, R, S,
                             WITH_ARGMAX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_S: tl.constexpr):
    """The [BLOCK_R, BLOCK_N] pass-1 results of whole rows from the [N, R, S] split partials. The argmax is
    the first split's reaching the row max: splits are in column order, so that is the first index."""
    members = tl.arange(0, BLOCK_N)[None, :]
    splits = tl.arange(0, BLOCK_S)[None, :]
    row_max = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    row_log_sum = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    row_argmax = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.int32)
    for n in range(N):
        m, log_s = _combine_lse_partials(max_part_ptr + n * R * S, log_sum_part_ptr + n * R * S, rows, R, S,
                                         BLOCK_S)
        if WITH_ARGMAX:
            offs = rows[:, None] * S + splits
            mask = (rows[:, None] < R) & (splits < S)
            split_max = tl.load(max_part_ptr + n * R * S + offs, mask=mask, other=float("-inf"))
            split_idx = tl.load(argmax_part_ptr + n * R * S + offs, mask=mask, other=0)
            first = _member_argmax(split_max)
            idx = tl.sum(tl.where(splits == first[:, None], split_idx, 0), axis=1)
            row_argmax = tl.where(members == n, idx[:, None], row_argmax)
        row_max = tl.where(members == n, m[:, None], row_max)
        row_log_sum = tl.where(members == n, log_s[:, None], row_log_sum)
    return row_max, row_log_sum, row_argmax


@triton.jit
def _member_log_probs(x_n, offs, mask, row_max, row_log_sum, n, BLOCK_N: tl.constexpr):
    """log softmax of member n on one chunk, from the pass-1 statistics (x - max first: exact for big logits)."""
    selected = tl.arange(0, BLOCK_N)[None, :] == n
    m = tl.sum(tl.where(selected, row_max, 0.0), axis=1)
    log_s = tl.sum(tl.where(selected, row_log_sum, 0.0), axis=1)
    x = tl.load(x_n + offs, mask=mask, other=float("-inf")).to(tl.float32)
    return (x - m[:, None]) - log_s[:, None]


@triton.jit
def _member_probs_pass2(x_ptr, out_ptr, rows, N, R, K, stride_n, stride_r, stride_k, k_start, k_end, log_n,
                        row_max, row_log_sum, LOG_OUTPUT: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Pass 2 over columns [k_start, k_end): per chunk, the N members summed in registers and written once."""
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        offs, mask = _tile_offsets(rows, cols, R, k_end, stride_r, stride_k)
        acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
        top = tl.full([BLOCK_R, BLOCK_K], float("-inf"), dtype=tl.float32)
        x_n = x_ptr
        for n in range(N):
            log_p = _member_log_probs(x_n, offs, mask, row_max, row_log_sum, n, BLOCK_N)
            acc, top = add_member(acc, top, log_p, tl.exp(log_p), LOG_OUTPUT)
            x_n += stride_n
        result = member_mean(acc, top, log_n, N, LOG_OUTPUT)
        tl.store(out_ptr + rows[:, None] * K + cols[None, :], result, mask=mask)


@triton.jit
def _member_probs_long_kernel(x_ptr, out_ptr, aux_ptr, N, R, K, stride_n, stride_r, stride_k, log_n,
                              LOG_OUTPUT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                              BLOCK_N: tl.constexpr):
    # Pass 1 reads every member row for its max and sum of exp; pass 2 walks the chunks once, summing the members in
    # registers, so the output is written once (no read-modify-write of the output row per member).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_max, row_log_sum, _ = _long_rows_pass1(x_ptr, rows, N, R, K, stride_n, stride_r, stride_k, 0, K,
                                               False, BLOCK_R, BLOCK_K, BLOCK_N)
    _store_member_softmax(aux_ptr, rows, R, N, row_max, row_log_sum, BLOCK_N)
    _member_probs_pass2(x_ptr, out_ptr, rows, N, R, K, stride_n, stride_r, stride_k, 0, K, log_n, row_max,
                        row_log_sum, LOG_OUTPUT, BLOCK_R, BLOCK_K, BLOCK_N)


@triton.jit
def _member_partials_kernel(x_ptr, max_part_ptr, log_sum_part_ptr, argmax_part_ptr, N, R, K, stride_n,
                            stride_r, stride_k, SPLIT_COLS, S, WITH_ARGMAX: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    # Split-K pass 1, grid (row blocks, S): each program takes one column split of its rows for every member.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    split, k_start, k_end = _column_split(SPLIT_COLS, K)
    row_max, row_log_sum, row_argmax = _long_rows_pass1(x_ptr, rows, N, R, K, stride_n, stride_r, stride_k,
                                                        k_start, k_end, WITH_ARGMAX, BLOCK_R, BLOCK_K, BLOCK_N)
    _store_member_partials(max_part_ptr, log_sum_part_ptr, argmax_part_ptr, rows, split, R, S, N, row_max,
                           row_log_sum, row_argmax, WITH_ARGMAX, BLOCK_N)


@triton.jit
def _member_probs_split_kernel(x_ptr, out_ptr, aux_ptr, max_part_ptr, log_sum_part_ptr, N, R, K, stride_n,
                               stride_r, stride_k, log_n, SPLIT_COLS, S, LOG_OUTPUT: tl.constexpr,
                               BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_S: tl.constexpr):
    # Split-K pass 2, grid (row blocks, S): combine the member partials, then pass 2 on this program's split.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    split, k_start, k_end = _column_split(SPLIT_COLS, K)
    row_max, row_log_sum, _ = _combine_member_partials(max_part_ptr, log_sum_part_ptr, max_part_ptr, rows, N,
                                                       R, S, False, BLOCK_R, BLOCK_N, BLOCK_S)
    if split == 0:
        _store_member_softmax(aux_ptr, rows, R, N, row_max, row_log_sum, BLOCK_N)
    _member_probs_pass2(x_ptr, out_ptr, rows, N, R, K, stride_n, stride_r, stride_k, k_start, k_end, log_n,
                        row_max, row_log_sum, LOG_OUTPUT, BLOCK_R, BLOCK_K, BLOCK_N)


# ----------------------------------------------------------------------------------------------------------
# Forward: ensemble statistics
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _store_stats(rows, R, N, member_argmax, probs_entropy_sum, expected_entropy_sum, confidence, has_nan,
                 prediction, entropy_ptr, expected_entropy_ptr, mutual_info_ptr, confidence_ptr, prediction_ptr,
                 disagreement_ptr, BLOCK_N: tl.constexpr):
    # has_nan: some member of the row has no softmax (a NaN or +inf logit, or -inf everywhere), which makes every
    # probability of the row NaN: then every statistic is NaN (and prediction 0, the probs' argmax skipping NaN
    # found nothing), as the reference says.
    row_ok = rows < R
    entropy = tl.where(has_nan, float("nan"), -probs_entropy_sum)
    expected_entropy = tl.where(has_nan, float("nan"), expected_entropy_sum / N)
    mutual_info = entropy - expected_entropy
    mutual_info = tl.where(mutual_info < 0, 0.0, mutual_info)  # rounding below 0; NaN stays NaN
    confidence = tl.where(has_nan, float("nan"), confidence)  # also: tl.max may drop NaN on the GPU
    members = tl.arange(0, BLOCK_N)[None, :]
    disagree = (member_argmax != prediction[:, None]) & (members < N)
    disagreement = tl.where(has_nan, float("nan"), tl.sum(disagree.to(tl.float32), axis=1) / N)
    tl.store(entropy_ptr + rows, entropy, mask=row_ok)
    tl.store(expected_entropy_ptr + rows, expected_entropy, mask=row_ok)
    tl.store(mutual_info_ptr + rows, mutual_info, mask=row_ok)
    tl.store(confidence_ptr + rows, confidence, mask=row_ok)
    tl.store(prediction_ptr + rows, prediction.to(tl.int64), mask=row_ok)
    tl.store(disagreement_ptr + rows, disagreement, mask=row_ok)


@triton.jit
def _stats_short_kernel(x_ptr, probs_ptr, entropy_ptr, expected_entropy_ptr, mutual_info_ptr, confidence_ptr,
                        prediction_ptr, disagreement_ptr, N, R, K, stride_n, stride_r, stride_k,
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_K).to(tl.int64)
    offs, mask = _tile_offsets(rows, cols, R, K, stride_r, stride_k)
    members = tl.arange(0, BLOCK_N)[None, :]
    probs_sum = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    expected_entropy_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
    member_argmax = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.int32)
    x_n = x_ptr
    for n in range(N):
        x = tl.load(x_n + offs, mask=mask, other=float("-inf")).to(tl.float32)
        m = tl.max(x, axis=1)
        shifted = x - m[:, None]
        e = tl.exp(shifted)
        s = tl.sum(e, axis=1)
        p = e * (1.0 / s)[:, None]
        log_p = shifted - tl.log(s)[:, None]
        expected_entropy_sum -= tl.sum(_plogp(p, log_p), axis=1)
        probs_sum += p
        member_argmax = tl.where(members == n, _member_argmax(x)[:, None], member_argmax)
        x_n += stride_n
    probs = probs_sum / N
    tl.store(probs_ptr + rows[:, None] * K + cols[None, :], probs, mask=mask)
    probs_or_floor = tl.where(mask & (probs == probs), probs, -1.0)  # padding and NaN never win the max
    confidence = tl.max(probs_or_floor, axis=1)
    prediction = tl.argmax(probs_or_floor, axis=1, tie_break_left=True)
    has_nan = tl.sum((probs != probs).to(tl.int32), axis=1) > 0
    _store_stats(rows, R, N, member_argmax, tl.sum(_entropy_terms(probs), axis=1), expected_entropy_sum,
                 confidence, has_nan, prediction, entropy_ptr, expected_entropy_ptr, mutual_info_ptr,
                 confidence_ptr, prediction_ptr, disagreement_ptr, BLOCK_N)


@triton.jit
def _stats_pass2(x_ptr, probs_ptr, rows, N, R, K, stride_n, stride_r, stride_k, k_start, k_end, row_max,
                 row_log_sum, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Pass 2 of the long-row stats over columns [k_start, k_end): writes the probs chunks and returns the
    sums of member entropies and of probs * log probs, the NaN count, and the max of probs with its first
    index (-1 and 0 when the range holds no number)."""
    expected_entropy_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
    entropy_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
    confidence = tl.full([BLOCK_R], -1.0, dtype=tl.float32)
    prediction = tl.zeros([BLOCK_R], dtype=tl.int32)
    nan_count = tl.zeros([BLOCK_R], dtype=tl.int32)
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        offs, mask = _tile_offsets(rows, cols, R, k_end, stride_r, stride_k)
        probs_sum = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
        x_n = x_ptr
        for n in range(N):
            log_p = _member_log_probs(x_n, offs, mask, row_max, row_log_sum, n, BLOCK_N)
            p = tl.exp(log_p)
            expected_entropy_sum -= tl.sum(_plogp(p, log_p), axis=1)
            probs_sum += p
            x_n += stride_n
        probs = probs_sum / N
        tl.store(probs_ptr + rows[:, None] * K + cols[None, :], probs, mask=mask)
        entropy_sum += tl.sum(_entropy_terms(probs), axis=1)
        nan_count += tl.sum((probs != probs).to(tl.int32), axis=1)
        probs_or_floor = tl.where(mask & (probs == probs), probs, -1.0)
        chunk_best = tl.max(probs_or_floor, axis=1)
        chunk_idx = (tl.argmax(probs_or_floor, axis=1, tie_break_left=True) + k0).to(tl.int32)
        better = chunk_best > confidence
        prediction = tl.where(better, chunk_idx, prediction)
        confidence = tl.where(better, chunk_best, confidence)
    return expected_entropy_sum, entropy_sum, nan_count, confidence, prediction


@triton.jit
def _stats_long_kernel(x_ptr, probs_ptr, entropy_ptr, expected_entropy_ptr, mutual_info_ptr, confidence_ptr,
                       prediction_ptr, disagreement_ptr, N, R, K, stride_n, stride_r, stride_k,
                       BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_max, row_log_sum, member_argmax = _long_rows_pass1(x_ptr, rows, N, R, K, stride_n, stride_r, stride_k,
                                                           0, K, True, BLOCK_R, BLOCK_K, BLOCK_N)
    expected_entropy_sum, entropy_sum, nan_count, confidence, prediction = _stats_pass2(
        x_ptr, probs_ptr, rows, N, R, K, stride_n, stride_r, stride_k, 0, K, row_max, row_log_sum,
        BLOCK_R, BLOCK_K, BLOCK_N)
    _store_stats(rows, R, N, member_argmax, entropy_sum, expected_entropy_sum, confidence, nan_count > 0,
                 prediction, entropy_ptr, expected_entropy_ptr, mutual_info_ptr, confidence_ptr, prediction_ptr,
                 disagreement_ptr, BLOCK_N)


@triton.jit
def _stats_split_kernel(x_ptr, probs_ptr, max_part_ptr, log_sum_part_ptr, stat_part_ptr, prediction_part_ptr,
                        N, R, K, stride_n, stride_r, stride_k, SPLIT_COLS, S,
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_S: tl.constexpr):
    # Split-K pass 2, grid (row blocks, S): combine the member partials, pass 2 on this split, and store the
    # split's partial statistics: stat_part is [4, R, S] (expected entropy sum, entropy sum, NaN count,
    # confidence), prediction_part [R, S].
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    split, k_start, k_end = _column_split(SPLIT_COLS, K)
    row_max, row_log_sum, _ = _combine_member_partials(max_part_ptr, log_sum_part_ptr, max_part_ptr, rows, N,
                                                       R, S, False, BLOCK_R, BLOCK_N, BLOCK_S)
    expected_entropy_sum, entropy_sum, nan_count, confidence, prediction = _stats_pass2(
        x_ptr, probs_ptr, rows, N, R, K, stride_n, stride_r, stride_k, k_start, k_end, row_max, row_log_sum,
        BLOCK_R, BLOCK_K, BLOCK_N)
    offs = rows * S + split
    row_ok = rows < R
    tl.store(stat_part_ptr + offs, expected_entropy_sum, mask=row_ok)
    tl.store(stat_part_ptr + R * S + offs, entropy_sum, mask=row_ok)
    tl.store(stat_part_ptr + 2 * R * S + offs, nan_count.to(tl.float32), mask=row_ok)
    tl.store(stat_part_ptr + 3 * R * S + offs, confidence, mask=row_ok)
    tl.store(prediction_part_ptr + offs, prediction, mask=row_ok)


@triton.jit
def _stats_split_finish_kernel(max_part_ptr, log_sum_part_ptr, argmax_part_ptr, stat_part_ptr,
                               prediction_part_ptr, entropy_ptr, expected_entropy_ptr, mutual_info_ptr,
                               confidence_ptr, prediction_ptr, disagreement_ptr, N, R, S,
                               BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    # Grid (row blocks,): sums the splits' statistics; the first split holding the largest probability gives
    # the prediction (first index on ties, as splits are in column order).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    splits = tl.arange(0, BLOCK_S)[None, :]
    offs = rows[:, None] * S + splits
    mask = (rows[:, None] < R) & (splits < S)
    expected_entropy_sum = tl.sum(tl.load(stat_part_ptr + offs, mask=mask, other=0.0), axis=1)
    entropy_sum = tl.sum(tl.load(stat_part_ptr + R * S + offs, mask=mask, other=0.0), axis=1)
    nan_count = tl.sum(tl.load(stat_part_ptr + 2 * R * S + offs, mask=mask, other=0.0), axis=1)
    split_confidence = tl.load(stat_part_ptr + 3 * R * S + offs, mask=mask, other=-1.0)
    split_prediction = tl.load(prediction_part_ptr + offs, mask=mask, other=0)
    best = tl.argmax(split_confidence, axis=1, tie_break_left=True)
    confidence = tl.max(split_confidence, axis=1)
    prediction = tl.sum(tl.where(splits == best[:, None], split_prediction, 0), axis=1)
    _, _, member_argmax = _combine_member_partials(max_part_ptr, log_sum_part_ptr, argmax_part_ptr, rows, N, R,
                                                   S, True, BLOCK_R, BLOCK_N, BLOCK_S)
    _store_stats(rows, R, N, member_argmax, entropy_sum, expected_entropy_sum, confidence, nan_count > 0,
                 prediction, entropy_ptr, expected_entropy_ptr, mutual_info_ptr, confidence_ptr, prediction_ptr,
                 disagreement_ptr, BLOCK_N)


# ----------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _scale_kernel(src_ptr, dst_ptr, numel, scale, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=mask, other=0.0) * scale, mask=mask)


@triton.jit
def _softmax_of_mean_backward_kernel(grad_out_ptr, out_ptr, grad_ptr, N, R, K,
                                     ONE_BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    # grad = out * (g - sum_k g * out) / N; grad_out, out and grad are contiguous [R, K].
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK_K).to(tl.int64)
        offs, mask = _tile_offsets(rows, cols, R, K, K, 1)
        g = tl.load(grad_out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        o = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dot = tl.sum(g * o, axis=1)
        tl.store(grad_ptr + offs, o * (g - dot[:, None]) / N, mask=mask)
    else:
        dot = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            offs, mask = _tile_offsets(rows, cols, R, K, K, 1)
            g = tl.load(grad_out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            o = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dot += tl.sum(g * o, axis=1)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            offs, mask = _tile_offsets(rows, cols, R, K, K, 1)
            g = tl.load(grad_out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            o = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(grad_ptr + offs, o * (g - dot[:, None]) / N, mask=mask)


@triton.jit
def _member_grad_terms(x_n, grad_out_ptr, out_ptr, row_max, row_log_sum, rows, cols, R, K, stride_r, stride_k,
                       inv_n, log_n, LOG_OUTPUT: tl.constexpr):
    """Member probabilities s and the term h of grad = h - s * sum_k h, for one tile of member n.

    log s = (x - max) - log sum exp(x - max), from the saved row max and sum: exact for logits of any magnitude.
    mean_probs: h = g s / N. log_mean_probs: h = g s / (N p) = g exp(log s - out - log N), the ratio taken in log
    space, so that it stays right where s itself underflows (s = 1e-48 next to a mean p = 2e-48); 0 only where it
    is undefined: an -inf logit (s = 0) or a class whose mean probability is 0 (out = -inf).
    """
    offs, mask = _tile_offsets(rows, cols, R, K, stride_r, stride_k)
    x = tl.load(x_n + offs, mask=mask, other=float("-inf")).to(tl.float32)
    out_offs = rows[:, None] * K + cols[None, :]
    g = tl.load(grad_out_ptr + out_offs, mask=mask, other=0.0).to(tl.float32)
    log_s = (x - row_max[:, None]) - row_log_sum[:, None]
    s = tl.exp(log_s)
    if LOG_OUTPUT:
        o = tl.load(out_ptr + out_offs, mask=mask, other=0.0).to(tl.float32)
        undefined = (x == float("-inf")) | (o == float("-inf"))
        h = tl.where(undefined, 0.0, g * tl.exp(log_s - o - log_n))
    else:
        h = g * s * inv_n
    return s, h, mask


@triton.jit
def _member_probs_backward_kernel(x_ptr, grad_out_ptr, out_ptr, aux_ptr, grad_ptr, N, R, K,
                                  stride_n, stride_r, stride_k, log_n,
                                  LOG_OUTPUT: tl.constexpr, ONE_BLOCK: tl.constexpr,
                                  BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    # Grid: (row blocks, members). grad is a contiguous [N, R, K] tensor in x's dtype.
    n = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    x_n = x_ptr + n * stride_n
    grad_n = grad_ptr + n * R * K
    row_max = tl.load(aux_ptr + n * R + rows, mask=rows < R, other=0.0)
    row_log_sum = tl.log(tl.load(aux_ptr + (N + n) * R + rows, mask=rows < R, other=1.0))
    inv_n = 1.0 / N
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK_K).to(tl.int64)
        s, h, mask = _member_grad_terms(x_n, grad_out_ptr, out_ptr, row_max, row_log_sum, rows, cols, R, K,
                                        stride_r, stride_k, inv_n, log_n, LOG_OUTPUT)
        grad = h - s * tl.sum(h, axis=1)[:, None]
        tl.store(grad_n + rows[:, None] * K + cols[None, :], grad, mask=mask)
    else:
        h_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            s, h, mask = _member_grad_terms(x_n, grad_out_ptr, out_ptr, row_max, row_log_sum, rows, cols, R, K,
                                            stride_r, stride_k, inv_n, log_n, LOG_OUTPUT)
            h_sum += tl.sum(h, axis=1)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            s, h, mask = _member_grad_terms(x_n, grad_out_ptr, out_ptr, row_max, row_log_sum, rows, cols, R, K,
                                            stride_r, stride_k, inv_n, log_n, LOG_OUTPUT)
            tl.store(grad_n + rows[:, None] * K + cols[None, :], h - s * h_sum[:, None], mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


_COMPILED_KERNELS = isinstance(_mean_kernel, triton.runtime.JITFunction)  # False under TRITON_INTERPRET=1


class _Plan:
    """Block sizes of one launch: BLOCK_R rows x BLOCK_K classes per tile; one_block when a tile holds a row."""

    def __init__(self, R: int, K: int, block_r: int | None, block_k: int | None, num_warps: int | None):
        padded_k = triton.next_power_of_2(K)
        if block_k is None:
            block_k = padded_k if padded_k <= MAX_SHORT_ROW_BLOCK else LONG_ROW_BLOCK
        _check_power_of_two("block_k", block_k)
        self.one_block = block_k >= K
        self.block_k = min(block_k, padded_k)
        if block_r is None:
            block_r = max(1, SHORT_TILE_ELEMENTS // self.block_k) if self.one_block else 1
            block_r = min(block_r, triton.next_power_of_2(max(R, 1)))
        _check_power_of_two("block_r", block_r)
        self.block_r = block_r
        # About 16 fp32 values per thread and tensor: 4 warps for 2048-element tiles, up to 16 warps.
        self.num_warps = num_warps or max(4, min(16, block_r * self.block_k // 512))
        self.row_blocks = triton.cdiv(R, block_r)
        self.splits = 1
        self.split_cols = K

    def split_columns(self, x: torch.Tensor, splits: int | None) -> None:
        """Splits long rows into column ranges handled by separate programs (split-K) when there are too few
        row blocks to fill the GPU: few rows of a vocabulary-sized K (e.g. 8 rows of 128256 classes) would
        otherwise run on 8 of 132 SMs. ``splits`` forces a count (tests); the split width is a whole number of
        chunks, so the actual count can be lower."""
        if self.one_block:
            return
        chunks = triton.cdiv(self.split_cols, self.block_k)
        if splits is None:
            wanted_programs = SPLIT_PROGRAMS_PER_SM * _multiprocessors(x.device)
            splits = 1 if self.row_blocks >= wanted_programs // 2 else triton.cdiv(wanted_programs,
                                                                                     self.row_blocks)
        elif splits < 1:
            raise ValueError(f"splits must be >= 1, got {splits}")
        chunks_per_split = triton.cdiv(chunks, min(splits, chunks))
        self.split_cols = chunks_per_split * self.block_k
        self.splits = triton.cdiv(chunks, chunks_per_split)


def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter on CPU: behave as on an H100, so CPU tests take the same paths


def _check_power_of_two(name: str, value: int) -> None:
    if value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two, got {value}")


def _check_logits(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x must have shape [N, R, K] (members, rows, classes), got shape {tuple(x.shape)}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16 for the Triton kernels, got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError("x has no members: x.shape[0] == 0")
    if x.shape[2] == 0:
        raise ValueError("x has no classes: x.shape[2] == 0")


def reduce_forward(x: torch.Tensor, reduction: str, *, block_r: int | None = None, block_k: int | None = None,
                   num_warps: int | None = None, splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduces logits ``x`` of shape ``[N, R, K]`` (any strides) over the member dim 0.

    Returns ``(out, aux)``: ``out`` is a contiguous float32 ``[R, K]`` tensor (the reduction of
    ``fused_ensemble.ops.reference.reduce_reference``); ``aux`` is saved for the backward pass: for
    ``"mean_probs"`` and ``"log_mean_probs"`` the float32 ``[2, N, R]`` max (``aux[0]``) and sum of ``exp(x - max)``
    (``aux[1]``) of every member row, otherwise an empty ``(0,)`` float32 tensor (``reductions.aux_shape``).
    ``block_r`` / ``block_k`` / ``num_warps`` override the heuristic tile (powers of two; ``block_k < K`` selects
    the long-row kernels) and ``splits`` the long rows' split-K count, for tests and tuning.
    """
    check_kernel_reduction(reduction)
    _check_logits(x)
    N, R, K = x.shape
    out = torch.empty((R, K), dtype=torch.float32, device=x.device)
    aux = torch.empty(aux_shape(reduction, N, R), dtype=torch.float32, device=x.device)
    if R == 0:
        return out, aux
    if reduction == "mean" and block_k is None:
        # "mean" needs no whole row per program: narrower column blocks give a few rows of long K enough
        # programs (an H100 read 0.89 of eager's bandwidth for 33 rows of 32000 with one 8192-wide block per
        # program, 132 programs in all).
        block_k = min(triton.next_power_of_2(K), MEAN_BLOCK_K)
    plan = _Plan(R, K, block_r, block_k, num_warps)
    common = (N, R, K, *x.stride())
    meta = dict(BLOCK_R=plan.block_r, BLOCK_K=plan.block_k, num_warps=plan.num_warps)
    if reduction == "mean":  # a 2D grid over row and class blocks fills the GPU by itself
        _launch(_mean_kernel, (plan.row_blocks, triton.cdiv(K, plan.block_k)), x, out, *common, **meta)
        return out, aux
    plan.split_columns(x, splits)
    if plan.splits > 1:
        _reduce_forward_split(x, reduction, out, aux, plan, common, meta)
    elif reduction == "softmax_of_mean":
        kernel = _softmax_of_mean_short_kernel if plan.one_block else _softmax_of_mean_long_kernel
        _launch(kernel, (plan.row_blocks,), x, out, *common, **meta)
    else:
        kernel = _member_probs_short_kernel if plan.one_block else _member_probs_long_kernel
        if not plan.one_block:
            meta["BLOCK_N"] = triton.next_power_of_2(N)
        _launch(kernel, (plan.row_blocks,), x, out, aux, *common, math.log(N),
                LOG_OUTPUT=reduction == "log_mean_probs", **meta)
    return out, aux


def _split_partials(x: torch.Tensor, plan: _Plan, members: int, with_argmax: bool = False):
    """Float32 [members, R, S] (max, log sum exp) partial buffers, plus an int32 argmax one when asked."""
    shape = (members, x.shape[1], plan.splits)
    parts = [torch.empty(shape, dtype=torch.float32, device=x.device) for _ in range(2)]
    if with_argmax:
        parts.append(torch.empty(shape, dtype=torch.int32, device=x.device))
    return parts


def _reduce_forward_split(x, reduction, out, aux, plan, common, meta) -> None:
    """Split-K launches: pass 1 writes per-split partial log-sum-exps, pass 2 combines them and finishes each
    split. Both passes run on the (row blocks, splits) grid."""
    grid = (plan.row_blocks, plan.splits)
    split_args = (plan.split_cols, plan.splits)
    block_s = triton.next_power_of_2(plan.splits)
    if reduction == "softmax_of_mean":
        max_part, log_sum_part = _split_partials(x, plan, 1)
        _launch(_softmax_of_mean_split_kernel, grid, x, out, max_part, log_sum_part, *common, *split_args,
                **meta)
        _launch(_softmax_of_mean_split_finish_kernel, grid, out, max_part, log_sum_part, x.shape[1], x.shape[2],
                *split_args, BLOCK_S=block_s, **meta)
        return
    meta = dict(meta, BLOCK_N=triton.next_power_of_2(x.shape[0]))
    max_part, log_sum_part = _split_partials(x, plan, x.shape[0])
    _launch(_member_partials_kernel, grid, x, max_part, log_sum_part, max_part, *common, *split_args,
            WITH_ARGMAX=False, **meta)
    _launch(_member_probs_split_kernel, grid, x, out, aux, max_part, log_sum_part, *common,
            math.log(x.shape[0]), *split_args, LOG_OUTPUT=reduction == "log_mean_probs", BLOCK_S=block_s, **meta)


def reduce_backward(grad_out: torch.Tensor, x: torch.Tensor, out: torch.Tensor, aux: torch.Tensor,
                    reduction: str, *, block_r: int | None = None, block_k: int | None = None,
                    num_warps: int | None = None) -> torch.Tensor:
    """Gradient of ``reduce_forward(x, reduction)`` given ``grad_out`` (contiguous ``[R, K]``, out's dtype).

    ``"mean"`` and ``"softmax_of_mean"`` return the float32 ``[R, K]`` gradient shared by every member
    (``grad_out / N`` and ``out * (grad_out - sum_k grad_out * out) / N``); ``"mean_probs"`` and
    ``"log_mean_probs"`` return a contiguous ``[N, R, K]`` gradient in x's dtype, computed from the saved
    ``aux`` (member row maxima and sums of exp) and, for ``"log_mean_probs"``, ``out``.
    """
    check_kernel_reduction(reduction)
    _check_logits(x)
    N, R, K = x.shape
    if grad_out.shape != (R, K) or out.shape != (R, K):
        raise ValueError(f"grad_out and out must have shape {(R, K)}, got {tuple(grad_out.shape)} and "
                         f"{tuple(out.shape)}")
    grad_out = grad_out.contiguous()
    if reduction in MEMBER_INDEPENDENT_GRAD:
        grad = torch.empty((R, K), dtype=torch.float32, device=x.device)
    else:
        if aux.shape != aux_shape(reduction, N, R):
            raise ValueError(f"aux must be the [2, N, R] = {aux_shape(reduction, N, R)} member row maxima and sums of "
                             f"exp(x - max) that reduce_forward saved, got {tuple(aux.shape)}")
        grad = torch.empty((N, R, K), dtype=x.dtype, device=x.device)
    if R == 0:
        return grad
    if reduction == "mean":
        block = 1024
        _launch(_scale_kernel, (triton.cdiv(R * K, block),), grad_out, grad, R * K, 1.0 / N, BLOCK=block)
        return grad
    plan = _Plan(R, K, block_r, block_k, num_warps)
    meta = dict(ONE_BLOCK=plan.one_block, BLOCK_R=plan.block_r, BLOCK_K=plan.block_k, num_warps=plan.num_warps)
    row_blocks = triton.cdiv(R, plan.block_r)
    if reduction == "softmax_of_mean":
        _launch(_softmax_of_mean_backward_kernel, (row_blocks,), grad_out, out.contiguous(), grad, N, R, K,
                **meta)
    else:
        _launch(_member_probs_backward_kernel, (row_blocks, N), x, grad_out, out.contiguous(), aux.contiguous(),
                grad, N, R, K, *x.stride(), math.log(N), LOG_OUTPUT=reduction == "log_mean_probs", **meta)
    return grad


def stats_forward(x: torch.Tensor, *, block_r: int | None = None, block_k: int | None = None,
                  num_warps: int | None = None, splits: int | None = None) -> tuple[torch.Tensor, ...]:
    """Ensemble statistics of logits ``x`` ``[N, R, K]`` (any strides) in one pass over the logits per row.

    Returns ``(probs [R, K], entropy [R], expected_entropy [R], mutual_info [R], confidence [R],
    prediction [R] int64, disagreement [R])``, float32 except ``prediction``, with the meanings of
    ``fused_ensemble.ops.reference.stats_reference``. The member softmaxes are never materialized. Keyword
    overrides as in ``reduce_forward``.
    """
    _check_logits(x)
    N, R, K = x.shape
    probs = torch.empty((R, K), dtype=torch.float32, device=x.device)
    entropy, expected_entropy, mutual_info, confidence, disagreement = (
        torch.empty((R,), dtype=torch.float32, device=x.device) for _ in range(5))
    prediction = torch.empty((R,), dtype=torch.int64, device=x.device)
    outputs = (probs, entropy, expected_entropy, mutual_info, confidence, prediction, disagreement)
    if R == 0:
        return outputs
    plan = _Plan(R, K, block_r, block_k, num_warps)
    plan.split_columns(x, splits)
    common = (N, R, K, *x.stride())
    meta = dict(BLOCK_R=plan.block_r, BLOCK_K=plan.block_k, BLOCK_N=triton.next_power_of_2(N),
                num_warps=plan.num_warps)
    if plan.splits == 1:
        kernel = _stats_short_kernel if plan.one_block else _stats_long_kernel
        _launch(kernel, (plan.row_blocks,), x, *outputs, *common, **meta)
        return outputs
    grid = (plan.row_blocks, plan.splits)
    split_args = (plan.split_cols, plan.splits)
    block_s = triton.next_power_of_2(plan.splits)
    max_part, log_sum_part, argmax_part = _split_partials(x, plan, N, with_argmax=True)
    stat_part = torch.empty((4, R, plan.splits), dtype=torch.float32, device=x.device)
    prediction_part = torch.empty((R, plan.splits), dtype=torch.int32, device=x.device)
    _launch(_member_partials_kernel, grid, x, max_part, log_sum_part, argmax_part, *common, *split_args,
            WITH_ARGMAX=True, **meta)
    _launch(_stats_split_kernel, grid, x, probs, max_part, log_sum_part, stat_part, prediction_part, *common,
            *split_args, BLOCK_S=block_s, **meta)
    meta.pop("BLOCK_K")
    _launch(_stats_split_finish_kernel, (plan.row_blocks,), max_part, log_sum_part, argmax_part,
            stat_part, prediction_part, *outputs[1:], N, R, plan.splits, BLOCK_S=block_s, **meta)
    return outputs
