// Which per-capability copy of the CPU kernels runs. Every kernel file (reduce_kernels_impl.h,
// member_optimizers_impl.h) is compiled once per CPU capability (DEFAULT, AVX2, AVX512; kernels_<capability>.cpp)
// so that one build runs on any x86-64 CPU and still uses the widest vectors the CPU has, as ATen does for its own
// kernels; kernels() (kernel_table.h) returns the table of the copy that runs. This header is included before the
// kernel files' `#pragma GCC target`, as is everything it and kernel_table.h include: none of it may include at::vec,
// which must be compiled for the capability.
#pragma once

// The AVX2/AVX512 copies are compiled with `#pragma GCC target`, which GCC supports on x86-64; elsewhere
// (clang, aarch64) only the DEFAULT copy is built and at::vec picks the platform's vectors by itself.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FUSED_ENSEMBLE_X86_KERNELS 1
#endif

namespace fused_ensemble::cpu {

enum class Capability { kDefault, kAvx2, kAvx512 };

// The widest vectors both the CPU and this torch build use (torch honours ATEN_CPU_CAPABILITY, so do we).
Capability kernel_capability();

}  // namespace fused_ensemble::cpu
