// The CPU kernels of every op, one table per CPU capability (see cpu_capability.h): the op files
// (ensemble_reduce.cpp, member_optimizers.cpp) check, allocate and split the work over threads, then call the
// kernels of the table that kernels() picks for this CPU. Each kernels_<capability>.cpp fills its table
// (kernel_table_impl.h).
#pragma once

#include <cstdint>

#include "cpu_capability.h"
#include "member_optimizers.h"
#include "reduce_kernels.h"

namespace fused_ensemble::cpu {

struct KernelTable {
  // Each reduction kernel handles rows [row_begin, row_end); the caller splits rows over threads. mean_flat is the
  // "mean" forward for logits whose [R, K] block is contiguous within each member (stride_class 1, stride_row K):
  // it handles flat elements [begin, end) of that block, so short rows (K = 10) vectorize as well as long ones.
  void (*reduce_forward)(const ForwardArgs&, int64_t row_begin, int64_t row_end);
  void (*mean_flat)(const ForwardArgs&, int64_t begin, int64_t end);
  void (*reduce_backward)(const BackwardArgs&, int64_t row_begin, int64_t row_end);
  void (*stats_forward)(const StatsArgs&, int64_t row_begin, int64_t row_end);
  // Each optimizer kernel updates one chunk of one member's slice; the caller splits the slices over threads.
  void (*sgd_float)(const SgdChunk<float>&);
  void (*sgd_double)(const SgdChunk<double>&);
  void (*adamw_float)(const AdamWChunk<float>&);
  void (*adamw_double)(const AdamWChunk<double>&);
};

// The table of kernel_capability().
const KernelTable& kernels();

namespace DEFAULT {
const KernelTable& kernel_table();
}
#ifdef FUSED_ENSEMBLE_X86_KERNELS
namespace AVX2 {
const KernelTable& kernel_table();
}
namespace AVX512 {
const KernelTable& kernel_table();
}
#endif

}  // namespace fused_ensemble::cpu
