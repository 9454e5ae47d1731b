// Forward kernels for short rows (K <= 16 classes) laid out row after row (x[n] is [R, K] contiguous): one
// thread per row, the block's rows of one member staged through shared memory.
//
// The row kernel (ensemble_reduce_forward.cu) gives a K=10 row to 2 threads holding 8 slots each: 6 of 16 slots
// are padding, the loads are scalar (a 40-byte row is not 16-byte aligned) and the per-column accumulators live in
// shared memory. On an H100 that read 0.28-0.39 of a copy's bandwidth for mean_probs, log_mean_probs and stats.
// Here a block of 256 threads owns 256 consecutive rows. For each member, the block's slab (256 * K contiguous
// values) is read with 16-byte loads, coalesced, into registers one member ahead, then written to shared memory
// with an odd row pitch (so each thread reading its own row hits distinct banks); the thread then holds its row in
// registers and keeps every accumulator (per-column sums, online log-sum-exp, argmax counts) in registers too.
// The outputs go back out through shared memory the same way. Same arithmetic, member order and tie rules as the
// row kernel: only where values live changes.
#include "ensemble_reduce_common.cuh"
#include "ensemble_reduce_config.h"
#include "ensemble_reduce_launch.h"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cmath>
#include <type_traits>
#include <utility>

namespace fused_ensemble::cuda {
namespace {

constexpr int kMaxK = 16;
constexpr int kRowsPerBlock = 256;  // = threads per block: one row each

enum class ShortMode { kMeanProbs, kSoftmaxOfMean, kLogMeanProbs, kStats };

template <typename A>
struct ShortParams {
  const void* x;
  int64_t N, R, sN;  // rows contiguous: x[n, r, k] at n * sN + r * K + k
  int K, pitch;      // pitch: odd, >= K (shared-memory row stride)
  float inv_k;
  A inv_n, log_n;
  A* out;            // [R, K]
  A* aux;            // [2, N, R] (mean_probs, log_mean_probs): member row max, then sum of exp(x - max)
  A *entropy, *expected_entropy, *mutual_info, *confidence, *disagreement;
  int64_t* prediction;
};

// Row and column of element i of a slab of rows of K values: i / K through a float reciprocal, exact here
// because i < 256 * 16 keeps (i + 0.5) / K at least 1 / (2K) away from an integer.
__device__ __forceinline__ int slab_row(int i, float inv_k) { return __float2int_rz((i + 0.5f) * inv_k); }

// The block's slab of one member, VEC elements per load, SLOTS loads per thread (16 values per thread at most):
// vector j of thread t is vector j * 256 + t of the slab, so each load instruction of a warp reads 32
// consecutive vectors. A slab whose length is not a multiple of VEC ends in scalars (`tail`).
template <typename T, int VEC>
struct SlabLoad {
  static constexpr int kSlots = kMaxK / VEC;
  Pack<T, VEC> v[kSlots];
  T tail;

  __device__ __forceinline__ void load(const T* __restrict__ slab, int count) {
    const int vectors = count / VEC;
#pragma unroll
    for (int j = 0; j < kSlots; ++j) {
      const int vi = j * kRowsPerBlock + static_cast<int>(threadIdx.x);
      if (vi < vectors) v[j] = reinterpret_cast<const Pack<T, VEC>*>(slab)[vi];
    }
    const int t = vectors * VEC + static_cast<int>(threadIdx.x);
    if (VEC > 1 && t < count) tail = slab[t];
  }

  template <typename A>
  __device__ __forceinline__ void store(A* smem, int count, int K, int pitch, float inv_k) const {
    const int vectors = count / VEC;
#pragma unroll
    for (int j = 0; j < kSlots; ++j) {
      const int vi = j * kRowsPerBlock + static_cast<int>(threadIdx.x);
      if (vi < vectors) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const int i = vi * VEC + e;
          const int row = slab_row(i, inv_k);
          smem[row * pitch + (i - row * K)] = static_cast<A>(v[j].v[e]);
        }
      }
    }
    const int i = vectors * VEC + static_cast<int>(threadIdx.x);
    if (VEC > 1 && i < count) {
      const int row = slab_row(i, inv_k);
      smem[row * pitch + (i - row * K)] = static_cast<A>(tail);
    }
  }
};

// Writes the block's [rows, K] results from shared memory to out (contiguous), coalesced: 16-byte stores where
// the block's part of out is 16-byte aligned (it is whenever out is: 256 * K * sizeof(A) is a multiple of 16).
template <typename A>
__device__ __forceinline__ void store_slab(const A* smem, A* __restrict__ out, int count, int K, int pitch,
                                           float inv_k) {
  constexpr int kVec = 16 / sizeof(A);
  const bool vectorized = reinterpret_cast<uintptr_t>(out) % 16 == 0;
  const int vectors = vectorized ? count / kVec : 0;
  for (int vi = threadIdx.x; vi < vectors; vi += kRowsPerBlock) {
    A a[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const int i = vi * kVec + e;
      const int row = slab_row(i, inv_k);
      a[e] = smem[row * pitch + (i - row * K)];
    }
    store_contig<A, kVec, true>(out + vi * kVec, a);
  }
  for (int i = vectors * kVec + threadIdx.x; i < count; i += kRowsPerBlock) {
    const int row = slab_row(i, inv_k);
    out[i] = smem[row * pitch + (i - row * K)];
  }
}

