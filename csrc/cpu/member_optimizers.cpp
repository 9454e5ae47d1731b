// One-pass CPU updates for the per-member optimizers of fused_ensemble/optim.py (SGD and AdamW).
//
// Every parameter is [N, ...] with the member index first; member i's slice gets its own hyperparameters. The
// foreach version of the same update streams each stacked tensor through memory once per update term (five to
// nine passes); here one pass reads the parameter, gradient and state of a chunk and writes it back, for all
// members and parameters in one call (no Python loop over members or parameters). Frozen members are skipped.
//
// The per-(parameter, member) factors come from Python as a float64 tensor [P, N, F] (layout in
// csrc/member_optimizer_factors.h): derived values (1 - lr * wd, bias corrections) are computed there in float64,
// as torch.optim computes them in Python floats, and rounded here once to the parameter dtype. This file checks
// the inputs and splits the work into chunks over the threads; the element loops (member_optimizers_impl.h,
// torch.optim's single-tensor arithmetic operation by operation) are compiled once per CPU capability.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "../member_optimizer_factors.h"
#include "kernel_table.h"

namespace fused_ensemble::cpu {
namespace {

// Elements of one member slice per task: enough to outweigh the scheduling, few enough (64 KB of fp32 per
// tensor) that the update's tensors of a task stay in L2 and that a handful of large parameters still spread
// over every thread.
constexpr int64_t kTaskElements = 1 << 14;

struct Task {
  int64_t param, member, begin, end;  // elements [begin, end) of member `member`'s slice of parameter `param`
};

void check_list(const char* op, const char* name, at::TensorList list, at::TensorList params, bool may_be_empty) {
  if (may_be_empty && list.empty()) return;
  TORCH_CHECK(list.size() == params.size(), "fused_ensemble_ext::", op, ": ", name, " has ", list.size(),
              " tensors for ", params.size(), " parameters");
  for (size_t j = 0; j < list.size(); ++j) {
    TORCH_CHECK(list[j].device().is_cpu() && list[j].scalar_type() == params[j].scalar_type() &&
                    same_layout(list[j], params[j]),
                "fused_ensemble_ext::", op, ": ", name, "[", j, "] must be a CPU tensor of the parameter's shape ",
                params[j].sizes(), ", strides ", params[j].strides(), " and dtype ", params[j].scalar_type(), ", got ",
                list[j].sizes(), ", ", list[j].strides(), " ", list[j].scalar_type());
  }
}

// Checks the parameters and factors; returns the work, active members only, split into chunks.
std::vector<Task> plan(const char* op, at::TensorList params, const at::Tensor& factors, int64_t num_factors,
                       int64_t active_factor) {
  TORCH_CHECK(!params.empty(), "fused_ensemble_ext::", op, ": no parameters");
  const auto dtype = params[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "fused_ensemble_ext::", op,
              ": parameters must be float32 or float64, got ", dtype);
  TORCH_CHECK(params[0].dim() > 0, "fused_ensemble_ext::", op, ": parameters need a leading member dim");
  const int64_t members = params[0].size(0);
  const int64_t count = static_cast<int64_t>(params.size());
  for (int64_t j = 0; j < count; ++j) {
    const at::Tensor& p = params[j];
    TORCH_CHECK(p.device().is_cpu() && p.scalar_type() == dtype && member_major_dense(p) &&
                    p.size(0) == members,
                "fused_ensemble_ext::", op, ": parameter ", j, " must be a dense CPU ", dtype, " tensor with ",
                members, " members in dim 0, outermost in memory, got ", p.sizes(), ", strides ", p.strides(), " ",
                p.scalar_type());
  }
  TORCH_CHECK(factors.device().is_cpu() && factors.scalar_type() == at::kDouble && factors.is_contiguous() &&
                  factors.dim() == 3 && factors.size(0) == count && factors.size(1) == members &&
                  factors.size(2) == num_factors,
              "fused_ensemble_ext::", op, ": factors must be a contiguous float64 CPU tensor of shape [", count, ", ",
              members, ", ", num_factors, "], got ", factors.sizes(), " ", factors.scalar_type());
  const double* f = factors.data_ptr<double>();
  std::vector<Task> tasks;
  for (int64_t j = 0; j < count; ++j) {
    const int64_t slice = params[j].numel() / members;
    for (int64_t i = 0; i < members; ++i) {
      if (f[(j * members + i) * num_factors + active_factor] == 0.0) continue;
      for (int64_t begin = 0; begin < slice; begin += kTaskElements) {
        tasks.push_back({j, i, begin, std::min(slice, begin + kTaskElements)});
      }
    }
  }
  return tasks;
}

template <typename F>
void run_tasks(const std::vector<Task>& tasks, const F& run) {
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) run(tasks[t]);
  });
}

