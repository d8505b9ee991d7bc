// The AVX-512 (x86-64-v4): 16 floats per vector, one zmm register.
#include "kernel_set_prelude.h"

#if SME_X86_KERNEL_SETS
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define SME_ISA_NS avx512
#define SME_VEC_BYTES 64
#include "kernel_set_body.h"
#pragma GCC pop_options

namespace sme {
const KernelSet kernels_avx512 = SME_KERNEL_SET("avx512");
}  // namespace sme
#endif
