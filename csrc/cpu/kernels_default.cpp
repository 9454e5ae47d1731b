// The CPU kernels (reduction rows, optimizer updates) for CPUs without AVX2 (and for every non-x86 CPU): at::vec
// picks its portable vectors, and the compiler vectorizes the optimizer loops for the baseline instruction set.
#define CPU_CAPABILITY DEFAULT
#include "kernel_table_impl.h"