template <typename T>
T* member_data(const at::Tensor& t, const Task& task, int64_t members) {
  return t.data_ptr<T>() + task.member * (t.numel() / members) + task.begin;
}

template <typename T>
void sgd_chunks(const std::vector<Task>& tasks, at::TensorList params, at::TensorList grads,
                at::TensorList momentum_buffers, const double* f, bool nesterov,
                void (*kernel)(const SgdChunk<T>&)) {
  const int64_t members = params[0].size(0);
  run_tasks(tasks, [&](const Task& task) {
    const double* factor = f + (task.param * members + task.member) * kSgdFactors;
    const bool momentum = factor[kSgdMomentum] != 0.0;
    kernel({member_data<T>(params[task.param], task, members), member_data<T>(grads[task.param], task, members),
            momentum ? member_data<T>(momentum_buffers[task.param], task, members) : nullptr,
            task.end - task.begin, static_cast<T>(factor[kSgdNegLr]), static_cast<T>(factor[kSgdWeightDecay]),
            static_cast<T>(factor[kSgdMomentum]), static_cast<T>(factor[kSgdGradScale]),
            factor[kSgdFirstStep] != 0.0, nesterov});
  });
}

// torch.optim.SGD for every active member slice; a member with momentum 0 uses no buffer, one with weight decay 0
// adds nothing.
void member_sgd_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                 const at::Tensor& factors, bool nesterov) {
  const std::vector<Task> tasks = plan("member_sgd_", params, factors, kSgdFactors, kSgdActive);
  check_list("member_sgd_", "grads", grads, params, false);
  check_list("member_sgd_", "momentum_buffers", momentum_buffers, params, true);
  const int64_t members = params[0].size(0);
  const double* f = factors.data_ptr<double>();
  if (momentum_buffers.empty()) {
    for (int64_t e = 0; e < factors.size(0) * members; ++e) {
      TORCH_CHECK(f[e * kSgdFactors + kSgdMomentum] == 0.0 || f[e * kSgdFactors + kSgdActive] == 0.0,
                  "fused_ensemble_ext::member_sgd_: a member has momentum but no momentum buffers were given");
    }
  }
  const KernelTable& table = kernels();
  if (params[0].scalar_type() == at::kDouble) {
    sgd_chunks<double>(tasks, params, grads, momentum_buffers, f, nesterov, table.sgd_double);
  } else {
    sgd_chunks<float>(tasks, params, grads, momentum_buffers, f, nesterov, table.sgd_float);
  }
}

template <typename T>
void adamw_chunks(const std::vector<Task>& tasks, at::TensorList params, at::TensorList grads,
                  at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                  const double* f, void (*kernel)(const AdamWChunk<T>&)) {
  const int64_t members = params[0].size(0);
  const bool amsgrad = !max_exp_avg_sqs.empty();
  run_tasks(tasks, [&](const Task& task) {
    const double* factor = f + (task.param * members + task.member) * kAdamFactors;
    kernel({member_data<T>(params[task.param], task, members), member_data<T>(grads[task.param], task, members),
            member_data<T>(exp_avgs[task.param], task, members),
            member_data<T>(exp_avg_sqs[task.param], task, members),
            amsgrad ? member_data<T>(max_exp_avg_sqs[task.param], task, members) : nullptr, task.end - task.begin,
            static_cast<T>(factor[kAdamDecay]), static_cast<T>(factor[kAdamOneMinusBeta1]),
            static_cast<T>(factor[kAdamBeta2]), static_cast<T>(factor[kAdamOneMinusBeta2]),
            static_cast<T>(factor[kAdamBiasCorrection2Sqrt]), static_cast<T>(factor[kAdamEps]),
            static_cast<T>(factor[kAdamNegStepSize])});
  });
}

// torch.optim.AdamW for every active member slice, with this step's bias corrections.
void member_adamw_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   at::TensorList max_exp_avg_sqs, const at::Tensor& factors) {
  const std::vector<Task> tasks = plan("member_adamw_", params, factors, kAdamFactors, kAdamActive);
  check_list("member_adamw_", "grads", grads, params, false);
  check_list("member_adamw_", "exp_avgs", exp_avgs, params, false);
  check_list("member_adamw_", "exp_avg_sqs", exp_avg_sqs, params, false);
  check_list("member_adamw_", "max_exp_avg_sqs", max_exp_avg_sqs, params, true);
  const double* f = factors.data_ptr<double>();
  const KernelTable& table = kernels();
  if (params[0].scalar_type() == at::kDouble) {
    adamw_chunks<double>(tasks, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, f, table.adamw_double);
  } else {
    adamw_chunks<float>(tasks, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, f, table.adamw_float);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_ensemble_ext, CPU, m) {
  m.impl("member_sgd_", &member_sgd_);
  m.impl("member_adamw_", &member_adamw_);
}

}  // namespace fused_ensemble::cpu
