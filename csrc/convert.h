// Storage types (float, double, bfloat16, float16) to and from the accumulation type, chunk-wise.
// float32 and float64 data are used in place; half types are widened into a stack buffer.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "convert_f16.h"
#include "simd.h"

SME_NAMESPACE_BEGIN

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Values a row is walked in: fits L1 with its buffers, long enough to amortise the merge step.
constexpr int64_t kChunk = 2048;

SME_INLINE const float* to_acc(const float* src, int64_t, float*) { return src; }
SME_INLINE const double* to_acc(const double* src, int64_t, double*) { return src; }

SME_INLINE const float* to_acc(const c10::BFloat16* src, int64_t n, float* buf) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(buf);
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
  return buf;
}

// float16 goes through the CPU's conversion instructions (convert_f16.h), a chunk per call.
SME_INLINE const float* to_acc(const c10::Half* src, int64_t n, float* buf) {
  f16_to_f32(src, n, buf);
  return buf;
}

// Round to nearest even; NaN stays a (quiet) NaN.
SME_INLINE void from_acc(const float* src, int64_t n, c10::BFloat16* dst) {
  const uint32_t* s = reinterpret_cast<const uint32_t*>(src);
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = s[i];
    const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
    const uint16_t rounded = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    d[i] = nan ? static_cast<uint16_t>((u >> 16) | 0x40u) : rounded;
  }
}

SME_INLINE void from_acc(const float* src, int64_t n, c10::Half* dst) { f32_to_f16(src, n, dst); }

SME_INLINE void from_acc(const float* src, int64_t n, float* dst) {
  if (src != dst) std::memcpy(dst, src, n * sizeof(float));
}
SME_INLINE void from_acc(const double* src, int64_t n, double* dst) {
  if (src != dst) std::memcpy(dst, src, n * sizeof(double));
}

// Where a chunk's results go before from_acc: straight into the output for float32/float64.
template <typename T>
SME_INLINE acc_t<T>* out_chunk(T* dst, acc_t<T>* buf) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    return dst;
  } else {
    return buf;
  }
}

template <typename T>
SME_INLINE acc_t<T> load1(const T* p) {
  return static_cast<acc_t<T>>(*p);
}

SME_NAMESPACE_END
