// Interface between the optimizer ops (member_optimizers.cpp: checks, factors, threading over chunks) and the
// element loops (member_optimizers_impl.h), compiled once per CPU capability (see cpu_capability.h) and reached
// through the capability's table (kernel_table.h).
#pragma once

#include <cstdint>

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

}  // namespace fused_ensemble::cpu
