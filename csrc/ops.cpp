// The fused_ensemble_ext operator library: every schema, and the Python module whose import loads the library.
// Each device registers its implementations: csrc/cpu (ensemble_reduce.cpp, member_optimizers.cpp) and, in a build
// with CUDA, csrc/cuda (ensemble_reduce.cu, member_optimizers.cu).
//
// Contract of the reduction ops (shared with the Triton kernels): logits are [N, R, K] with arbitrary strides (zero
// strides included; never made contiguous), checked as ensemble_reduce.h says. Outputs are float32, or float64 for
// float64 logits. The optimizer ops take their tensors and factors as member_optimizer_factors.h says.
#include <Python.h>
#include <torch/library.h>

// Importing fused_ensemble._C loads this library, and with it every TORCH_LIBRARY registration of csrc/; the
// module itself is empty (the pytorch/extension-cpp pattern, which keeps the build on the limited Python API).
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

// short_rows asks the CUDA implementations for the short-row kernel (csrc/cuda/ensemble_reduce_short_rows.cu: rows of
// at most 16 classes stored row after row) wherever it applies. It is opt-in until it has passed the GPU tests and
// been timed against the row kernel on a GPU; an argument rather than an environment variable read by the launcher,
// so that each call states its choice. The CPU implementations accept it and ignore it: their short-row paths are
// always on.
TORCH_LIBRARY(fused_ensemble_ext, m) {
  m.def("reduce_forward(Tensor logits, str reduction, bool short_rows=False) -> (Tensor, Tensor)");
  m.def("reduce_backward(Tensor grad_out, Tensor logits, Tensor out, Tensor aux, str reduction) -> Tensor");
  m.def("stats_forward(Tensor logits, bool short_rows=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
        "Tensor)");
  m.def("member_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor factors, "
        "bool nesterov) -> ()");
  m.def("member_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor(d!)[] max_exp_avg_sqs, Tensor factors) -> ()");
}
