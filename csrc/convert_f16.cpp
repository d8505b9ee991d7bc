#include "convert_f16.h"

#include <cstdlib>
#include <cstring>

#include "simd.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SME_X86_F16 1
#else
#define SME_X86_F16 0
#endif

namespace sme {
namespace {

// ---- portable: integer vector operations, 16 values at a time ----------------------------------

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

#if SME_X86_F16
// 16 values per instruction; the tail through masked loads and stores (never past n). The
// zero-masking forms, with every lane selected in the loop, spare GCC's headers their
// "may be used uninitialized" placeholder.
__attribute__((target("avx512f,avx512bw,avx512vl,f16c"))) void f16_to_f32_avx512(
    const c10::Half* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i,
                     _mm512_maskz_cvtph_ps(
                         0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
  if (i < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(dst + i, k,
                          _mm512_maskz_cvtph_ps(k, _mm256_maskz_loadu_epi16(k, src + i)));
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl,f16c"))) void f32_to_f16_avx512(const float* src,
                                                                                 int64_t n,
                                                                                 c10::Half* dst) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm512_maskz_cvtps_ph(0xffff, _mm512_loadu_ps(src + i), kRound));
  if (i < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm256_mask_storeu_epi16(dst + i, k,
                             _mm512_maskz_cvtps_ph(k, _mm512_maskz_loadu_ps(k, src + i), kRound));
  }
}

// 8 values per instruction; a tail of fewer than 8 goes through a small buffer.
__attribute__((target("avx,f16c"))) void f16_to_f32_f16c(const c10::Half* src, int64_t n,
                                                         float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  if (i < n) {
    alignas(16) uint16_t h[8] = {};
    alignas(32) float f[8];
    std::memcpy(h, src + i, (n - i) * sizeof(uint16_t));
    _mm256_store_ps(f, _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(h))));
    std::memcpy(dst + i, f, (n - i) * sizeof(float));
  }
}

__attribute__((target("avx,f16c"))) void f32_to_f16_f16c(const float* src, int64_t n,
                                                         c10::Half* dst) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), kRound));
  if (i < n) {
    alignas(32) float f[8] = {};
    alignas(16) uint16_t h[8];
    std::memcpy(f, src + i, (n - i) * sizeof(float));
    _mm_store_si128(reinterpret_cast<__m128i*>(h), _mm256_cvtps_ph(_mm256_load_ps(f), kRound));
    std::memcpy(dst + i, h, (n - i) * sizeof(uint16_t));
  }
}
#endif

struct Impl {
  void (*to_f32)(const c10::Half*, int64_t, float*);
  void (*to_f16)(const float*, int64_t, c10::Half*);
  const char* name;
};

Impl pick() {
  const char* env = std::getenv("SOFTMAX_EXT_F16C");
  const bool allowed = env == nullptr || std::strcmp(env, "0") != 0;
#if SME_X86_F16
  if (allowed) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
      return {f16_to_f32_avx512, f32_to_f16_avx512, "avx512"};
    if (__builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c"))
      return {f16_to_f32_f16c, f32_to_f16_f16c, "f16c"};
  }
#else
  (void)allowed;
#endif
  return {f16_to_f32_portable, f32_to_f16_portable, "portable"};
}

const Impl& impl() {
  static const Impl chosen = pick();
  return chosen;
}

}  // namespace

SME_CLONES void f16_to_f32_portable(const c10::Half* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    vh h;
    std::memcpy(&h, src + i, sizeof h);
    storeu(dst + i, half_to_float(h));
  }
  if (i < n) {
    vh h{};
    std::memcpy(&h, src + i, (n - i) * sizeof(uint16_t));
    alignas(64) float tmp[kLanes];
    storeu(tmp, half_to_float(h));
    std::memcpy(dst + i, tmp, (n - i) * sizeof(float));
  }
}

SME_CLONES void f32_to_f16_portable(const float* src, int64_t n, c10::Half* dst) {
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

void f16_to_f32(const c10::Half* src, int64_t n, float* dst) { impl().to_f32(src, n, dst); }

void f32_to_f16(const float* src, int64_t n, c10::Half* dst) { impl().to_f16(src, n, dst); }

const char* f16_conversion_impl() { return impl().name; }

}  // namespace sme