template <typename T, int VEC, ShortMode MODE>
__global__ void __launch_bounds__(kRowsPerBlock) short_rows_kernel(const ShortParams<acc_type<T>> p) {
  using A = acc_type<T>;
  constexpr bool kStats = MODE == ShortMode::kStats;
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  A* smem = reinterpret_cast<A*>(smem_bytes);

  const int K = p.K;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
  const int rows = static_cast<int>(p.R - r0 < kRowsPerBlock ? p.R - r0 : kRowsPerBlock);
  const int count = rows * K;
  const int t = threadIdx.x;
  const bool row_ok = t < rows;
  const int64_t r = r0 + t;
  const T* x = static_cast<const T*>(p.x) + r0 * K;
  const A ninf = neg_inf(A());

  // acc: per-column sum of member probabilities (mean_probs, stats), of logits (softmax_of_mean), or the running
  // max M of the online log-sum-exp (log_mean_probs, with S its sums).
  A acc[kMaxK], S[MODE == ShortMode::kLogMeanProbs ? kMaxK : 1];
  // Statistics: how many members' own argmax is each column, in shared memory after the slab (column c of
  // thread t at c * 256 + t: only its own thread touches it, and registers are what limits occupancy here).
  int* counts = reinterpret_cast<int*>(smem + kRowsPerBlock * p.pitch);
  A entropy_sum = 0;
#pragma unroll
  for (int c = 0; c < kMaxK; ++c) {
    acc[c] = A(0);
    if constexpr (MODE == ShortMode::kLogMeanProbs) S[c] = A(0);
    if (kStats && c < K) counts[c * kRowsPerBlock + t] = 0;
  }

  SlabLoad<T, VEC> next;
  next.load(x, count);
  for (int64_t n = 0; n < p.N; ++n) {
    next.store(smem, count, K, p.pitch, p.inv_k);
    __syncthreads();
    if (n + 1 < p.N) next.load(x + (n + 1) * p.sN, count);  // in flight while this member is reduced
    A v[kMaxK];
#pragma unroll
    for (int c = 0; c < kMaxK; ++c) v[c] = c < K && row_ok ? smem[t * p.pitch + c] : ninf;
    __syncthreads();  // the slab buffer is free for the next member once every row is in registers

    if constexpr (MODE == ShortMode::kSoftmaxOfMean) {
#pragma unroll
      for (int c = 0; c < kMaxK; ++c) acc[c] += v[c];  // padding stays -inf
      continue;
    }
    const SoftmaxPart<A, kStats> part =
        softmax_partial<A, kStats, kMaxK>(v, 0, 1, 1, SoftmaxPart<A, kStats>::identity());
    const A log_s = log_(part.s);
    if constexpr (kStats) {
      // A member row that is all -inf has s = 0: its entropy is 0 (the reference's 0 log 0 = 0).
      entropy_sum += part.s == A(0) ? A(0) : log_s - part.e / part.s;
      counts[part.idx * kRowsPerBlock + t] += 1;  // idx < K: the first NaN or the first of the largest values
    } else {
      if (row_ok) {
        p.aux[n * p.R + r] = part.m;
        p.aux[(p.N + n) * p.R + r] = part.s;
      }
    }
    if constexpr (MODE == ShortMode::kLogMeanProbs) {
      // Per column online log-sum-exp over members of the member log-probabilities (as the row kernel).
#pragma unroll
      for (int c = 0; c < kMaxK; ++c) {
        const A lp = (v[c] - part.m) - log_s;
        if (n == 0) {
          acc[c] = lp;
          S[c] = lp == ninf ? A(0) : A(1);
        } else if (lp > acc[c]) {
          S[c] = S[c] * exp_(acc[c] - lp) + A(1);
          acc[c] = lp;
        } else {
          S[c] += lp == ninf ? A(0) : exp_(lp - acc[c]);
        }
      }
    } else {
      const A scale = p.inv_n / part.s;
#pragma unroll
      for (int c = 0; c < kMaxK; ++c) {
        const A prob = exp_(v[c] - part.m) * scale;
        acc[c] = n == 0 ? prob : acc[c] + prob;
      }
    }
  }

  // ---- epilogue: the row's results into shared memory, then out ----
  if constexpr (MODE == ShortMode::kSoftmaxOfMean) {
#pragma unroll
    for (int c = 0; c < kMaxK; ++c) acc[c] *= p.inv_n;
    const SoftmaxPart<A, false> part =
        softmax_partial<A, false, kMaxK>(acc, 0, 1, 1, SoftmaxPart<A, false>::identity());
    const A inv_s = A(1) / part.s;
#pragma unroll
    for (int c = 0; c < kMaxK; ++c) acc[c] = exp_(acc[c] - part.m) * inv_s;
  } else if constexpr (MODE == ShortMode::kLogMeanProbs) {
#pragma unroll
    for (int c = 0; c < kMaxK; ++c) acc[c] = acc[c] + log_(S[c]) - p.log_n;
  } else if constexpr (kStats) {
    ProbsPart<A> pp = ProbsPart<A>::identity();
#pragma unroll
    for (int c = 0; c < kMaxK; ++c) {
      if (c >= K) continue;
      pp.plogp += acc[c] == A(0) ? A(0) : acc[c] * log_(acc[c]);  // xlogy: 0 log 0 = 0, NaN stays NaN
      if (ProbsPart<A>::better(acc[c], c, pp.best, pp.idx)) {
        pp.best = acc[c];
        pp.idx = c;
      }
    }
    const int agree = counts[pp.idx * kRowsPerBlock + t];
    if (row_ok) store_row_stats(p, r, pp, entropy_sum, static_cast<A>(p.N - agree));
  }
  if (row_ok) {
#pragma unroll
    for (int c = 0; c < kMaxK; ++c) {
      if (c < K) smem[t * p.pitch + c] = acc[c];
    }
  }
  __syncthreads();
  store_slab<A>(smem, p.out + r0 * K, count, K, p.pitch, p.inv_k);
}

