// float16 <-> float32 conversion of runs of values, with the CPU's conversion instructions where it
// has them (AVX-512 or F16C, picked once at load time), or exact integer arithmetic elsewhere.
//
// Out of line on purpose: the baseline kernel set cannot use ISA-specific intrinsics, and GCC
// turns a vector _Float16 cast into one conversion per value (or a library call per value on the
// baseline ISA). One call converts a whole chunk or block.
#pragma once

#include <c10/util/Half.h>

#include <cstdint>

namespace sme {

// dst[i] = float(src[i]) for i < n: exact (subnormals, inf and NaN included).
void f16_to_f32(const c10::Half* src, int64_t n, float* dst);

// dst[i] = half(src[i]) for i < n, rounded to nearest even; overflow gives inf, NaN stays NaN.
void f32_to_f16(const float* src, int64_t n, c10::Half* dst);

// Which implementation the two functions use: "avx512", "f16c" or "portable". SOFTMAX_EXT_F16C=0
// in the environment forces "portable" (the tests compare both on every half value).
const char* f16_conversion_impl();

// The portable implementation, callable directly so that tests can compare it with the other.
void f16_to_f32_portable(const c10::Half* src, int64_t n, float* dst);
void f32_to_f16_portable(const float* src, int64_t n, c10::Half* dst);

}  // namespace sme
