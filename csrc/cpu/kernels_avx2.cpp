// The CPU kernels (reduction rows, optimizer updates) with 256-bit vectors. The target pragma comes before at::vec
// is included so that every function it defines here is compiled for AVX2 + FMA (the flags ATen's own AVX2 kernels
// use); GCC does not define the feature macros for a pragma, and sleef.h declares its vector functions only under
// them, so they are set here. The table's interface, and the ATen and c10 headers it includes, come before the
// pragma: their inline functions are shared with the rest of the library and must run on any CPU.
#include "kernel_table.h"
#ifdef FUSED_ENSEMBLE_X86_KERNELS
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#include "x86_feature_macros.h"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "kernel_table_impl.h"
#endif
