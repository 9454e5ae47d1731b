// CUDA implementations of the per-member optimizer ops (schemas in csrc/ops.cpp, CPU kernels in
// csrc/cpu/member_optimizers.cpp, factor layout in csrc/member_optimizer_factors.h). One launch per parameter [N, ...]:
// grid.y is the member, so a block reads its member's factors once and a frozen member's blocks return at once; grid.x
// strides over the member's slice. The element arithmetic is the CPU kernels' (torch.optim's single-tensor path) but in
// float64, rounded to the parameter dtype once per stored value: the extension's CUDA sources build with
// --use_fast_math (approximate float division and sqrt, denormals flushed), which would otherwise drift from
// torch.optim, and float64 arithmetic costs nothing in an update bound by memory. The factors arrive as a CPU float64
// tensor and are copied to the device once per call.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../member_optimizer_factors.h"

namespace fused_ensemble::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocksPerMember = 1024;  // grid-stride beyond that

// torch.optim.SGD for member blockIdx.y of one parameter (`slice` elements per member).
template <typename T>
__global__ void __launch_bounds__(kThreads) member_sgd_kernel(T* __restrict__ param, const T* __restrict__ grad,
                                                              T* __restrict__ buffer, int64_t slice,
                                                              const double* __restrict__ factors, bool nesterov) {
  const double* f = factors + static_cast<int64_t>(blockIdx.y) * kSgdFactors;
  if (f[kSgdActive] == 0.0) return;
  // The factors rounded to the parameter dtype first, as torch.optim's Python floats are.
  const double neg_lr = static_cast<T>(f[kSgdNegLr]), weight_decay = static_cast<T>(f[kSgdWeightDecay]);
  const double momentum = static_cast<T>(f[kSgdMomentum]), grad_scale = static_cast<T>(f[kSgdGradScale]);
  const bool first_step = f[kSgdFirstStep] != 0.0, decay = weight_decay != 0.0, use_buffer = momentum != 0.0;
  const int64_t offset = static_cast<int64_t>(blockIdx.y) * slice;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; k < slice;
       k += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t i = offset + k;
    const double p = param[i];
    double g = static_cast<T>(decay ? grad[i] + weight_decay * p : static_cast<double>(grad[i]));
    if (use_buffer) {
      const T b = static_cast<T>(first_step ? g : buffer[i] * momentum + grad_scale * g);
      buffer[i] = b;
      g = nesterov ? static_cast<T>(g + momentum * b) : static_cast<double>(b);
    }
    param[i] = static_cast<T>(p + neg_lr * g);
  }
}

// torch.optim.AdamW for member blockIdx.y of one parameter, with this step's bias corrections.
template <typename T>
__global__ void __launch_bounds__(kThreads) member_adamw_kernel(T* __restrict__ param, const T* __restrict__ grad,
                                                                T* __restrict__ exp_avg, T* __restrict__ exp_avg_sq,
                                                                T* __restrict__ max_exp_avg_sq, int64_t slice,
                                                                const double* __restrict__ factors) {
  const double* f = factors + static_cast<int64_t>(blockIdx.y) * kAdamFactors;
  if (f[kAdamActive] == 0.0) return;
  // The factors rounded to the parameter dtype first, as torch.optim's Python floats are.
  const double decay = static_cast<T>(f[kAdamDecay]), weight = static_cast<T>(f[kAdamOneMinusBeta1]);
  const double beta2 = static_cast<T>(f[kAdamBeta2]), one_minus_beta2 = static_cast<T>(f[kAdamOneMinusBeta2]);
  const double bias_correction2_sqrt = static_cast<T>(f[kAdamBiasCorrection2Sqrt]);
  const double eps = static_cast<T>(f[kAdamEps]), neg_step_size = static_cast<T>(f[kAdamNegStepSize]);
  const bool small_weight = (weight < 0.0 ? -weight : weight) < 0.5;  // torch's lerp picks its formula so
  const int64_t offset = static_cast<int64_t>(blockIdx.y) * slice;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; k < slice;
       k += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t i = offset + k;
    const double g = grad[i], m_old = exp_avg[i];
    const double diff = g - m_old;
    const T m = static_cast<T>(small_weight ? m_old + weight * diff : g - diff * (1.0 - weight));
    const T v = static_cast<T>(exp_avg_sq[i] * beta2 + one_minus_beta2 * g * g);
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    T second = v;
    if (max_exp_avg_sq != nullptr) {
      const T previous = max_exp_avg_sq[i];
      second = (previous != previous || previous > v) ? previous : v;  // NaN-propagating, as torch.maximum
      max_exp_avg_sq[i] = second;
    }
    const double denom = sqrt(static_cast<double>(second)) / bias_correction2_sqrt + eps;
    param[i] = static_cast<T>(param[i] * decay + neg_step_size * (m / denom));
  }
}

void check_list(const char* op, const char* name, at::TensorList list, at::TensorList params, bool may_be_empty) {
  if (may_be_empty && list.empty()) return;
  TORCH_CHECK(list.size() == params.size(), "fused_ensemble_ext::", op, " (CUDA): ", name, " has ", list.size(),
              " tensors for ", params.size(), " parameters");
  for (size_t j = 0; j < list.size(); ++j) {
    TORCH_CHECK(list[j].device() == params[j].device() && list[j].scalar_type() == params[j].scalar_type() &&
                    same_layout(list[j], params[j]),
                "fused_ensemble_ext::", op, " (CUDA): ", name, "[", j, "] must be a tensor of the parameter's ",
                "device, shape, strides and dtype (", params[j].sizes(), ", ", params[j].strides(), ", ",
                params[j].scalar_type(), ")");
  }
}

