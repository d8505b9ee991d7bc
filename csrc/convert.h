// Storage types (float, double, bfloat16, float16) to and from the accumulation type, chunk-wise.
// float32 and float64 data are used in place; half types are widened into a stack buffer.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "simd.h"

namespace sme {

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

// float16 <-> float32 with integer vector operations, 16 values at a time: a _Float16 cast compiles
// to a library call per value where the CPU has no AVX512-FP16 (measured: fp16 cross-entropy 4x
// slower than bf16 at 4096 x 1000). Exact: every half converts to its float; floats round to
// nearest even (subnormals, inf and NaN included).
typedef uint16_t vh __attribute__((vector_size(32)));
typedef uint32_t vu __attribute__((vector_size(64)));

SME_INLINE vf half_to_float(vh h16) {
  const vu h = __builtin_convertvector(h16, vu);
  const vu u = (h & 0x7fffu) << 13;
  vu bits = (vu)((vf)u * 0x1p112f);  // rebias the exponent; subnormal halves become normal floats
  bits = (h & 0x7c00u) == 0x7c00u ? (u | 0x7f800000u) : bits;  // inf and NaN
  return (vf)(bits | ((h & 0x8000u) << 16));
}

SME_INLINE vh float_to_half(vf f) {
  vu u = (vu)f;
  const vu sign = u & 0x80000000u;
  u ^= sign;
  // normal halves: rebias, then round the 13 dropped bits to nearest even
  const vu normal = (u + (0u - (112u << 23)) + 0xfffu + ((u >> 13) & 1u)) >> 13;
  // subnormal halves and zero: adding 0.5 aligns the mantissa so that the FPU rounds it
  const vu magic = vu{} + (126u << 23);
  const vu sub = (vu)((vf)u + (vf)magic) - magic;
  vu o = u < (113u << 23) ? sub : normal;
  o = u >= (143u << 23) ? (u > 0x7f800000u ? vu{} + 0x7e00u : vu{} + 0x7c00u) : o;
  return __builtin_convertvector(o | (sign >> 16), vh);
}

SME_INLINE const float* to_acc(const c10::Half* src, int64_t n, float* buf) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    vh h;
    std::memcpy(&h, src + i, sizeof h);
    storeu(buf + i, half_to_float(h));
  }
  if (i < n) {
    vh h{};
    std::memcpy(&h, src + i, (n - i) * sizeof(uint16_t));
    alignas(64) float tmp[kLanes];
    storeu(tmp, half_to_float(h));
    std::memcpy(buf + i, tmp, (n - i) * sizeof(float));
  }
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

SME_INLINE void from_acc(const float* src, int64_t n, c10::Half* dst) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const vh h = float_to_half(loadu(src + i));
    std::memcpy(dst + i, &h, sizeof h);
  }
  if (i < n) {
    alignas(64) float tmp[kLanes] = {};
    std::memcpy(tmp, src + i, (n - i) * sizeof(float));
    const vh h = float_to_half(loadu(tmp));
    std::memcpy(dst + i, &h, (n - i) * sizeof(uint16_t));
  }
}

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

}  // namespace sme
