// Backward kernels of the ensemble reduction (formulas in the kernel contract, see fused_ensemble/reference.py).
//
// "mean" is a flat scale of grad_out. The others run one row group per output row (see Group) and loop over
// the members with the grad_out row (and the out row) kept in registers across members. Per member row:
// pass 1 reduces the online-softmax partial (max, sum of exp) of x, pass 2 the row dot product
// (sum g * s, or sum h for log_mean_probs), pass 3 writes the gradient. With a row in one tile all three
// passes run on registers; longer rows re-read tiles, alternating direction so one tile stays in registers.
// The member row max and sum of exp(x - max) are recomputed from x rather than taken from `aux` (which holds the
// same two numbers, see ../ensemble_reduce.h): the row is read anyway, and its register copy serves the passes.
#include "ensemble_reduce_common.cuh"
#include "ensemble_reduce_config.h"
#include "ensemble_reduce_launch.h"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cmath>

namespace fused_ensemble::cuda {
namespace {

enum class Mode { kMeanProbs, kLogMeanProbs, kSoftmaxOfMean };

constexpr int kSmallE = 8;
template <typename T> constexpr int large_e() { return sizeof(T) == 8 ? 8 : 16; }
constexpr int kMaxRowBlock = 512;

template <typename A, int VEC>
__global__ void __launch_bounds__(256) scale_kernel(const A* __restrict__ in, A scale, int64_t vectors,
                                                    A* __restrict__ out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < vectors;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    A v[VEC];
    load_contig<A, VEC>(in + i * VEC, v);
#pragma unroll
    for (int e = 0; e < VEC; ++e) v[e] *= scale;
    store_contig<A, VEC, true>(out + i * VEC, v);
  }
}

template <typename A>
struct BackwardParams {
  const void* x;  // [N, R, K] logits; for softmax_of_mean the out row itself (N = 1, contiguous)
  int64_t N, R, K, sN, sR, sK;
  const A* grad_out;  // [R, K] contiguous
  const A* out;       // [R, K] contiguous
  void* grad;         // [N, R, K] in x's dtype, or [R, K] for softmax_of_mean
  int tpr, rows_per_block, tiles;
  A inv_n, log_n;
};

template <typename T, int VEC, int E, Mode MODE>
__global__ void __launch_bounds__(kMaxRowBlock) reduce_backward_kernel(const BackwardParams<acc_type<T>> p) {
  using A = acc_type<T>;
  constexpr int NV = E / VEC;
  constexpr bool kLog = MODE == Mode::kLogMeanProbs;
  __shared__ __align__(16) unsigned char scratch[kReduceScratchBytes];

  const Group g(p.tpr);
  const int64_t r = static_cast<int64_t>(blockIdx.x) * p.rows_per_block + g.index;
  const bool row_ok = r < p.R;  // rows past the end run masked (group reductions need the whole warp)
  const int64_t rr = row_ok ? r : 0;
  const int64_t K = p.K;
  const A ninf = neg_inf(A());
  const A* g_row = p.grad_out + rr * K;
  const A* out_row = p.out + rr * K;
  const T* x = static_cast<const T*>(p.x);
  T* grad = static_cast<T*>(p.grad);
  const int col_stride = g.tpr * VEC;
  int parity = 0;
  A v[E], gv[E], ov[kLog ? E : 1];
  int side_tile = -1;  // the tile that gv / ov hold
  auto load_side = [&](int t) {
    if (side_tile == t) return;
    side_tile = t;
    load_row_tile<A, VEC, NV>(gv, g_row, t, g, K, 1, row_ok, A(0));
    if constexpr (kLog) load_row_tile<A, VEC, NV>(ov, out_row, t, g, K, 1, row_ok, A(0));
  };

  for (int64_t n = 0; n < p.N; ++n) {
    const T* row = x + n * p.sN + rr * p.sR;
    T* grad_row = grad + (n * p.R + rr) * K;
    A m = 0, log_s = 0, inv_s = 1;
    int x_tile = -1;  // the tile that v holds
    if constexpr (MODE != Mode::kSoftmaxOfMean) {
      SoftmaxPart<A, false> part = SoftmaxPart<A, false>::identity();
      for (int t = 0; t < p.tiles; ++t) {
        load_row_tile<T, VEC, NV>(v, row, t, g, K, p.sK, row_ok, ninf);
        part = softmax_partial<A, false, E>(v, 0, VEC, col_stride, part);
      }
      x_tile = p.tiles - 1;
      part = group_reduce(part, g, scratch, parity);
      m = part.m;
      log_s = log_(part.s);
      inv_s = A(1) / part.s;
    }

    // Pass 2: the row dot product, newest tile first.
    A dot = 0;
    for (int t = p.tiles - 1; t >= 0; --t) {
      if (x_tile != t) load_row_tile<T, VEC, NV>(v, row, t, g, K, p.sK, row_ok, ninf);
      x_tile = t;
      load_side(t);
#pragma unroll
      for (int i = 0; i < E; ++i) {
        if (v[i] == ninf) continue;  // padding, and classes of probability 0
        if constexpr (MODE == Mode::kMeanProbs) {
          dot += gv[i] * (exp_(v[i] - m) * inv_s);
        } else if constexpr (kLog) {
          dot += gv[i] * exp_((v[i] - m) - log_s - ov[i] - p.log_n);
        } else {
          dot += gv[i] * v[i];
        }
      }
    }
    dot = group_reduce(SumPart<A>{dot}, g, scratch, parity).v;

    // Pass 3: the gradient, oldest tile first.
    for (int t = 0; t < p.tiles; ++t) {
      if (x_tile != t) load_row_tile<T, VEC, NV>(v, row, t, g, K, p.sK, row_ok, ninf);
      x_tile = t;
      load_side(t);
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const int64_t k0 = slot_column(t, j, NV, g, VEC);
        if (!row_ok || k0 >= K) continue;
        A res[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const int i = j * VEC + e;
          if constexpr (MODE == Mode::kMeanProbs) {
            res[e] = exp_(v[i] - m) * inv_s * (gv[i] - dot) * p.inv_n;
          } else if constexpr (kLog) {
            // h = g s / (N p); h = 0 where s = 0 (a -inf logit), which keeps columns that are -inf in every
            // member (p = 0) finite.
            const A lp = (v[i] - m) - log_s;
            const A h = lp == ninf ? A(0) : gv[i] * exp_(lp - ov[i] - p.log_n);
            res[e] = h - exp_(lp) * dot;
          } else {
            res[e] = v[i] * (gv[i] - dot) * p.inv_n;
          }
        }
        store_contig<T, VEC, true>(grad_row + k0, res);
      }
    }
  }
}

