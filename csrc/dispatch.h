// Checks and helpers shared by the CPU operators (the kernels themselves: kernel_set.h).
#pragma once

#include <ATen/ATen.h>

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
