// Interface between the op layer (ensemble_reduce.cpp: checks, allocation, threading) and the row kernels
// (reduce_kernels_impl.h), which are compiled once per CPU capability (DEFAULT, AVX2, AVX512) so that one build
// runs on any x86-64 CPU and still uses the widest vectors the CPU has, as ATen does for its own kernels. The op
// layer reaches the kernels through the capability's table (kernel_table.h).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "../ensemble_reduce.h"

namespace fused_ensemble::cpu {

// Logits [N, R, K] with arbitrary (possibly zero) strides, counted in elements.
struct LogitsView {
  const void* data;
  c10::ScalarType dtype;
  int64_t members, rows, classes;
  int64_t stride_member, stride_row, stride_class;
};

// Outputs are contiguous; `out`/`aux`/... hold float, or double when the logits are double ("acc" type).
struct ForwardArgs {
  LogitsView x;
  Reduction reduction;
  void* out;  // [R, K] acc
  void* aux;  // [2, N, R] acc, for kMeanProbs and kLogMeanProbs only: member row max, then sum of exp(x - max)
};

struct BackwardArgs {
  LogitsView x;
  Reduction reduction;
  const void* grad_out;  // [R, K] acc
  const void* out;       // [R, K] acc
  const void* aux;       // [2, N, R] acc, for kMeanProbs and kLogMeanProbs (as ForwardArgs::aux)
  void* grad;            // [R, K] acc for kMean and kSoftmaxOfMean; [N, R, K] in the logits' dtype otherwise
};

struct StatsArgs {
  LogitsView x;
  void* probs;  // [R, K] acc
  void* entropy;
  void* expected_entropy;
  void* mutual_info;
  void* confidence;
  int64_t* prediction;
  void* disagreement;  // the per-row outputs above are [R] acc
};

}  // namespace fused_ensemble::cpu
