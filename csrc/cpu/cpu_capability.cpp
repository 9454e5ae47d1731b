#include "cpu_capability.h"

#include <ATen/Version.h>

#include <string>

#include "kernel_table.h"

namespace fused_ensemble::cpu {

Capability kernel_capability() {
  static const Capability capability = [] {
#ifdef FUSED_ENSEMBLE_X86_KERNELS
    const std::string name = at::get_cpu_capability();
    if (name == "AVX512") return Capability::kAvx512;
    if (name == "AVX2") return Capability::kAvx2;
#endif
    return Capability::kDefault;
  }();
  return capability;
}

const KernelTable& kernels() {
  switch (kernel_capability()) {
#ifdef FUSED_ENSEMBLE_X86_KERNELS
    case Capability::kAvx512:
      return AVX512::kernel_table();
    case Capability::kAvx2:
      return AVX2::kernel_table();
#endif
    default:
      return DEFAULT::kernel_table();
  }
}

}  // namespace fused_ensemble::cpu
