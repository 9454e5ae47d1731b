// The row kernels for CPUs without AVX2 (and for every non-x86 CPU): at::vec picks its portable vectors.
#define CPU_CAPABILITY DEFAULT
#include "reduce_kernels_impl.h"
