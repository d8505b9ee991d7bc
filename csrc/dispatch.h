// Glue between ATen tensors and the ISA-cloned row kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "convert.h"

// Defines `name##_<T>` for the four storage types as ISA-cloned, non-inlined entry points over a
// range of work items [begin, end), each calling the force-inlined template `name<T>`.
#define SME_CLONED_ENTRY(name, Args)                                                            \
  SME_CLONES void name##_f32(const Args& a, int64_t b, int64_t e) { name<float>(a, b, e); }     \
  SME_CLONES void name##_f64(const Args& a, int64_t b, int64_t e) { name<double>(a, b, e); }    \
  SME_CLONES void name##_bf16(const Args& a, int64_t b, int64_t e) {                            \
    name<c10::BFloat16>(a, b, e);                                                               \
  }                                                                                             \
  SME_CLONES void name##_f16(const Args& a, int64_t b, int64_t e) { name<c10::Half>(a, b, e); } \
  void name##_run(at::ScalarType st, const Args& a, int64_t n, int64_t grain) {                 \
    at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) {                                   \
      switch (st) {                                                                             \
        case at::kFloat:                                                                        \
          return name##_f32(a, b, e);                                                           \
        case at::kDouble:                                                                       \
          return name##_f64(a, b, e);                                                           \
        case at::kBFloat16:                                                                     \
          return name##_bf16(a, b, e);                                                          \
        case at::kHalf:                                                                         \
          return name##_f16(a, b, e);                                                           \
        default:                                                                                \
          TORCH_CHECK(false, "softmax_ext: unsupported dtype ", st);                            \
      }                                                                                         \
    });                                                                                         \
  }

namespace sme {

inline void check_floating(const at::Tensor& t, const char* op) {
  const auto st = t.scalar_type();
  TORCH_CHECK_NOT_IMPLEMENTED(
      st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
      "softmax_ext::", op, ": expected float32, float64, bfloat16 or float16 input, got ", st);
}

inline at::ScalarType acc_type(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

// Rows per parallel task so that a task touches at least ~32K values.
inline int64_t grain_for(int64_t per_item) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, per_item));
}

}  // namespace sme
