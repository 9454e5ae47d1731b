// Device building blocks shared by the forward and backward ensemble-reduction kernels:
// vector loads/stores, the row-group layout (a sub-warp, a warp or a whole block per row) and group-wide
// reductions of small "partial" structs (online softmax, sums, NaN-aware argmax).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <climits>
#include <cstdint>

namespace fused_ensemble::cuda {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Two alternating buffers of one partial per warp (see group_reduce) at up to 32 bytes per partial.
constexpr int kReduceScratchBytes = 2 * kWarp * 32;

// Accumulation type: fp32 for fp32/fp16/bf16 inputs, fp64 for fp64.
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_type = typename AccType<T>::type;

__device__ __forceinline__ float neg_inf(float) { return __int_as_float(0xff800000); }
__device__ __forceinline__ double neg_inf(double) { return __longlong_as_double(0xfff0000000000000ULL); }
__device__ __forceinline__ float quiet_nan(float) { return __int_as_float(0x7fc00000); }
__device__ __forceinline__ double quiet_nan(double) { return __longlong_as_double(0x7ff8000000000000ULL); }
__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log_(float x) { return logf(x); }
__device__ __forceinline__ double log_(double x) { return log(x); }

// ---- vector memory access --------------------------------------------------------------------------

template <typename T, int COUNT>
struct alignas(sizeof(T) * COUNT) Pack { T v[COUNT]; };

// Loads COUNT consecutive elements starting at p (16-byte aligned whenever COUNT * sizeof(T) >= 16)
// with 16-byte transactions, converting to A.
template <typename T, int COUNT, typename A>
__device__ __forceinline__ void load_contig(const T* __restrict__ p, A* dst) {
  constexpr int kPer16 = 16 / static_cast<int>(sizeof(T));
  if constexpr (COUNT >= kPer16 && COUNT % kPer16 == 0) {
#pragma unroll
    for (int c = 0; c < COUNT / kPer16; ++c) {
      const Pack<T, kPer16> pk = reinterpret_cast<const Pack<T, kPer16>*>(p)[c];
#pragma unroll
      for (int e = 0; e < kPer16; ++e) dst[c * kPer16 + e] = static_cast<A>(pk.v[e]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < COUNT; ++e) dst[e] = static_cast<A>(p[e]);
  }
}

// Stores COUNT consecutive elements (same alignment rule as load_contig), converting from A. STREAMING:
// p is in global memory and written once (kernel outputs): a cache-streaming store keeps it from evicting
// the logits that a long row re-reads from L2.
template <typename T, int COUNT, bool STREAMING = false, typename A>
__device__ __forceinline__ void store_contig(T* p, const A* src) {
  constexpr int kPer16 = 16 / static_cast<int>(sizeof(T));
  if constexpr (COUNT >= kPer16 && COUNT % kPer16 == 0) {
#pragma unroll
    for (int c = 0; c < COUNT / kPer16; ++c) {
      union {
        Pack<T, kPer16> pk;
        uint4 raw;
      } u;
#pragma unroll
      for (int e = 0; e < kPer16; ++e) u.pk.v[e] = static_cast<T>(src[c * kPer16 + e]);
      if constexpr (STREAMING) __stcs(reinterpret_cast<uint4*>(p) + c, u.raw);
      else reinterpret_cast<uint4*>(p)[c] = u.raw;
    }
  } else {
#pragma unroll
    for (int e = 0; e < COUNT; ++e) p[e] = static_cast<T>(src[e]);
  }
}

// ---- row groups ----------------------------------------------------------------------------------
// A row is handled by `tpr` consecutive threads (a power of two). tpr <= 32: several rows per warp, reduced
// with shuffles only. tpr > 32: tpr == blockDim.x, one row per block, reduced through shared memory.
// A thread owns vectors (VEC elements each) lane, lane + tpr, lane + 2 tpr, ... of the row, NV of them
// per tile of tpr * NV * VEC columns, so a warp's loads are contiguous and coalesced.
struct Group {
  int tpr;
  int lane;   // index within the row group
  int index;  // row group within the block
  __device__ __forceinline__ explicit Group(int threads_per_row)
      : tpr(threads_per_row), lane(threadIdx.x & (threads_per_row - 1)), index(threadIdx.x / threads_per_row) {}
  // Orders the group's earlier shared/global writes before its later reads.
  __device__ __forceinline__ void sync() const {
    if (tpr > kWarp) __syncthreads(); else __syncwarp();
  }
};

// First column of vector slot j of tile t for this thread.
__device__ __forceinline__ int64_t slot_column(int t, int j, int nv, const Group& g, int vec) {
  return ((static_cast<int64_t>(t) * nv + j) * g.tpr + g.lane) * vec;
}

// Loads tile t of a row (elements of type T, column stride sK) into registers as A; `fill` where the row has
// no column (rows past the end, columns past K).
template <typename T, int VEC, int NV, typename A>
__device__ __forceinline__ void load_row_tile(A* v, const T* __restrict__ row, int t, const Group& g, int64_t K,
                                              int64_t sK, bool row_ok, A fill) {
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int64_t k0 = slot_column(t, j, NV, g, VEC);
    if (row_ok && k0 < K) {
      if constexpr (VEC > 1) load_contig<T, VEC>(row + k0, v + j * VEC);
      else v[j] = static_cast<A>(row[k0 * sK]);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[j * VEC + e] = fill;
    }
  }
}

__device__ __forceinline__ float shfl_xor(float v, int o) { return __shfl_xor_sync(kFullMask, v, o); }
__device__ __forceinline__ double shfl_xor(double v, int o) { return __shfl_xor_sync(kFullMask, v, o); }
__device__ __forceinline__ int shfl_xor(int v, int o) { return __shfl_xor_sync(kFullMask, v, o); }

// Reduces a partial over the row group; every thread of the group gets the result. All threads of every
// warp must call it (rows past the end take part with identity partials). `scratch` holds two buffers used
// alternately (`parity`), so a warp that races ahead into the next reduction never overwrites a slot that
// another warp is still reading: that would need it to pass the barrier of the reduction in between.
template <typename P>
__device__ __forceinline__ P group_reduce(P p, const Group& g, unsigned char* scratch, int& parity) {
  const int width = g.tpr < kWarp ? g.tpr : kWarp;
  for (int o = width >> 1; o > 0; o >>= 1) p = P::merge(p, p.shuffled(o));
  if (g.tpr <= kWarp) return p;
  static_assert(sizeof(P) <= 32, "partial too large for the reduction scratch");
  P* buf = reinterpret_cast<P*>(scratch) + parity * kWarp;
  parity ^= 1;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) buf[warp] = p;
  __syncthreads();
  P q = lane < g.tpr / kWarp ? buf[lane] : P::identity();
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) q = P::merge(q, q.shuffled(o));
  return q;
}

