// Forward kernels of the ensemble reduction and of the ensemble statistics over x [N, R, K] (any strides).
// Rows of at most 16 classes stored row after row can go to the short-row kernel instead
// (ensemble_reduce_short_rows.cu, opt-in for now); everything else runs here.
//
// "mean" is a flat streaming kernel (one thread per VEC output columns, a loop over members).
// The other reductions and the statistics run one row group per output row (see Group). softmax_of_mean sums
// the members of a tile in registers, then takes the row softmax of the mean. For the others, for each member the
// group loads the member's row tile by tile into registers, reduces an online-softmax partial over the group
// (max, sum of exp, and for the statistics the entropy term and first argmax), then adds the member's
// contribution to per-column accumulators that live in shared memory (global memory, i.e. the output row,
// when they do not fit). When a row fits in one tile (K <= tpr * E, e.g. 16384 columns for a 1024-thread
// block holding 16 values per thread) every logit is read exactly once; longer rows re-read their tiles once
// per member, newest tile first (the last one is still in registers), so the re-reads mostly hit L2.
#include "ensemble_reduce_common.cuh"
#include "ensemble_reduce_config.h"
#include "ensemble_reduce_launch.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cmath>
#include <type_traits>
#include <utility>

namespace fused_ensemble::cuda {
namespace {

enum class Mode { kMeanProbs, kSoftmaxOfMean, kLogMeanProbs, kStats };

// Two compiled variants per mode, dtype and vector width: short rows (sub-warp groups in 256-thread blocks)
// and long rows (up to 1024 threads per row, so at most 64 registers per thread). 16 values per thread keep
// the long-row kernels free of spills with 16-byte loads; strided scalar loads need a 64-bit address each,
// so that path holds 8; fp64 values take two registers each, hence 512 threads.
constexpr int kSmallE = 8;
constexpr int kSmallBlock = 256;
template <typename T, int VEC> constexpr int large_e() { return VEC == 1 && sizeof(T) < 8 ? 8 : 16; }
template <typename T> constexpr int large_block() { return sizeof(T) == 8 ? 512 : 1024; }
constexpr int64_t kSubWarpSmemBudget = 48 << 10;

// ---- mean: flat streaming kernel ---------------------------------------------------------------------

template <typename T, int VEC>
__global__ void __launch_bounds__(256) mean_kernel(const T* __restrict__ x, int64_t N, int64_t R, int64_t K,
                                                   int64_t sN, int64_t sR, int64_t sK, acc_type<T> inv_n,
                                                   acc_type<T>* __restrict__ out) {
  using A = acc_type<T>;
  const int64_t kv = K / VEC;
  const int64_t total = R * kv;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / kv;
    const int64_t k0 = (i - r * kv) * VEC;
    const T* base = x + r * sR + k0 * sK;
    A acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = A(0);
    // Unrolled so that several members' loads are in flight at once.
#pragma unroll 4
    for (int64_t n = 0; n < N; ++n) {
      A v[VEC];
      if constexpr (VEC > 1) load_contig<T, VEC>(base + n * sN, v);
      else v[0] = static_cast<A>(base[n * sN]);
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] += v[e];
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] *= inv_n;
    store_contig<A, VEC, true>(out + r * K + k0, acc);
  }
}

// ---- row kernel: mean_probs, softmax_of_mean, log_mean_probs, statistics -------------------------------

template <typename A>
struct RowParams {
  const void* x;
  int64_t N, R, K, sN, sR, sK;
  int tpr, rows_per_block, tiles;
  A inv_n, log_n;
  A* out;             // [R, K]
  A* aux;             // [2, N, R] (mean_probs, log_mean_probs): member row max, then sum of exp(x - max)
  A* acc2;            // [R, K] second accumulator when not in shared memory (log_mean_probs)
  bool acc_in_smem;
  int64_t pitch;      // row pitch of the shared-memory accumulators (elements, multiple of 4), 0 if unused
  bool preds_in_smem;
  int* preds;         // [R, N] member argmaxes when not in shared memory (statistics)
  A *entropy, *expected_entropy, *mutual_info, *confidence, *disagreement;
  int64_t* prediction;
};

