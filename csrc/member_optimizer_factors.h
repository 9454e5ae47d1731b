// What the per-member optimizer ops (fused_ensemble_ext::member_sgd_ / member_adamw_) take: tensors laid out
// member-major (below), and the factors per (parameter, member), a float64 tensor [P, N, F] whose last dim is laid
// out as below. fused_ensemble/optim.py writes them (derived values in float64, as torch.optim's Python floats); the
// CPU kernels (csrc/cpu/member_optimizers.cpp) and the CUDA kernels (csrc/cuda/member_optimizers.cu) read them.
#pragma once

#include <ATen/core/Tensor.h>

namespace fused_ensemble {

// The tensors the kernels take: each is walked as N member slices of numel / N elements, one after another in
// memory, with every tensor of a parameter (gradient, state) in the parameter's element order. That holds for any
// dense tensor whose dim 0 is outermost, whatever the order of the other dims (channels_last weights
// [N, O, I, kh, kw] included), and whose companions have its strides (dims of size 1 aside).
inline bool member_major_dense(const at::Tensor& t) {
  return t.dim() > 0 && t.is_non_overlapping_and_dense() && (t.size(0) <= 1 || t.stride(0) * t.size(0) == t.numel());
}

inline bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) != 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// SGD: -lr, weight decay, momentum, 1 - dampening, whether this is the member's first step (its momentum buffer
// starts as the gradient), whether the member is updated at all (0: frozen).
enum SgdFactor { kSgdNegLr, kSgdWeightDecay, kSgdMomentum, kSgdGradScale, kSgdFirstStep, kSgdActive, kSgdFactors };

// AdamW, with this step's bias corrections: 1 - lr * wd, 1 - beta1 (the lerp weight), beta2, 1 - beta2,
// sqrt(1 - beta2^t), eps, -lr / (1 - beta1^t), active.
enum AdamFactor {
  kAdamDecay,
  kAdamOneMinusBeta1,
  kAdamBeta2,
  kAdamOneMinusBeta2,
  kAdamBiasCorrection2Sqrt,
  kAdamEps,
  kAdamNegStepSize,
  kAdamActive,
  kAdamFactors
};

}  // namespace fused_ensemble
