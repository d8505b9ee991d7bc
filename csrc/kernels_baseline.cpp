// The kernels for any CPU: on x86-64 the baseline ISA (SSE2, 4 floats per vector, one xmm
// register); elsewhere 16-float vectors that the compiler maps onto the target's own registers.
#include "kernel_set_prelude.h"

#define SME_ISA_NS baseline
#if SME_X86_KERNEL_SETS
#define SME_VEC_BYTES 16
#endif
#include "kernel_set_body.h"

namespace sme {
const KernelSet kernels_baseline = SME_KERNEL_SET("baseline");
}  // namespace sme