template <typename T, int VEC, int E, int MAX_BLOCK, Mode MODE>
__global__ void __launch_bounds__(MAX_BLOCK) reduce_rows_kernel(const RowParams<acc_type<T>> p) {
  using A = acc_type<T>;
  constexpr int NV = E / VEC;
  constexpr bool kStats = MODE == Mode::kStats;
  constexpr int kAccs = MODE == Mode::kLogMeanProbs ? 2 : 1;
  extern __shared__ __align__(16) unsigned char smem[];
  unsigned char* scratch = smem;
  A* smem_acc = reinterpret_cast<A*>(smem + kReduceScratchBytes);

  const Group g(p.tpr);
  const int64_t r = static_cast<int64_t>(blockIdx.x) * p.rows_per_block + g.index;
  // Rows past the end still run every loop (their loads and stores are masked): the group reductions
  // need every thread of a warp.
  const bool row_ok = r < p.R;
  const int64_t rr = row_ok ? r : 0;
  const int64_t K = p.K;
  A* acc1 = p.acc_in_smem ? smem_acc + g.index * kAccs * p.pitch : p.out + rr * K;
  A* acc2 = nullptr;
  if constexpr (kAccs == 2) acc2 = p.acc_in_smem ? acc1 + p.pitch : p.acc2 + rr * K;
  int* preds = nullptr;
  if constexpr (kStats) {
    preds = p.preds_in_smem
                ? reinterpret_cast<int*>(smem_acc + p.rows_per_block * kAccs * p.pitch) + g.index * p.N
                : p.preds + rr * p.N;
  }
  const int col_stride = g.tpr * VEC;  // columns between a thread's consecutive vectors
  const T* x = static_cast<const T*>(p.x);
  const A ninf = neg_inf(A());
  int parity = 0;
  A v[E];
  A entropy_sum = 0;

  // softmax_of_mean needs no per-member reduction: tiles outer, members inner, the member sum in registers,
  // so each warp streams member after member with nothing in between. Rows longer than one tile keep the
  // mean of earlier tiles in the accumulator row.
  A mean[MODE == Mode::kSoftmaxOfMean ? E : 1];
  SoftmaxPart<A, false> mean_part = SoftmaxPart<A, false>::identity();
  if constexpr (MODE == Mode::kSoftmaxOfMean) {
    for (int t = 0; t < p.tiles; ++t) {
#pragma unroll
      for (int i = 0; i < E; ++i) mean[i] = A(0);
      for (int64_t n = 0; n < p.N; ++n) {
        load_row_tile<T, VEC, NV>(v, x + n * p.sN + rr * p.sR, t, g, K, p.sK, row_ok, ninf);
#pragma unroll
        for (int i = 0; i < E; ++i) mean[i] += v[i];  // padding stays -inf
      }
#pragma unroll
      for (int i = 0; i < E; ++i) mean[i] *= p.inv_n;
      mean_part = softmax_partial<A, false, E>(mean, 0, VEC, col_stride, mean_part);
      if (p.tiles > 1) {
#pragma unroll
        for (int j = 0; j < NV; ++j) {
          const int64_t k0 = slot_column(t, j, NV, g, VEC);
          if (row_ok && k0 < K) store_contig<A, VEC>(acc1 + k0, mean + j * VEC);
        }
      }
    }
  } else {
    for (int64_t n = 0; n < p.N; ++n) {
      const T* row = x + n * p.sN + rr * p.sR;
      const bool first = n == 0;
      SoftmaxPart<A, kStats> part = SoftmaxPart<A, kStats>::identity();
      for (int t = 0; t < p.tiles; ++t) {
        load_row_tile<T, VEC, NV>(v, row, t, g, K, p.sK, row_ok, ninf);
        part = softmax_partial<A, kStats, E>(v, slot_column(t, 0, NV, g, VEC), VEC, col_stride, part);
      }
      part = group_reduce(part, g, scratch, parity);
      const A log_s = log_(part.s);
      if constexpr (MODE != Mode::kStats) {
        if (g.lane == 0 && row_ok) {
          p.aux[n * p.R + r] = part.m;
          p.aux[(p.N + n) * p.R + r] = part.s;
        }
      } else {
        // A member row that is all -inf has s = 0: the reference's 0 * log 0 = 0 convention makes its
        // entropy 0 (its probabilities are NaN and poison `probs` instead).
        entropy_sum += part.s == A(0) ? A(0) : log_s - part.e / part.s;
        if (g.lane == 0 && row_ok) preds[n] = part.idx;
      }
      // exp(x - m) / s rather than exp(x - lse): lse = m + log s is rounded to the magnitude of m.
      const A scale = p.inv_n / part.s;
      for (int t = p.tiles - 1; t >= 0; --t) {
        if (t != p.tiles - 1) load_row_tile<T, VEC, NV>(v, row, t, g, K, p.sK, row_ok, ninf);
#pragma unroll
        for (int j = 0; j < NV; ++j) {
          const int64_t k0 = slot_column(t, j, NV, g, VEC);
          if (!row_ok || k0 >= K) continue;
          if constexpr (MODE == Mode::kLogMeanProbs) {
            // Per column online log-sum-exp over members of the member log-probabilities: M = running max,
            // S = sum exp(lp - M). Exact for logits of any magnitude, unlike log(sum of probabilities).
            A M[VEC], S[VEC];
            if (!first) {
              load_contig<A, VEC>(acc1 + k0, M);
              load_contig<A, VEC>(acc2 + k0, S);
            }
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              const A lp = (v[j * VEC + e] - part.m) - log_s;
              if (first) {
                M[e] = lp;
                S[e] = lp == ninf ? A(0) : A(1);
              } else if (lp > M[e]) {
                S[e] = S[e] * exp_(M[e] - lp) + A(1);
                M[e] = lp;
              } else {
                S[e] += lp == ninf ? A(0) : exp_(lp - M[e]);  // NaN lp (all -inf member row) propagates
              }
            }
            store_contig<A, VEC>(acc1 + k0, M);
            store_contig<A, VEC>(acc2 + k0, S);
          } else {
            A a[VEC];
            if (!first) load_contig<A, VEC>(acc1 + k0, a);
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              const A prob = exp_(v[j * VEC + e] - part.m) * scale;
              a[e] = first ? prob : a[e] + prob;
            }
            store_contig<A, VEC>(acc1 + k0, a);
          }
        }
      }
    }
  }

  // ---- per-row epilogue over the accumulators (each thread reads only the columns it wrote) ----
  A* out_row = p.out + rr * K;
  if constexpr (MODE == Mode::kMeanProbs) {
    if (p.acc_in_smem) {
      for (int t = 0; t < p.tiles; ++t) {
#pragma unroll
        for (int j = 0; j < NV; ++j) {
          const int64_t k0 = slot_column(t, j, NV, g, VEC);
          if (!row_ok || k0 >= K) continue;
          A a[VEC];
          load_contig<A, VEC>(acc1 + k0, a);
          store_contig<A, VEC, true>(out_row + k0, a);
        }
      }
    }
  } else if constexpr (MODE == Mode::kLogMeanProbs) {
    for (int t = 0; t < p.tiles; ++t) {
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const int64_t k0 = slot_column(t, j, NV, g, VEC);
        if (!row_ok || k0 >= K) continue;
        A M[VEC], S[VEC];
        load_contig<A, VEC>(acc1 + k0, M);
        load_contig<A, VEC>(acc2 + k0, S);
#pragma unroll
        for (int e = 0; e < VEC; ++e) M[e] = M[e] + log_(S[e]) - p.log_n;
        store_contig<A, VEC, true>(out_row + k0, M);
      }
    }
  } else if constexpr (MODE == Mode::kSoftmaxOfMean) {
    const SoftmaxPart<A, false> part = group_reduce(mean_part, g, scratch, parity);
    const A inv_s = A(1) / part.s;
    for (int t = 0; t < p.tiles; ++t) {
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const int64_t k0 = slot_column(t, j, NV, g, VEC);
        if (!row_ok || k0 >= K) continue;
        A a[VEC];
        if (p.tiles > 1) {
          load_contig<A, VEC>(acc1 + k0, a);
        } else {
#pragma unroll
          for (int e = 0; e < VEC; ++e) a[e] = mean[j * VEC + e];
        }
#pragma unroll
        for (int e = 0; e < VEC; ++e) a[e] = exp_(a[e] - part.m) * inv_s;
        store_contig<A, VEC, true>(out_row + k0, a);
      }
    }
  } else {
    ProbsPart<A> pp = ProbsPart<A>::identity();
    for (int t = 0; t < p.tiles; ++t) {
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const int64_t k0 = slot_column(t, j, NV, g, VEC);
        if (!row_ok || k0 >= K) continue;
        A a[VEC];
        load_contig<A, VEC>(acc1 + k0, a);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          pp.plogp += a[e] == A(0) ? A(0) : a[e] * log_(a[e]);  // xlogy: 0 log 0 = 0, NaN stays NaN
          const int col = static_cast<int>(k0) + e;
          if (ProbsPart<A>::better(a[e], col, pp.best, pp.idx)) {
            pp.best = a[e];
            pp.idx = col;
          }
        }
        if (p.acc_in_smem) store_contig<A, VEC, true>(out_row + k0, a);
      }
    }
    pp = group_reduce(pp, g, scratch, parity);
    g.sync();  // member argmaxes were written by lane 0 of the group
    A differ = 0;
    for (int64_t n = g.lane; n < p.N; n += g.tpr) differ += preds[n] != pp.idx ? A(1) : A(0);
    differ = group_reduce(SumPart<A>{differ}, g, scratch, parity).v;
    if (g.lane == 0 && row_ok) store_row_stats(p, r, pp, entropy_sum, differ);
  }
}

