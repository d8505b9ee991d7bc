// Portable SIMD building blocks for the CPU kernels: GCC/Clang vector extensions of kLanes floats.
//
// The row kernels are compiled once per instruction set, each in its own translation unit
// (kernels_<isa>.cpp) with the vector width of its registers, SME_VEC_BYTES: 64 (16 floats) for
// AVX-512, 32 for AVX2, 16 for SSE2; 64 where nothing sets it. Everything here lives in the inline
// namespace SME_ISA_NS, so that each unit's copies of these inline helpers are distinct functions
// (the linker keeps one copy of a same-named inline function: it must not be another ISA's).
// Every helper is force-inlined into the kernel, and so compiled for its ISA.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#define SME_INLINE inline __attribute__((always_inline))

// The float16 conversions (convert_f16.cpp) are the only code still cloned per ISA this way.
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(__clang__)
#define SME_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SME_CLONES
#endif

#ifndef SME_VEC_BYTES
#define SME_VEC_BYTES 64
#endif
#ifndef SME_ISA_NS
#define SME_ISA_NS generic
#endif
#define SME_NAMESPACE_BEGIN \
  namespace sme {           \
  inline namespace SME_ISA_NS {
#define SME_NAMESPACE_END \
  }                       \
  }

SME_NAMESPACE_BEGIN

constexpr int kLanes = SME_VEC_BYTES / 4;
static_assert(kLanes == 4 || kLanes == 8 || kLanes == 16, "SME_VEC_BYTES must be 16, 32 or 64");
typedef float vf __attribute__((vector_size(SME_VEC_BYTES)));
typedef int32_t vi __attribute__((vector_size(SME_VEC_BYTES)));

constexpr float kInf = std::numeric_limits<float>::infinity();

SME_INLINE vf splat(float a) { return vf{} + a; }

