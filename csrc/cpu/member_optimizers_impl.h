// The element loops of the per-member optimizer updates, compiled once per CPU capability: include only through
// kernel_table_impl.h from a kernels_<capability>.cpp, which defines CPU_CAPABILITY (with the matching
// `#pragma GCC target`) first. Plain loops with loop-invariant branches hoisted, which the compiler vectorizes for
// the capability's vector width (the extension builds with -fno-math-errno, so sqrt vectorizes too).
//
// The arithmetic follows torch.optim's single-tensor path operation by operation (see member_optimizers.cpp);
// where the capability has FMA, the compiler may fuse a multiply and an add, as ATen's own vectorized kernels do.
#include <cmath>
#include <cstdint>

#include "member_optimizers.h"

namespace fused_ensemble::cpu::CPU_CAPABILITY {
namespace {

// torch.optim.SGD: g = grad (+ wd * p); buf = g (first step) or momentum * buf + (1 - dampening) * g;
// g = g + momentum * buf (nesterov) or buf; p = p - lr * g.
template <typename T, bool WEIGHT_DECAY, bool NESTEROV>
void sgd_momentum_loop(const SgdChunk<T>& c) {
  // Factors in locals: read through `c`, the compiler would have to assume the stores may change them.
  T* __restrict__ p = c.param;
  const T* __restrict__ grad = c.grad;
  T* __restrict__ buf = c.momentum_buffer;
  const T weight_decay = c.weight_decay, momentum = c.momentum, grad_scale = c.grad_scale, neg_lr = c.neg_lr;
  const int64_t size = c.size;
  if (c.first_step) {
    for (int64_t k = 0; k < size; ++k) {
      const T g = WEIGHT_DECAY ? grad[k] + weight_decay * p[k] : grad[k];
      buf[k] = g;
      p[k] = p[k] + neg_lr * (NESTEROV ? g + momentum * g : g);
    }
    return;
  }
  for (int64_t k = 0; k < size; ++k) {
    const T g = WEIGHT_DECAY ? grad[k] + weight_decay * p[k] : grad[k];
    const T b = buf[k] * momentum + grad_scale * g;
    buf[k] = b;
    p[k] = p[k] + neg_lr * (NESTEROV ? g + momentum * b : b);
  }
}

template <typename T, bool WEIGHT_DECAY>
void sgd_plain_loop(const SgdChunk<T>& c) {
  T* __restrict__ p = c.param;
  const T* __restrict__ grad = c.grad;
  const T weight_decay = c.weight_decay, neg_lr = c.neg_lr;
  const int64_t size = c.size;
  for (int64_t k = 0; k < size; ++k) {
    const T g = WEIGHT_DECAY ? grad[k] + weight_decay * p[k] : grad[k];
    p[k] = p[k] + neg_lr * g;
  }
}

template <typename T>
void member_sgd_chunk(const SgdChunk<T>& c) {
  const bool decay = c.weight_decay != T(0);
  if (c.momentum_buffer == nullptr) {
    decay ? sgd_plain_loop<T, true>(c) : sgd_plain_loop<T, false>(c);
  } else if (c.nesterov) {
    decay ? sgd_momentum_loop<T, true, true>(c) : sgd_momentum_loop<T, false, true>(c);
  } else {
    decay ? sgd_momentum_loop<T, true, false>(c) : sgd_momentum_loop<T, false, false>(c);
  }
}

// NaN-propagating maximum, as torch.maximum.
template <typename T>
inline T nan_maximum(T a, T b) {
  return (a != a || a > b) ? a : b;
}

// torch.optim.AdamW with this step's bias corrections: p = p * (1 - lr * wd); m = lerp(m, g, 1 - beta1);
// v = beta2 * v + (1 - beta2) * g * g; vmax = max(vmax, v) (amsgrad);
// p = p - lr / bc1 * m / (sqrt(v or vmax) / sqrt(bc2) + eps).
template <typename T, bool SMALL_WEIGHT, bool AMSGRAD>
void adamw_loop(const AdamWChunk<T>& c) {
  T* __restrict__ p = c.param;
  const T* __restrict__ grad = c.grad;
  T* __restrict__ m = c.exp_avg;
  T* __restrict__ v = c.exp_avg_sq;
  T* __restrict__ v_max = c.max_exp_avg_sq;
  const T weight = c.one_minus_beta1, beta2 = c.beta2, one_minus_beta2 = c.one_minus_beta2;
  const T bias_correction2_sqrt = c.bias_correction2_sqrt, eps = c.eps, decay = c.decay;
  const T neg_step_size = c.neg_step_size;
  const int64_t size = c.size;
  for (int64_t k = 0; k < size; ++k) {
    const T g = grad[k];
    const T diff = g - m[k];
    // torch's lerp picks its formula by the weight: exact at both ends.
    const T m_k = SMALL_WEIGHT ? m[k] + weight * diff : g - diff * (T(1) - weight);
    const T v_k = v[k] * beta2 + one_minus_beta2 * g * g;
    m[k] = m_k;
    v[k] = v_k;
    T second = v_k;
    if (AMSGRAD) {
      second = nan_maximum(v_max[k], v_k);
      v_max[k] = second;
    }
    const T denom = std::sqrt(second) / bias_correction2_sqrt + eps;
    p[k] = p[k] * decay + neg_step_size * (m_k / denom);
  }
}

template <typename T>
void member_adamw_chunk(const AdamWChunk<T>& c) {
  const bool small_weight = std::abs(c.one_minus_beta1) < T(0.5);
  const bool amsgrad = c.max_exp_avg_sq != nullptr;
  if (small_weight) {
    amsgrad ? adamw_loop<T, true, true>(c) : adamw_loop<T, true, false>(c);
  } else {
    amsgrad ? adamw_loop<T, false, true>(c) : adamw_loop<T, false, false>(c);
  }
}

}  // namespace
}  // namespace fused_ensemble::cpu::CPU_CAPABILITY
