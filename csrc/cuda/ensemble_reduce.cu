// CUDA implementations of the ensemble-reduction ops (schemas in csrc/ops.cpp):
// argument checks, output allocation, device guard; the kernels are in ensemble_reduce_forward.cu and
// ensemble_reduce_backward.cu. Every kernel runs on the current stream of the input's device.
#include "../ensemble_reduce.h"
#include "ensemble_reduce_launch.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <climits>
#include <string>
#include <tuple>
#include <vector>

namespace fused_ensemble::cuda {
namespace {

at::ScalarType accumulate_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// CUDA logits that meet the kernel contract (../ensemble_reduce.h) and the index types of these kernels.
void check_cuda_logits(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), "fused_ensemble_ext::", op, " (CUDA): logits must be a CUDA tensor, got device ",
              x.device());
  check_logits(x, op);
  // Columns index registers as int (argmax), with room for the padding of the last tile.
  TORCH_CHECK(x.size(2) <= INT_MAX - (1 << 20), "fused_ensemble_ext::", op, " (CUDA): too many classes: ",
              x.size(2));
  TORCH_CHECK(x.size(1) <= INT_MAX, "fused_ensemble_ext::", op, " (CUDA): too many rows: ", x.size(1));
}

void check_same_device(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), "fused_ensemble_ext::reduce_backward (CUDA): ", name, " is on ",
              t.device(), " but logits are on ", x.device());
}

std::tuple<at::Tensor, at::Tensor> reduce_forward_cuda(const at::Tensor& logits, c10::string_view reduction,
                                                       bool short_rows) {
  check_cuda_logits(logits, "reduce_forward");
  const Reduction red = parse_reduction(reduction, "reduce_forward");
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const int64_t N = logits.size(0), R = logits.size(1), K = logits.size(2);
  const auto opts = logits.options().dtype(accumulate_dtype(logits.scalar_type()));
  at::Tensor out = at::empty({R, K}, opts);
  at::Tensor aux = saves_member_softmax(red) ? at::empty({2, N, R}, opts) : at::empty({0}, opts);
  launch_reduce_forward(logits, red, out, aux, short_rows);
  return {out, aux};
}

at::Tensor reduce_backward_cuda(const at::Tensor& grad_out, const at::Tensor& logits, const at::Tensor& out,
                                const at::Tensor& aux, c10::string_view reduction) {
  check_cuda_logits(logits, "reduce_backward");
  const Reduction red = parse_reduction(reduction, "reduce_backward");
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const int64_t N = logits.size(0), R = logits.size(1), K = logits.size(2);
  const auto acc = accumulate_dtype(logits.scalar_type());
  check_same_device(grad_out, logits, "grad_out");
  check_same_device(out, logits, "out");
  const std::vector<int64_t> rk{R, K};
  TORCH_CHECK(grad_out.sizes() == rk, "fused_ensemble_ext::reduce_backward (CUDA): grad_out must have shape ",
              c10::IntArrayRef(rk), " (rows, classes of the logits), got ", grad_out.sizes());
  TORCH_CHECK(out.sizes() == rk, "fused_ensemble_ext::reduce_backward (CUDA): out must have shape ",
              c10::IntArrayRef(rk), ", got ", out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == acc && out.scalar_type() == acc,
              "fused_ensemble_ext::reduce_backward (CUDA): grad_out and out must be ", acc, " for ",
              logits.scalar_type(), " logits, got ", grad_out.scalar_type(), " and ", out.scalar_type());
  if (saves_member_softmax(red)) {
    // aux (the member row max and sum of exp) is only checked: the kernel recomputes both from the logits it reads
    // anyway.
    const std::vector<int64_t> two_nr{2, N, R};
    TORCH_CHECK(aux.sizes() == two_nr,
                "fused_ensemble_ext::reduce_backward (CUDA): aux (member row max and sum of exp) must have shape ",
                c10::IntArrayRef(two_nr), " for reduction '", std::string(reduction.data(), reduction.size()),
                "', got ", aux.sizes());
  }
  // The contract passes contiguous grad_out/out; a strided grad_out from autograd is made contiguous here
  // (it is [R, K], small next to [N, R, K]).
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor o = out.contiguous();
  at::Tensor grad;
  if (red == Reduction::kMean || red == Reduction::kSoftmaxOfMean) {
    grad = at::empty({R, K}, out.options());
  } else {
    grad = at::empty({N, R, K}, logits.options());
  }
  launch_reduce_backward(g, logits, o, red, grad);
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> stats_forward_cuda(
    const at::Tensor& logits, bool short_rows) {
  check_cuda_logits(logits, "stats_forward");
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const int64_t R = logits.size(1), K = logits.size(2);
  const auto opts = logits.options().dtype(accumulate_dtype(logits.scalar_type()));
  StatsOutputs o;
  o.probs = at::empty({R, K}, opts);
  o.entropy = at::empty({R}, opts);
  o.expected_entropy = at::empty({R}, opts);
  o.mutual_info = at::empty({R}, opts);
  o.confidence = at::empty({R}, opts);
  o.prediction = at::empty({R}, opts.dtype(at::kLong));
  o.disagreement = at::empty({R}, opts);
  launch_stats_forward(logits, o, short_rows);
  return {o.probs, o.entropy, o.expected_entropy, o.mutual_info, o.confidence, o.prediction, o.disagreement};
}

}  // namespace
}  // namespace fused_ensemble::cuda

TORCH_LIBRARY_IMPL(fused_ensemble_ext, CUDA, m) {
  m.impl("reduce_forward", &fused_ensemble::cuda::reduce_forward_cuda);
  m.impl("reduce_backward", &fused_ensemble::cuda::reduce_backward_cuda);
  m.impl("stats_forward", &fused_ensemble::cuda::stats_forward_cuda);
}
