// The kernel table of one CPU capability. Include only from a kernels_<capability>.cpp, after its CPU_CAPABILITY
// definition and target pragma, so that every kernel below is compiled for that capability.
#include "kernel_table.h"
#include "member_optimizers_impl.h"
#include "reduce_kernels_impl.h"

namespace fused_ensemble::cpu::CPU_CAPABILITY {

const KernelTable& kernel_table() {
  static const KernelTable table{
      .reduce_forward = reduce_forward,
      .mean_flat = mean_flat,
      .reduce_backward = reduce_backward,
      .stats_forward = stats_forward,
      .sgd_float = member_sgd_chunk<float>,
      .sgd_double = member_sgd_chunk<double>,
      .adamw_float = member_adamw_chunk<float>,
      .adamw_double = member_adamw_chunk<double>,
  };
  return table;
}

}  // namespace fused_ensemble::cpu::CPU_CAPABILITY
