// One-pass CPU updates for the per-member optimizers of fused_ensemble/optim.py (SGD and AdamW).
//
// Every parameter is [N, ...] with the member index first; member i's slice gets its own hyperparameters. The
// foreach version of the same update streams each stacked tensor through memory once per update term (five to
// nine passes); here one pass reads the parameter, gradient and state of a chunk and writes it back, for all
// members and parameters in one call (no Python loop over members or parameters). Frozen members are skipped.
//
// The per-(parameter, member) factors come from Python as a float64 tensor [P, N, F] (F factors, listed below per
// optimizer): derived values (1 - lr * wd, bias corrections) are computed there in float64, as torch.optim computes
// them in Python floats, and rounded here once to the parameter dtype. The element arithmetic follows
// torch.optim's single-tensor path operation by operation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace fused_ensemble::cpu {
namespace {

// Elements of one member slice per task: enough to outweigh the scheduling, few enough (64 KB of fp32 per
// tensor) that the update's tensors of a task stay in L2 and that a handful of large parameters still spread
// over every thread.
constexpr int64_t kTaskElements = 1 << 14;

// SGD factors, per (parameter, member).
enum SgdFactor { kSgdNegLr, kSgdWeightDecay, kSgdMomentum, kSgdGradScale, kSgdFirstStep, kSgdActive, kSgdFactors };
// AdamW factors, per (parameter, member).
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

struct Task {
  int64_t param, member, begin, end;  // elements [begin, end) of member `member`'s slice of parameter `param`
};

void check_list(const char* op, const char* name, at::TensorList list, at::TensorList params, bool may_be_empty) {
  if (may_be_empty && list.empty()) return;
  TORCH_CHECK(list.size() == params.size(), "fused_ensemble_ext::", op, ": ", name, " has ", list.size(),
              " tensors for ", params.size(), " parameters");
  for (size_t j = 0; j < list.size(); ++j) {
    TORCH_CHECK(list[j].device().is_cpu() && list[j].scalar_type() == params[j].scalar_type() &&
                    list[j].sizes() == params[j].sizes() && list[j].is_contiguous(),
                "fused_ensemble_ext::", op, ": ", name, "[", j, "] must be a contiguous CPU tensor of the ",
                "parameter's shape ", params[j].sizes(), " and dtype ", params[j].scalar_type(), ", got ",
                list[j].sizes(), " ", list[j].scalar_type(), list[j].is_contiguous() ? "" : " (not contiguous)");
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
    TORCH_CHECK(p.device().is_cpu() && p.scalar_type() == dtype && p.is_contiguous() && p.dim() > 0 &&
                    p.size(0) == members,
                "fused_ensemble_ext::", op, ": parameter ", j, " must be a contiguous CPU ", dtype,
                " tensor with ", members, " members in dim 0, got ", p.sizes(), " ", p.scalar_type());
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

// torch.optim.SGD, one member slice:
//   g = grad (+ weight_decay * p);  buf = g (first step) or momentum * buf + (1 - dampening) * g;
//   g = g + momentum * buf (nesterov) or buf;  p = p - lr * g.
// A member with momentum 0 uses no buffer; one with weight decay 0 adds nothing.
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
  AT_DISPATCH_FLOATING_TYPES(params[0].scalar_type(), "member_sgd_", [&] {
    run_tasks(tasks, [&](const Task& task) {
      const double* factor = f + (task.param * members + task.member) * kSgdFactors;
      const auto neg_lr = static_cast<scalar_t>(factor[kSgdNegLr]);
      const auto weight_decay = static_cast<scalar_t>(factor[kSgdWeightDecay]);
      const auto momentum = static_cast<scalar_t>(factor[kSgdMomentum]);
      const auto grad_scale = static_cast<scalar_t>(factor[kSgdGradScale]);
      const bool first_step = factor[kSgdFirstStep] != 0.0;
      const int64_t n = task.end - task.begin;
      scalar_t* p = member_data<scalar_t>(params[task.param], task, members);
      const scalar_t* grad = member_data<scalar_t>(grads[task.param], task, members);
      if (momentum == scalar_t(0)) {
        for (int64_t k = 0; k < n; ++k) {
          const scalar_t g = weight_decay != scalar_t(0) ? grad[k] + weight_decay * p[k] : grad[k];
          p[k] = p[k] + neg_lr * g;
        }
        return;
      }
      scalar_t* buf = member_data<scalar_t>(momentum_buffers[task.param], task, members);
      for (int64_t k = 0; k < n; ++k) {
        const scalar_t g = weight_decay != scalar_t(0) ? grad[k] + weight_decay * p[k] : grad[k];
        const scalar_t b = first_step ? g : buf[k] * momentum + grad_scale * g;
        buf[k] = b;
        p[k] = p[k] + neg_lr * (nesterov ? g + momentum * b : b);
      }
    });
  });
}

// NaN-propagating maximum, as torch.maximum.
template <typename T>
T maximum(T a, T b) {
  return (a != a || a > b) ? a : b;
}

// torch.optim.AdamW, one member slice, with this step's bias corrections:
//   p = p * (1 - lr * wd);  m = lerp(m, g, 1 - beta1);  v = beta2 * v + (1 - beta2) * g * g;
//   vmax = max(vmax, v) (amsgrad);  p = p - lr / bc1 * m / (sqrt(v or vmax) / sqrt(bc2) + eps).
void member_adamw_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   at::TensorList max_exp_avg_sqs, const at::Tensor& factors) {
  const std::vector<Task> tasks = plan("member_adamw_", params, factors, kAdamFactors, kAdamActive);
  check_list("member_adamw_", "grads", grads, params, false);
  check_list("member_adamw_", "exp_avgs", exp_avgs, params, false);
  check_list("member_adamw_", "exp_avg_sqs", exp_avg_sqs, params, false);
  check_list("member_adamw_", "max_exp_avg_sqs", max_exp_avg_sqs, params, true);
  const bool amsgrad = !max_exp_avg_sqs.empty();
  const int64_t members = params[0].size(0);
  const double* f = factors.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(params[0].scalar_type(), "member_adamw_", [&] {
    run_tasks(tasks, [&](const Task& task) {
      const double* factor = f + (task.param * members + task.member) * kAdamFactors;
      const auto decay = static_cast<scalar_t>(factor[kAdamDecay]);
      const auto weight = static_cast<scalar_t>(factor[kAdamOneMinusBeta1]);
      const auto beta2 = static_cast<scalar_t>(factor[kAdamBeta2]);
      const auto one_minus_beta2 = static_cast<scalar_t>(factor[kAdamOneMinusBeta2]);
      const auto bias_correction2_sqrt = static_cast<scalar_t>(factor[kAdamBiasCorrection2Sqrt]);
      const auto eps = static_cast<scalar_t>(factor[kAdamEps]);
      const auto neg_step_size = static_cast<scalar_t>(factor[kAdamNegStepSize]);
      const bool small_weight = std::abs(weight) < scalar_t(0.5);  // torch's lerp picks its formula by the weight
      const int64_t n = task.end - task.begin;
      scalar_t* p = member_data<scalar_t>(params[task.param], task, members);
      const scalar_t* grad = member_data<scalar_t>(grads[task.param], task, members);
      scalar_t* m = member_data<scalar_t>(exp_avgs[task.param], task, members);
      scalar_t* v = member_data<scalar_t>(exp_avg_sqs[task.param], task, members);
      scalar_t* v_max = amsgrad ? member_data<scalar_t>(max_exp_avg_sqs[task.param], task, members) : nullptr;
      for (int64_t k = 0; k < n; ++k) {
        const scalar_t g = grad[k];
        const scalar_t param = decay != scalar_t(1) ? p[k] * decay : p[k];
        const scalar_t diff = g - m[k];
        const scalar_t m_k = small_weight ? m[k] + weight * diff : g - diff * (scalar_t(1) - weight);
        const scalar_t v_k = v[k] * beta2 + one_minus_beta2 * g * g;
        m[k] = m_k;
        v[k] = v_k;
        scalar_t second = v_k;
        if (amsgrad) {
          second = maximum(v_max[k], v_k);
          v_max[k] = second;
        }
        const scalar_t denom = std::sqrt(second) / bias_correction2_sqrt + eps;
        p[k] = param + neg_step_size * (m_k / denom);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fused_ensemble_ext, m) {
  m.def("member_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor factors, "
        "bool nesterov) -> ()");
  m.def("member_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor(d!)[] max_exp_avg_sqs, Tensor factors) -> ()");
}

TORCH_LIBRARY_IMPL(fused_ensemble_ext, CPU, m) {
  m.impl("member_sgd_", &member_sgd_);
  m.impl("member_adamw_", &member_adamw_);
}

}  // namespace fused_ensemble::cpu