template <ShortMode MODE, typename Fill>
void run_short_rows(const at::Tensor& x, at::Tensor& out, Fill fill_outputs) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ensemble_reduce_short_rows", [&] {
    using A = acc_type<scalar_t>;
    ShortParams<A> p{};
    p.x = x.data_ptr();
    p.N = x.size(0);
    p.R = x.size(1);
    p.K = static_cast<int>(x.size(2));
    p.sN = p.N == 1 ? 0 : x.stride(0);
    p.pitch = p.K | 1;
    p.inv_k = 1.0f / static_cast<float>(p.K);
    p.inv_n = A(1) / static_cast<A>(p.N);
    p.log_n = std::log(static_cast<A>(p.N));
    p.out = out.data_ptr<A>();
    fill_outputs(p);
    int64_t smem = static_cast<int64_t>(kRowsPerBlock) * p.pitch * sizeof(A);  // 35 KB at most (fp64)
    if (MODE == ShortMode::kStats) smem += static_cast<int64_t>(kRowsPerBlock) * p.K * sizeof(int);  // + 16 KB
    const auto blocks = static_cast<unsigned>(ceil_div(p.R, kRowsPerBlock));
    auto stream = at::cuda::getCurrentCUDAStream();
    constexpr int kVec = 16 / sizeof(scalar_t);
    // 16-byte loads need every member's slab to start 16-byte aligned: the data pointer and the member
    // stride (a block's offset, 256 * K elements, always is).
    const bool aligned = reinterpret_cast<uintptr_t>(p.x) % 16 == 0 && (p.sN * sizeof(scalar_t)) % 16 == 0;
    auto kernel = aligned ? short_rows_kernel<scalar_t, kVec, MODE> : short_rows_kernel<scalar_t, 1, MODE>;
    if (smem > (48 << 10)) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    }
    kernel<<<blocks, kRowsPerBlock, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

bool short_rows_kernel_applies(const at::Tensor& x) {
  const int64_t R = x.size(1), K = x.size(2);
  return K >= 1 && K <= kMaxK && R >= 1 && (K == 1 || x.stride(2) == 1) && (R == 1 || x.stride(1) == K);
}

void launch_short_rows_forward(const at::Tensor& x, Reduction reduction, at::Tensor& out, at::Tensor& aux) {
  switch (reduction) {
    case Reduction::kMeanProbs:
      run_short_rows<ShortMode::kMeanProbs>(x, out, [&](auto& p) { p.aux = aux.data_ptr<acc_of<decltype(p)>>(); });
      return;
    case Reduction::kLogMeanProbs:
      run_short_rows<ShortMode::kLogMeanProbs>(x, out, [&](auto& p) { p.aux = aux.data_ptr<acc_of<decltype(p)>>(); });
      return;
    case Reduction::kSoftmaxOfMean:
      run_short_rows<ShortMode::kSoftmaxOfMean>(x, out, [](auto&) {});
      return;
    case Reduction::kMean:
      break;
  }
  TORCH_CHECK(false, "fused_ensemble_ext (CUDA): the short-row kernel has no plain mean");
}

void launch_short_rows_stats(const at::Tensor& x, StatsOutputs& o) {
  run_short_rows<ShortMode::kStats>(x, o.probs, [&](auto& p) { set_stats_outputs(p, o); });
}

}  // namespace fused_ensemble::cuda