template <typename T, int VEC, int E, Mode MODE>
void launch_backward_rows(const BackwardParams<acc_type<T>>& p, const RowConfig& c) {
  const int64_t blocks = ceil_div(p.R, c.rows_per_block);
  reduce_backward_kernel<T, VEC, E, MODE>
      <<<static_cast<unsigned>(blocks), c.block, 0, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, Mode MODE>
void run_backward_rows(BackwardParams<acc_type<T>> p, int vec) {
  RowConfig c = choose_row_config(p.K, vec, kSmallE, large_e<T>(), kMaxRowBlock);
  p.tpr = c.tpr;
  p.rows_per_block = c.rows_per_block;
  p.tiles = c.tiles;
  constexpr int kVec = 16 / sizeof(T);
  const bool small = c.E == kSmallE;
  if constexpr (kVec > 1) {
    if (vec == kVec) {
      if (small) launch_backward_rows<T, kVec, kSmallE, MODE>(p, c);
      else launch_backward_rows<T, kVec, large_e<T>(), MODE>(p, c);
      return;
    }
  }
  if (small) launch_backward_rows<T, 1, kSmallE, MODE>(p, c);
  else launch_backward_rows<T, 1, large_e<T>(), MODE>(p, c);
}

}  // namespace

void launch_reduce_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& out,
                            Reduction reduction, at::Tensor& grad) {
  const int64_t N = x.size(0), R = x.size(1), K = x.size(2);
  if (R == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool side_aligned = aligned16(grad_out.data_ptr()) && aligned16(out.data_ptr()) && aligned16(grad.data_ptr());

  if (reduction == Reduction::kMean || reduction == Reduction::kSoftmaxOfMean) {
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "ensemble_reduce_backward_rk", [&] {
      using A = scalar_t;
      constexpr int kVec = 16 / sizeof(A);
      const A inv_n = A(1) / static_cast<A>(N);
      if (reduction == Reduction::kMean) {
        const int64_t numel = R * K;
        const bool vectorized = numel % kVec == 0 && side_aligned;
        const int64_t vectors = vectorized ? numel / kVec : numel;
        const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
        const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(ceil_div(vectors, 256), sms * 16LL));
        if (vectorized) {
          scale_kernel<A, kVec><<<blocks, 256, 0, stream>>>(grad_out.data_ptr<A>(), inv_n, vectors, grad.data_ptr<A>());
        } else {
          scale_kernel<A, 1><<<blocks, 256, 0, stream>>>(grad_out.data_ptr<A>(), inv_n, vectors, grad.data_ptr<A>());
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      BackwardParams<A> p{};
      p.x = out.data_ptr<A>();
      p.N = 1;
      p.R = R;
      p.K = K;
      p.sN = 0;
      p.sR = K;
      p.sK = 1;
      p.grad_out = grad_out.data_ptr<A>();
      p.out = out.data_ptr<A>();
      p.grad = grad.data_ptr<A>();
      p.inv_n = inv_n;
      p.log_n = std::log(static_cast<A>(N));
      const int vec = K % kVec == 0 && side_aligned ? kVec : 1;
      run_backward_rows<A, Mode::kSoftmaxOfMean>(p, vec);
    });
    return;
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ensemble_reduce_backward", [&] {
    using A = acc_type<scalar_t>;
    BackwardParams<A> p{};
    p.x = x.data_ptr();
    p.N = N;
    p.R = R;
    p.K = K;
    p.sN = N == 1 ? 0 : x.stride(0);
    p.sR = R == 1 ? 0 : x.stride(1);
    p.sK = x.stride(2);
    p.grad_out = grad_out.data_ptr<A>();
    p.out = out.data_ptr<A>();
    p.grad = grad.data_ptr();
    p.inv_n = A(1) / static_cast<A>(N);
    p.log_n = std::log(static_cast<A>(N));
    const int vec = side_aligned ? vector_width(x) : 1;
    if (reduction == Reduction::kMeanProbs) run_backward_rows<scalar_t, Mode::kMeanProbs>(p, vec);
    else run_backward_rows<scalar_t, Mode::kLogMeanProbs>(p, vec);
  });
}

}  // namespace fused_ensemble::cuda