// ---- launchers -------------------------------------------------------------------------------------

template <typename A>
RowParams<A> base_params(const at::Tensor& x, at::Tensor& out) {
  RowParams<A> p{};
  p.x = x.data_ptr();
  p.N = x.size(0);
  p.R = x.size(1);
  p.K = x.size(2);
  // A stride of a size-1 dim is never used; zeroing it keeps the vector-width test simple.
  p.sN = p.N == 1 ? 0 : x.stride(0);
  p.sR = p.R == 1 ? 0 : x.stride(1);
  p.sK = x.stride(2);
  p.inv_n = A(1) / static_cast<A>(p.N);
  p.log_n = std::log(static_cast<A>(p.N));
  p.out = out.data_ptr<A>();
  return p;
}

// Decides where the per-column accumulators and the member argmaxes live and returns the dynamic shared
// memory size. Sub-warp configurations shrink their block to keep accumulators in shared memory.
template <typename A>
int64_t plan_shared_memory(RowParams<A>& p, RowConfig& c, int accs, bool stats) {
  const int64_t optin = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
  const int64_t budget = (c.tpr > 32 ? optin : std::min(optin, kSubWarpSmemBudget)) - kReduceScratchBytes;
  const int64_t pitch = (p.K + 3) / 4 * 4;
  const int64_t row_bytes = accs * pitch * static_cast<int64_t>(sizeof(A));
  RowConfig shrunk = c;
  p.acc_in_smem = shrink_to_fit(shrunk, row_bytes, budget);
  int64_t bytes = kReduceScratchBytes;
  if (p.acc_in_smem) {
    c = shrunk;
    p.pitch = pitch;
    bytes += c.rows_per_block * row_bytes;
  }
  p.preds_in_smem = false;
  if (stats) {
    const int64_t preds_bytes = c.rows_per_block * p.N * static_cast<int64_t>(sizeof(int));
    p.preds_in_smem = bytes + preds_bytes <= budget + kReduceScratchBytes;
    if (p.preds_in_smem) bytes += preds_bytes;
  }
  return bytes;
}