// Checks the parameters and factors; returns the factors on the parameters' device.
at::Tensor check_and_copy_factors(const char* op, at::TensorList params, const at::Tensor& factors,
                                  int64_t num_factors) {
  TORCH_CHECK(!params.empty(), "fused_ensemble_ext::", op, " (CUDA): no parameters");
  const at::Tensor& first = params[0];
  TORCH_CHECK(first.is_cuda() && (first.scalar_type() == at::kFloat || first.scalar_type() == at::kDouble) &&
                  first.dim() > 0,
              "fused_ensemble_ext::", op, " (CUDA): parameters must be float32 or float64 CUDA tensors with a ",
              "leading member dim, got ", first.sizes(), " ", first.scalar_type(), " on ", first.device());
  const int64_t members = first.size(0);
  TORCH_CHECK(members <= 65535, "fused_ensemble_ext::", op, " (CUDA): at most 65535 members, got ", members);
  for (size_t j = 0; j < params.size(); ++j) {
    const at::Tensor& p = params[j];
    TORCH_CHECK(p.device() == first.device() && p.scalar_type() == first.scalar_type() &&
                    member_major_dense(p) && p.size(0) == members,
                "fused_ensemble_ext::", op, " (CUDA): parameter ", j, " must be a dense ", first.scalar_type(),
                " tensor on ", first.device(), " with ", members, " members in dim 0, outermost in memory, got ",
                p.sizes(), ", strides ", p.strides(), " ", p.scalar_type(), " on ", p.device());
  }
  const int64_t count = static_cast<int64_t>(params.size());
  TORCH_CHECK(factors.device().is_cpu() && factors.scalar_type() == at::kDouble && factors.is_contiguous() &&
                  factors.dim() == 3 && factors.size(0) == count && factors.size(1) == members &&
                  factors.size(2) == num_factors,
              "fused_ensemble_ext::", op, " (CUDA): factors must be a contiguous float64 CPU tensor of shape [",
              count, ", ", members, ", ", num_factors, "], got ", factors.sizes(), " ", factors.scalar_type(),
              " on ", factors.device());
  return factors.to(first.device(), /*non_blocking=*/false);
}

dim3 grid_for(const at::Tensor& param) {
  const int64_t members = param.size(0);
  const int64_t slice = param.numel() / members;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((slice + kThreads - 1) / kThreads,
                                                                kMaxBlocksPerMember));
  return dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(members));
}

void member_sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                     const at::Tensor& factors, bool nesterov) {
  const at::Tensor device_factors = check_and_copy_factors("member_sgd_", params, factors, kSgdFactors);
  check_list("member_sgd_", "grads", grads, params, false);
  check_list("member_sgd_", "momentum_buffers", momentum_buffers, params, true);
  if (momentum_buffers.empty()) {
    const auto f = factors.accessor<double, 3>();
    for (int64_t j = 0; j < factors.size(0); ++j) {
      for (int64_t i = 0; i < factors.size(1); ++i) {
        TORCH_CHECK(f[j][i][kSgdMomentum] == 0.0 || f[j][i][kSgdActive] == 0.0,
                    "fused_ensemble_ext::member_sgd_ (CUDA): a member has momentum but no momentum buffers were "
                    "given");
      }
    }
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t stride = params[0].size(0) * kSgdFactors;
  AT_DISPATCH_FLOATING_TYPES(params[0].scalar_type(), "member_sgd_cuda", [&] {
    for (size_t j = 0; j < params.size(); ++j) {
      const at::Tensor& p = params[j];
      if (p.numel() == 0) continue;
      member_sgd_kernel<scalar_t><<<grid_for(p), kThreads, 0, stream>>>(
          p.data_ptr<scalar_t>(), grads[j].data_ptr<scalar_t>(),
          momentum_buffers.empty() ? nullptr : momentum_buffers[j].data_ptr<scalar_t>(), p.numel() / p.size(0),
          device_factors.data_ptr<double>() + static_cast<int64_t>(j) * stride, nesterov);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

void member_adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, const at::Tensor& factors) {
  const at::Tensor device_factors = check_and_copy_factors("member_adamw_", params, factors, kAdamFactors);
  check_list("member_adamw_", "grads", grads, params, false);
  check_list("member_adamw_", "exp_avgs", exp_avgs, params, false);
  check_list("member_adamw_", "exp_avg_sqs", exp_avg_sqs, params, false);
  check_list("member_adamw_", "max_exp_avg_sqs", max_exp_avg_sqs, params, true);
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t stride = params[0].size(0) * kAdamFactors;
  AT_DISPATCH_FLOATING_TYPES(params[0].scalar_type(), "member_adamw_cuda", [&] {
    for (size_t j = 0; j < params.size(); ++j) {
      const at::Tensor& p = params[j];
      if (p.numel() == 0) continue;
      member_adamw_kernel<scalar_t><<<grid_for(p), kThreads, 0, stream>>>(
          p.data_ptr<scalar_t>(), grads[j].data_ptr<scalar_t>(), exp_avgs[j].data_ptr<scalar_t>(),
          exp_avg_sqs[j].data_ptr<scalar_t>(),
          max_exp_avg_sqs.empty() ? nullptr : max_exp_avg_sqs[j].data_ptr<scalar_t>(), p.numel() / p.size(0),
          device_factors.data_ptr<double>() + static_cast<int64_t>(j) * stride);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace
}  // namespace fused_ensemble::cuda

TORCH_LIBRARY_IMPL(fused_ensemble_ext, CUDA, m) {
  m.impl("member_sgd_", &fused_ensemble::cuda::member_sgd_cuda);
  m.impl("member_adamw_", &fused_ensemble::cuda::member_adamw_cuda);
}
