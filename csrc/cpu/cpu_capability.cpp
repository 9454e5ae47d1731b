#include "cpu_capability.h"

#include <ATen/Version.h>

#include <string>

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

}  // namespace fused_ensemble::cpu
