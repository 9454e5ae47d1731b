// CPU implementations of the ensemble-reduction ops (schemas and contract in csrc/ops.cpp): input checks, output
// allocation, threading over rows. The row kernels live in reduce_kernels_impl.h; the CUDA implementations of the
// same schemas are registered from csrc/cuda.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "kernel_table.h"

namespace fused_ensemble::cpu {
namespace {

// CPU logits that meet the kernel contract (../ensemble_reduce.h), as the row kernels read them.
LogitsView check_cpu_logits(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), "fused_ensemble_ext::", op, ": logits must be a CPU tensor here, got ",
              x.device());
  check_logits(x, op);
  return LogitsView{x.data_ptr(), x.scalar_type(), x.size(0),   x.size(1),
                    x.size(2),    x.stride(0),     x.stride(1), x.stride(2)};
}

at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Rows per task: enough member elements that a task outweighs the threading overhead, and no more, so that a
// handful of long rows (R = 64, K = 32000) still spreads over every thread.
int64_t row_grain(int64_t members, int64_t classes) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, members * classes));
}

// Checks an [R, K] (or [2, N, R]) tensor that backward receives from forward or autograd and returns it
// contiguous; these are small next to the logits.
at::Tensor check_saved(const at::Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), "fused_ensemble_ext::reduce_backward: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.sizes() == shape, "fused_ensemble_ext::reduce_backward: ", name, " must have shape ", shape,
              ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "fused_ensemble_ext::reduce_backward: ", name, " must be ", dtype,
              ", got ", t.scalar_type());
  return t.contiguous();
}

// short_rows chooses a CUDA kernel (see csrc/ops.cpp); the row kernels here take their short-row paths by themselves.
std::tuple<at::Tensor, at::Tensor> reduce_forward(const at::Tensor& x, c10::string_view reduction_name,
                                                  bool /*short_rows*/) {
  const Reduction reduction = parse_reduction(reduction_name, "reduce_forward");
  const LogitsView view = check_cpu_logits(x, "reduce_forward");
  const auto options = x.options().dtype(acc_dtype(x));
  at::Tensor out = at::empty({view.rows, view.classes}, options);
  at::Tensor aux = saves_member_softmax(reduction) ? at::empty({2, view.members, view.rows}, options)
                                                   : at::empty({0}, options);
  const ForwardArgs args{view, reduction, out.data_ptr(), aux.data_ptr()};
  const KernelTable& table = kernels();
  if (reduction == Reduction::kMean && view.stride_class == 1 && (view.rows == 1 || view.stride_row == view.classes)) {
    // Each member's [R, K] block is one run of memory: average it flat, whatever K is (K = 10 rows one by one
    // ran at half of eager torch.mean's speed).
    at::parallel_for(0, view.rows * view.classes, row_grain(view.members, 1),
                     [&](int64_t begin, int64_t end) { table.mean_flat(args, begin, end); });
    return {out, aux};
  }
  at::parallel_for(0, view.rows, row_grain(view.members, view.classes),
                   [&](int64_t begin, int64_t end) { table.reduce_forward(args, begin, end); });
  return {out, aux};
}

at::Tensor reduce_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& out,
                           const at::Tensor& aux, c10::string_view reduction_name) {
  const Reduction reduction = parse_reduction(reduction_name, "reduce_backward");
  const LogitsView view = check_cpu_logits(x, "reduce_backward");
  const at::ScalarType acc = acc_dtype(x);
  const at::Tensor grad_out_c = check_saved(grad_out, "grad_out", {view.rows, view.classes}, acc);
  const at::Tensor out_c = check_saved(out, "out", {view.rows, view.classes}, acc);
  at::Tensor aux_c = aux;
  at::Tensor grad;
  if (saves_member_softmax(reduction)) {
    aux_c = check_saved(aux, "aux (member row max and sum of exp)", {2, view.members, view.rows}, acc);
    grad = at::empty({view.members, view.rows, view.classes}, x.options());
  } else {
    grad = at::empty({view.rows, view.classes}, x.options().dtype(acc));
  }
  const BackwardArgs args{view, reduction, grad_out_c.data_ptr(), out_c.data_ptr(), aux_c.data_ptr(),
                          grad.data_ptr()};
  const KernelTable& table = kernels();
  at::parallel_for(0, view.rows, row_grain(view.members, view.classes),
                   [&](int64_t begin, int64_t end) { table.reduce_backward(args, begin, end); });
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> stats_forward(
    const at::Tensor& x, bool /*short_rows*/) {
  const LogitsView view = check_cpu_logits(x, "stats_forward");
  const auto options = x.options().dtype(acc_dtype(x));
  const int64_t R = view.rows;
  at::Tensor probs = at::empty({R, view.classes}, options);
  at::Tensor entropy = at::empty({R}, options);
  at::Tensor expected_entropy = at::empty({R}, options);
  at::Tensor mutual_info = at::empty({R}, options);
  at::Tensor confidence = at::empty({R}, options);
  at::Tensor prediction = at::empty({R}, x.options().dtype(at::kLong));
  at::Tensor disagreement = at::empty({R}, options);
  const StatsArgs args{view,
                       probs.data_ptr(),
                       entropy.data_ptr(),
                       expected_entropy.data_ptr(),
                       mutual_info.data_ptr(),
                       confidence.data_ptr(),
                       prediction.data_ptr<int64_t>(),
                       disagreement.data_ptr()};
  const KernelTable& table = kernels();
  at::parallel_for(0, R, row_grain(view.members, view.classes),
                   [&](int64_t begin, int64_t end) { table.stats_forward(args, begin, end); });
  return {probs, entropy, expected_entropy, mutual_info, confidence, prediction, disagreement};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_ensemble_ext, CPU, m) {
  m.impl("reduce_forward", &reduce_forward);
  m.impl("reduce_backward", &reduce_backward);
  m.impl("stats_forward", &stats_forward);
}

}  // namespace fused_ensemble::cpu
