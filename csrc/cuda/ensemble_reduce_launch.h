// Host-side entry points of the CUDA ensemble-reduction kernels (defined in the *_forward.cu / *_backward.cu
// files, called by the op implementations in ensemble_reduce.cu). Tensors are already checked there:
// x is [N, R, K] on the current device with any strides, outputs are freshly allocated and contiguous.
#pragma once

#include <ATen/core/Tensor.h>

#include <type_traits>
#include <utility>

#include "../ensemble_reduce.h"

namespace fused_ensemble::cuda {

// out [R, K]; aux [2, N, R] for kMeanProbs / kLogMeanProbs (empty otherwise): aux[0] each member row's max, aux[1] its
// sum of exp(x - max), see ../ensemble_reduce.h. short_rows: use the short-row kernel
// where it applies (below).
void launch_reduce_forward(const at::Tensor& x, Reduction reduction, at::Tensor& out, at::Tensor& aux,
                           bool short_rows);

// The seven outputs of stats_forward, allocated by the caller.
struct StatsOutputs {
  at::Tensor probs, entropy, expected_entropy, mutual_info, confidence, prediction, disagreement;
};
void launch_stats_forward(const at::Tensor& x, StatsOutputs& outputs, bool short_rows);

// The accumulation type of a kernel parameter struct P (the type its `out` points to), for the generic lambdas
// that fill in output pointers.
template <typename P> using acc_of = std::remove_pointer_t<decltype(std::declval<P>().out)>;

// Points a kernel's parameter struct (fields named as in StatsOutputs, `out` of the accumulation type) at the
// statistics outputs other than probs.
template <typename Params>
void set_stats_outputs(Params& p, StatsOutputs& o) {
  using A = acc_of<Params>;
  p.entropy = o.entropy.data_ptr<A>();
  p.expected_entropy = o.expected_entropy.data_ptr<A>();
  p.mutual_info = o.mutual_info.data_ptr<A>();
  p.confidence = o.confidence.data_ptr<A>();
  p.disagreement = o.disagreement.data_ptr<A>();
  p.prediction = o.prediction.data_ptr<int64_t>();
}

// Short rows (ensemble_reduce_short_rows.cu): K <= 16 classes, rows contiguous ([R, K] of each member dense).
// launch_reduce_forward / launch_stats_forward use it wherever it applies (but for kMean) when their caller asks
// for it: opt-in for now, through the ops' short_rows argument (see csrc/ops.cpp).
bool short_rows_kernel_applies(const at::Tensor& x);
void launch_short_rows_forward(const at::Tensor& x, Reduction reduction, at::Tensor& out, at::Tensor& aux);
void launch_short_rows_stats(const at::Tensor& x, StatsOutputs& outputs);

// grad: [R, K] (kMean, kSoftmaxOfMean) or [N, R, K] (kMeanProbs, kLogMeanProbs); grad_out and out contiguous.
void launch_reduce_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& out,
                            Reduction reduction, at::Tensor& grad);

}  // namespace fused_ensemble::cuda