template <typename A>
struct SumPart {
  A v;
  static __device__ __forceinline__ SumPart identity() { return {A(0)}; }
  static __device__ __forceinline__ SumPart merge(SumPart a, SumPart b) { return {a.v + b.v}; }
  __device__ __forceinline__ SumPart shuffled(int o) const { return {shfl_xor(v, o)}; }
};

// Online softmax partial of a row: max m, s = sum exp(x - m); with STATS also e = sum exp(x - m) * (x - m)
// (for the member entropy H = log s - e / s) and idx = first index of the max.
// Merging rebases both sides on the larger max; a side whose max is -inf holds nothing (s = e = 0), which
// keeps exp(-inf - -inf) = NaN out of rows that only have some -inf entries.
// With STATS, m is NaN-propagating and idx is the first NaN if there is one (torch.argmax's rule, as the CPU
// kernel and the reference's x.argmax); s is NaN then anyway. Without STATS, m ignores NaN (s is NaN).
template <typename A, bool STATS>
struct SoftmaxPart {
  A m, s, e;
  int idx;
  static __device__ __forceinline__ SoftmaxPart identity() { return {neg_inf(A()), A(0), A(0), INT_MAX}; }
  static __device__ __forceinline__ SoftmaxPart merge(SoftmaxPart a, SoftmaxPart b) {
    SoftmaxPart r;
    r.m = a.m > b.m ? a.m : b.m;
    if constexpr (STATS) {
      if (a.m != a.m) r.m = a.m;
      else if (b.m != b.m) r.m = b.m;
    }
    const A ninf = neg_inf(A());
    const A ca = a.m == ninf ? A(0) : exp_(a.m - r.m);
    const A cb = b.m == ninf ? A(0) : exp_(b.m - r.m);
    r.s = a.s * ca + b.s * cb;
    if constexpr (STATS) {
      r.e = (a.m == ninf ? A(0) : ca * (a.e - (r.m - a.m) * a.s)) +
            (b.m == ninf ? A(0) : cb * (b.e - (r.m - b.m) * b.s));
      const bool a_nan = a.m != a.m, b_nan = b.m != b.m;
      if (a_nan != b_nan) r.idx = a_nan ? a.idx : b.idx;
      else r.idx = a.m > b.m ? a.idx : (b.m > a.m ? b.idx : (a.idx < b.idx ? a.idx : b.idx));
    } else {
      r.e = A(0);
      r.idx = 0;
    }
    return r;
  }
  __device__ __forceinline__ SoftmaxPart shuffled(int o) const {
    if constexpr (STATS) return {shfl_xor(m, o), shfl_xor(s, o), shfl_xor(e, o), shfl_xor(idx, o)};
    else return {shfl_xor(m, o), shfl_xor(s, o), A(0), 0};
  }
};