template <typename T, int VEC, int E, int MAX_BLOCK, Mode MODE>
void launch_rows(const RowParams<acc_type<T>>& p, const RowConfig& c, int64_t smem) {
  auto kernel = reduce_rows_kernel<T, VEC, E, MAX_BLOCK, MODE>;
  if (smem > (48 << 10)) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  const int64_t blocks = ceil_div(p.R, c.rows_per_block);
  kernel<<<static_cast<unsigned>(blocks), c.block, smem, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int VEC, Mode MODE>
void launch_rows_for_config(const RowParams<acc_type<T>>& p, const RowConfig& c, int64_t smem) {
  if (c.block <= kSmallBlock && c.E == kSmallE) launch_rows<T, VEC, kSmallE, kSmallBlock, MODE>(p, c, smem);
  else launch_rows<T, VEC, large_e<T, VEC>(), large_block<T>(), MODE>(p, c, smem);
}

// Plans and launches the row kernel for x's dtype and vector width.
template <Mode MODE, typename Fill>
void run_rows(const at::Tensor& x, at::Tensor& out, Fill fill_outputs) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ensemble_reduce_rows", [&] {
    using A = acc_type<scalar_t>;
    RowParams<A> p = base_params<A>(x, out);
    fill_outputs(p);
    const int vec = vector_width(x);
    const int e_large = vec == 1 ? large_e<scalar_t, 1>() : large_e<scalar_t, 2>();
    RowConfig c = choose_row_config(p.K, vec, kSmallE, e_large, large_block<scalar_t>());
    const int accs = MODE == Mode::kLogMeanProbs ? 2 : (MODE == Mode::kSoftmaxOfMean && c.tiles == 1 ? 0 : 1);
    const int64_t smem = plan_shared_memory(p, c, accs, MODE == Mode::kStats);
    // Accumulators that do not fit in shared memory use the output row; log_mean_probs needs a second row.
    at::Tensor acc2;
    if (MODE == Mode::kLogMeanProbs && !p.acc_in_smem) {
      acc2 = at::empty_like(out);
      p.acc2 = acc2.data_ptr<A>();
    }
    at::Tensor preds;
    if (MODE == Mode::kStats && !p.preds_in_smem) {
      preds = at::empty({p.R, p.N}, x.options().dtype(at::kInt));
      p.preds = preds.data_ptr<int>();
    }
    p.tpr = c.tpr;
    p.rows_per_block = c.rows_per_block;
    p.tiles = c.tiles;
    constexpr int kVec = 16 / sizeof(scalar_t);
    if constexpr (kVec > 1) {
      if (vec == kVec) {
        launch_rows_for_config<scalar_t, kVec, MODE>(p, c, smem);
        return;
      }
    }
    launch_rows_for_config<scalar_t, 1, MODE>(p, c, smem);
  });
}

