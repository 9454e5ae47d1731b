// Interface between the optimizer ops (member_optimizers.cpp: checks, factors, threading over chunks) and the
// element loops (member_optimizers_impl.h), compiled once per CPU capability (see cpu_capability.h).
#pragma once

#include <cstdint>

#include "cpu_capability.h"

namespace fused_ensemble::cpu {

// One chunk of one member's slice of one parameter, with that member's SGD factors (see member_optimizers.cpp).
template <typename T>
struct SgdChunk {
  T* param;
  const T* grad;
  T* momentum_buffer;  // null when the member has no momentum
  int64_t size;
  T neg_lr, weight_decay, momentum, grad_scale;
  bool first_step, nesterov;
};

// One chunk of one member's slice of one parameter, with that member's AdamW factors for this step.
template <typename T>
struct AdamWChunk {
  T* param;
  const T* grad;
  T* exp_avg;
  T* exp_avg_sq;
  T* max_exp_avg_sq;  // null without amsgrad
  int64_t size;
  T decay, one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, eps, neg_step_size;
};

struct OptimizerKernelTable {
  void (*sgd_float)(const SgdChunk<float>&);
  void (*sgd_double)(const SgdChunk<double>&);
  void (*adamw_float)(const AdamWChunk<float>&);
  void (*adamw_double)(const AdamWChunk<double>&);
};

namespace DEFAULT {
const OptimizerKernelTable& optimizer_kernel_table();
}
#ifdef FUSED_ENSEMBLE_X86_KERNELS
namespace AVX2 {
const OptimizerKernelTable& optimizer_kernel_table();
}
namespace AVX512 {
const OptimizerKernelTable& optimizer_kernel_table();
}
#endif

}  // namespace fused_ensemble::cpu