// Partial of one thread over COUNT register values v (padding = -inf) whose columns are col0 + i, merged
// into `acc`. The max is taken first so that each value costs one exp.
template <typename A, bool STATS, int COUNT>
__device__ __forceinline__ SoftmaxPart<A, STATS> softmax_partial(const A* v, int64_t col0, int vec, int nv_stride,
                                                                 SoftmaxPart<A, STATS> acc) {
  // Columns: value i sits at col0 + (i / vec) * nv_stride + i % vec (nv_stride = tpr * vec).
  const A ninf = neg_inf(A());
  A m = ninf;
  int idx = INT_MAX;
#pragma unroll
  for (int i = 0; i < COUNT; ++i) {
    if constexpr (STATS) {
      const int col = static_cast<int>(col0 + static_cast<int64_t>(i / vec) * nv_stride + i % vec);
      // The first NaN wins (m stays NaN after it), then the first of the largest values.
      if (v[i] > m || (v[i] == m && col < idx) || (v[i] != v[i] && m == m)) { m = v[i]; idx = col; }
    } else {
      m = v[i] > m ? v[i] : m;
    }
  }
  const A mref = m == ninf ? A(0) : m;
  A s = 0, e = 0;
#pragma unroll
  for (int i = 0; i < COUNT; ++i) {
    const A d = v[i] - mref;
    const A x = exp_(d);
    s += x;
    if constexpr (STATS) e += x > A(0) ? x * d : A(0);
  }
  return SoftmaxPart<A, STATS>::merge(acc, {m, s, e, idx});
}

// NaN-aware argmax partial with sum of p log p (final statistics over the averaged probabilities):
// NaN beats everything, ties go to the first index, like torch.max.
template <typename A>
struct ProbsPart {
  A plogp;
  A best;
  int idx;
  static __device__ __forceinline__ ProbsPart identity() { return {A(0), neg_inf(A()), INT_MAX}; }
  static __device__ __forceinline__ bool better(A va, int ia, A vb, int ib) {
    const bool na = va != va, nb = vb != vb;
    if (na || nb) return na && (!nb || ia < ib);
    return va > vb || (va == vb && ia < ib);
  }
  static __device__ __forceinline__ ProbsPart merge(ProbsPart a, ProbsPart b) {
    const bool take_a = better(a.best, a.idx, b.best, b.idx);
    return {a.plogp + b.plogp, take_a ? a.best : b.best, take_a ? a.idx : b.idx};
  }
  __device__ __forceinline__ ProbsPart shuffled(int o) const {
    return {shfl_xor(plogp, o), shfl_xor(best, o), shfl_xor(idx, o)};
  }
};

// Writes row r's scalar statistics (into the fields of a kernel parameter struct P): from the partial over the
// mean probabilities, the sum of the member entropies and the number of members whose own argmax is not the
// prediction. A row in which some member has no softmax (a NaN or +inf logit, or -inf everywhere) has NaN mean
// probabilities, so a NaN best: every statistic of it is NaN (its prediction, the first NaN, is 0), the rule of
// the reference. The mutual information is never negative: a rounding below 0 is 0.
template <typename P, typename A>
__device__ __forceinline__ void store_row_stats(const P& p, int64_t r, const ProbsPart<A>& pp, A entropy_sum,
                                                A differ) {
  const bool undefined = pp.best != pp.best;
  const A nan = quiet_nan(A());
  const A entropy = undefined ? nan : -pp.plogp;
  const A expected = undefined ? nan : entropy_sum * p.inv_n;
  const A mutual_info = entropy - expected;
  p.entropy[r] = entropy;
  p.expected_entropy[r] = expected;
  p.mutual_info[r] = mutual_info < A(0) ? A(0) : mutual_info;  // NaN stays NaN
  p.confidence[r] = pp.best;
  p.prediction[r] = pp.idx;
  p.disagreement[r] = undefined ? nan : differ * p.inv_n;
}

}  // namespace fused_ensemble::cuda
