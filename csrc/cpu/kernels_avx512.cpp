// The CPU kernels (reduction rows, optimizer updates) with 512-bit vectors, for the AVX-512 subset ATen's AVX512
// kernels use. As in the AVX2 file, the table's interface comes before the target pragma, and the pragma and the
// feature macros before at::vec is included.
#include "kernel_table.h"
#ifdef FUSED_ENSEMBLE_X86_KERNELS
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define FUSED_ENSEMBLE_TARGET_AVX512
#include "x86_feature_macros.h"
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "kernel_table_impl.h"
#endif
