// The body of one kernel set: included by kernels_<isa>.cpp after it has included everything this
// needs from outside csrc/ (so that none of it is compiled for the ISA: an inline function of
// ATen's or the standard library's compiled with AVX2 could be the copy the linker keeps for the
// whole library) and set SME_ISA_NS, SME_VEC_BYTES and, with `#pragma GCC target`, the ISA.
// Defines SME_KERNEL_SET(name), the KernelSet initializer of this ISA's kernels.
#pragma once

#include "ce_kernels.h"
#include "softmax_kernels.h"

SME_NAMESPACE_BEGIN
namespace {

// The four storage types' entry points of the force-inlined template name<T>.
#define SME_TYPED_ENTRIES(name, Args)                                               \
  __attribute__((noinline)) void name##_f32(const Args& a, int64_t b, int64_t e) {  \
    name<float>(a, b, e);                                                           \
  }                                                                                 \
  __attribute__((noinline)) void name##_f64(const Args& a, int64_t b, int64_t e) {  \
    name<double>(a, b, e);                                                          \
  }                                                                                 \
  __attribute__((noinline)) void name##_bf16(const Args& a, int64_t b, int64_t e) { \
    name<c10::BFloat16>(a, b, e);                                                   \
  }                                                                                 \
  __attribute__((noinline)) void name##_f16(const Args& a, int64_t b, int64_t e) {  \
    name<c10::Half>(a, b, e);                                                       \
  }

SME_TYPED_ENTRIES(softmax_fwd_rows, SoftmaxFwdArgs)
SME_TYPED_ENTRIES(softmax_bwd_rows, SoftmaxBwdArgs)
SME_TYPED_ENTRIES(softmax_fwd_tiles, SoftmaxFwdArgs)
SME_TYPED_ENTRIES(softmax_bwd_tiles, SoftmaxBwdArgs)
SME_TYPED_ENTRIES(ce_index_fwd_rows, IndexFwdArgs)
SME_TYPED_ENTRIES(ce_index_bwd_rows, IndexBwdArgs)
SME_TYPED_ENTRIES(ce_soft_fwd_rows, SoftFwdArgs)
SME_TYPED_ENTRIES(ce_soft_bwd_rows, SoftBwdArgs)
#undef SME_TYPED_ENTRIES

}  // namespace
SME_NAMESPACE_END

#define SME_TYPED(name) {&name##_f32, &name##_f64, &name##_bf16, &name##_f16}
#define SME_KERNEL_SET(isa_name) \
  {isa_name,                     \
   kLanes,                       \
   SME_TYPED(softmax_fwd_rows),  \
   SME_TYPED(softmax_fwd_tiles), \
   SME_TYPED(softmax_bwd_rows),  \
   SME_TYPED(softmax_bwd_tiles), \
   SME_TYPED(ce_index_fwd_rows), \
   SME_TYPED(ce_index_bwd_rows), \
   SME_TYPED(ce_soft_fwd_rows),  \
   SME_TYPED(ce_soft_bwd_rows)}
