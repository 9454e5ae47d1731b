// The factors the per-member optimizer ops (fused_ensemble_ext::member_sgd_ / member_adamw_) take, per
// (parameter, member): a float64 tensor [P, N, F] whose last dim is laid out as below. fused_ensemble/optim.py
// writes them (derived values in float64, as torch.optim's Python floats); the CPU kernels
// (csrc/cpu/member_optimizers.cpp) and the CUDA kernels (csrc/cuda/member_optimizers.cu) read them.
#pragma once

namespace fused_ensemble {

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
