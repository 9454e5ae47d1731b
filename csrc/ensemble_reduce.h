// What the CPU (csrc/cpu) and CUDA (csrc/cuda) implementations of the ensemble-reduction ops share: the
// reductions, their names in the schemas, and the checks of the kernel contract on the logits, so
// that both devices accept the same inputs and reject the rest with the same words. Included by g++ and by nvcc,
// and by the CPU kernel files before their `#pragma GCC target`: nothing here beyond the tensor type and
// TORCH_CHECK.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <string>

namespace fused_ensemble {

enum class Reduction { kMean, kMeanProbs, kSoftmaxOfMean, kLogMeanProbs };

// The reduction a schema's `str reduction` names; `op` names the op in the error.
inline Reduction parse_reduction(c10::string_view name, const char* op) {
  if (name == "mean") return Reduction::kMean;
  if (name == "mean_probs") return Reduction::kMeanProbs;
  if (name == "softmax_of_mean") return Reduction::kSoftmaxOfMean;
  if (name == "log_mean_probs") return Reduction::kLogMeanProbs;
  TORCH_CHECK(false, "fused_ensemble_ext::", op, ": unknown reduction '", std::string(name.data(), name.size()),
              "'; expected one of 'mean', 'mean_probs', 'softmax_of_mean', 'log_mean_probs'");
}

// Whether the forward returns each member row's softmax normalizer as `aux` [2, N, R] (accumulation dtype): aux[0]
// the row max, aux[1] the sum of exp(x - max). The backward of these reductions rebuilds the member softmax
// exp(x - aux[0]) / aux[1] from them, exact for logits of any magnitude; the others return an empty `aux` [0].
inline bool saves_member_softmax(Reduction reduction) {
  return reduction == Reduction::kMeanProbs || reduction == Reduction::kLogMeanProbs;
}

// The kernel contract on logits, for every device: [N, R, K] (any strides) with at least one member and one class,
// in a floating dtype. The device, and limits of one device's kernels, are checked by the caller.
inline void check_logits(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 3, "fused_ensemble_ext::", op,
              ": logits must have shape [N, R, K] (members, rows, classes: 3 dims), got shape ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "fused_ensemble_ext::", op, ": logits must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK(x.size(0) > 0, "fused_ensemble_ext::", op, ": the ensemble has no members (logits.shape[0] == 0)");
  TORCH_CHECK(x.size(2) > 0, "fused_ensemble_ext::", op, ": logits have no classes (logits.shape[2] == 0)");
}

}  // namespace fused_ensemble