// out = mean of x over members, with the flat streaming kernel.
void launch_mean(const at::Tensor& x, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ensemble_mean", [&] {
    using A = acc_type<scalar_t>;
    const RowParams<A> p = base_params<A>(x, out);
    const int vec = vector_width(x);
    const int64_t work = p.R * p.K / vec;
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(ceil_div(work, 256), sms * 16LL));
    const auto* xp = static_cast<const scalar_t*>(p.x);
    auto stream = at::cuda::getCurrentCUDAStream();
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (vec == kVec) {
      mean_kernel<scalar_t, kVec><<<blocks, 256, 0, stream>>>(xp, p.N, p.R, p.K, p.sN, p.sR, p.sK, p.inv_n, p.out);
    } else {
      mean_kernel<scalar_t, 1><<<blocks, 256, 0, stream>>>(xp, p.N, p.R, p.K, p.sN, p.sR, p.sK, p.inv_n, p.out);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Long rows and few of them (a row per block, blocks for under half the SMs): the fused softmax_of_mean kernel
// would stream all N members through those few SMs. Taking the mean with the flat kernel (every SM) and then
// the softmax of the [R, K] mean costs one extra write and read of R * K floats, which is small next to the
// N * R * K logits.
bool softmax_of_mean_in_two_steps(const at::Tensor& x) {
  const int64_t N = x.size(0), R = x.size(1), K = x.size(2);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return N > 1 && K > 4096 && 2 * R < sms;
}

}  // namespace

void launch_reduce_forward(const at::Tensor& x, Reduction reduction, at::Tensor& out, at::Tensor& aux,
                           bool short_rows) {
  if (x.size(1) == 0) return;
  if (short_rows && reduction != Reduction::kMean && short_rows_kernel_applies(x)) {
    launch_short_rows_forward(x, reduction, out, aux);
    return;
  }
  switch (reduction) {
    case Reduction::kMean:
      launch_mean(x, out);
      return;
    case Reduction::kMeanProbs:
      run_rows<Mode::kMeanProbs>(x, out, [&](auto& p) { p.aux = aux.data_ptr<acc_of<decltype(p)>>(); });
      return;
    case Reduction::kLogMeanProbs:
      run_rows<Mode::kLogMeanProbs>(x, out, [&](auto& p) { p.aux = aux.data_ptr<acc_of<decltype(p)>>(); });
      return;
    case Reduction::kSoftmaxOfMean:
      if (softmax_of_mean_in_two_steps(x)) {
        at::Tensor mean = at::empty_like(out);
        launch_mean(x, mean);
        run_rows<Mode::kSoftmaxOfMean>(mean.unsqueeze(0), out, [](auto&) {});
      } else {
        run_rows<Mode::kSoftmaxOfMean>(x, out, [](auto&) {});
      }
      return;
  }
}

void launch_stats_forward(const at::Tensor& x, StatsOutputs& o, bool short_rows) {
  if (x.size(1) == 0) return;
  if (short_rows && short_rows_kernel_applies(x)) {
    launch_short_rows_stats(x, o);
    return;
  }
  run_rows<Mode::kStats>(x, o.probs, [&](auto& p) { set_stats_outputs(p, o); });
}

}  // namespace fused_ensemble::cuda