SME_INLINE vf loadu(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

SME_INLINE void storeu(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

// The first k (< kLanes) floats of p, the other lanes set to fill. Written as a conditional
// element loop, which the AVX-512 and AVX2 clones turn into one masked load (never touching memory
// past p + k); a memcpy into a stack vector costs a store-forwarding stall instead.
SME_INLINE vf load_part(const float* p, int64_t k, float fill) {
  alignas(64) float tmp[kLanes];
  for (int l = 0; l < kLanes; ++l) tmp[l] = l < k ? p[l] : fill;
  return loadu(tmp);
}

SME_INLINE void store_part(float* p, vf v, int64_t k) {
  alignas(64) float tmp[kLanes];
  storeu(tmp, v);
  for (int l = 0; l < kLanes; ++l)
    if (l < k) p[l] = tmp[l];
}

// a > b ? a : b lane-wise (maxps semantics).
SME_INLINE vf vmax(vf a, vf b) { return a > b ? a : b; }

// Horizontal reductions by halving with shuffles (lane-by-lane indexing of a vector-extension type
// goes through the stack and cost more than the rest of a short row).
SME_INLINE vf swap_halves(vf v, int w) {
#if SME_VEC_BYTES == 64
  const vi idx = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
#elif SME_VEC_BYTES == 32
  const vi idx = {0, 1, 2, 3, 4, 5, 6, 7};
#else
  const vi idx = {0, 1, 2, 3};
#endif
  return __builtin_shuffle(v, (idx + w) & (kLanes - 1));
}

SME_INLINE float hmax(vf v) {
  for (int w = kLanes / 2; w > 0; w /= 2) v = vmax(v, swap_halves(v, w));
  return v[0];
}

// Pairwise, so that the rounding error does not grow with the lane count.
SME_INLINE float hsum(vf v) {
  for (int w = kLanes / 2; w > 0; w /= 2) v += swap_halves(v, w);
  return v[0];
}

// 2^y for y in [-126, 127] (NaN propagates): y = n + r with n = round(y), |r| <= 1/2; 2^r by a
// degree-6 polynomial fitted for relative error (1.6 ulp evaluated in float, exact at r = 0), 2^n
// from the bits. Adding magic = 1.5 * 2^23 + 127 rounds y to an integer held in the low mantissa
// bits, offset by the exponent bias, so that one shift makes 2^n.
SME_INLINE vf exp2_clamped(vf y) {
  const vf magic = splat(12583039.0f);
  const vf nb = y + magic;
  const vf r = y - (nb - magic);  // exact
  vf p = splat(1.5357408847e-04f);
  p = p * r + 1.3400306925e-03f;
  p = p * r + 9.6184331924e-03f;
  p = p * r + 5.5503286421e-02f;
  p = p * r + 2.4022647738e-01f;
  p = p * r + 6.9314718246e-01f;
  p = p * r + 1.0f;
  return p * (vf)((vi)nb << 23);
}

// exp(d) for d = a value minus its row's max or log-sum-exp, so d <= 0 up to rounding: computed as
// 2^(d log2 e), whose relative error grows like |d| * 6e-8 (the rounding of d log2 e), the same
// order as PyTorch's exp(x - lse) in float. d < -87.3 (and -inf) gives 0; d above 88 (never, for a
// real log-sum-exp) is held at 2^127 instead of inf, so no argument gives garbage.
SME_INLINE vf vexp_shifted(vf d) {
  const vf y = d * 1.44269504088896341f;
  vf yc = y < -126.0f ? splat(-126.0f) : y;  // NaN compares false and is kept
  yc = yc > 127.0f ? splat(127.0f) : yc;
  const vf e = exp2_clamped(yc);
  return y < -126.0f ? splat(0.0f) : e;
}

// The terms of a sum of exponentials shifted by its max (which holds exp(0) = 1): vexp_shifted
// without its selects; below -87.3 it gives exp(-87.3) ~ 1e-38 instead of 0, nothing next to
// that 1. A row whose max is -inf sums such terms instead of zeros, and its log-sum-exp stays
// -inf (the max plus a finite log).
SME_INLINE vf vexp_nonpos(vf d) {
  const vf y = d * 1.44269504088896341f;
  return exp2_clamped(y < -126.0f ? splat(-126.0f) : y);
}

// tanh(u) in float, within 4 ulp (3.75 measured over [-20, 20] in steps of 1e-5 and at 2e5 points
// from 1e-30 to 10): tanh|u| = -m / (2 + m) with m = expm1(-2|u|) in (-1, 0], the sign restored
// from u. expm1 is exp2_clamped's reduction 2^y = 2^n 2^r without its leading 1: 2^r - 1 =
// r q(r) keeps its relative accuracy as u -> 0, and 2^n (2^r - 1) + (2^n - 1) is exact enough for
// n < 0. One exp, one division and no branch select: the former Taylor/exp pair cost twice this.
// y is held at -30 (|u| > 10.4, where tanh rounds to 1); NaN stays NaN, +-inf gives +-1.
SME_INLINE vf vtanh(vf u) {
  const vi sign = (vi)u & static_cast<int32_t>(0x80000000u);
  const vf a = (vf)((vi)u ^ sign);
  vf y = a * -2.88539008177792682f;  // -2 |u| log2(e)
  y = y < -30.0f ? splat(-30.0f) : y;
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: y + magic rounds y to the integer n
  const vf nb = y + magic;
  const vf r = y - (nb - magic);  // exact, in [-0.5, 0.5]
  vf q = splat(1.5357408847e-04f);
  q = q * r + 1.3400306925e-03f;
  q = q * r + 9.6184331924e-03f;
  q = q * r + 5.5503286421e-02f;
  q = q * r + 2.4022647738e-01f;
  q = q * r + 6.9314718246e-01f;
  const vf scale = (vf)(((vi)nb - (vi)magic + 127) << 23);  // 2^n, n in [-30, 0]
  const vf m = scale * (r * q) + (scale - 1.0f);
  return (vf)((vi)(m / (-2.0f - m)) | sign);
}

// ln(x) in float, about 1 ulp, for normal x > 0 (sums of exponentials shifted by their max are >=
// 1), 0 (-> -inf), +inf and NaN: Cephes' logf, x = f * 2^e with f in [sqrt(1/2), sqrt(2)).
SME_INLINE vf vlog(vf x) {
  const vi bits = (vi)x;
  vi e = ((bits >> 23) & 0xff) - 126;
  vf f = (vf)((bits & 0x007fffff) | 0x3f000000);  // mantissa in [0.5, 1)
  const vi below = f < 0.707106781186547524f;     // lanes of -1 (true) or 0
  e += below;
  f = f - 1.0f + (vf)((vi)f & below);  // 2f - 1 where below, f - 1 elsewhere
  const vf fe = __builtin_convertvector(e, vf);
  const vf z = f * f;
  vf p = splat(7.0376836292e-2f);
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  vf y = p * f * z + fe * -2.12194440e-4f - 0.5f * z;
  vf r = f + y + fe * 0.693359375f;
  r = x == 0.0f ? splat(-kInf) : r;
  r = x == kInf ? splat(kInf) : r;
  return x != x ? x : r;
}

// Store 16 floats to a 16-byte aligned p bypassing the caches (movntps), for outputs far larger
// than the last-level cache: a normal store first reads every line it writes (read-for-ownership),
// which turns a 1 GB gradient write into 2 GB of traffic. Call stream_fence() before the data is
// used.
typedef float v4f __attribute__((vector_size(16)));
SME_INLINE void stream_store(float* p, vf v) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  const v4f* q = reinterpret_cast<const v4f*>(&v);
  for (int j = 0; j < kLanes / 4; ++j) __builtin_ia32_movntps(p + 4 * j, q[j]);
#else
  storeu(p, v);
#endif
}

SME_INLINE void stream_fence() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  __builtin_ia32_sfence();
#endif
}

SME_NAMESPACE_END
