// The AVX2 + FMA (x86-64-v3): 8 floats per vector, one ymm register.
#include "kernel_set_prelude.h"

#if SME_X86_KERNEL_SETS
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#define SME_ISA_NS avx2
#define SME_VEC_BYTES 32
#include "kernel_set_body.h"
#pragma GCC pop_options

namespace sme {
const KernelSet kernels_avx2 = SME_KERNEL_SET("avx2");
}  // namespace sme
#endif
