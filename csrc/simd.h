// Portable SIMD building blocks for the CPU kernels: GCC/Clang vector extensions of 16 floats.
//
// Every helper is force-inlined so that it is compiled for the instruction set of the function it
// lands in: the row kernels are built once per ISA (AVX-512, AVX2, baseline) with target_clones and
// picked at load time, instead of -march=native, so a built extension still runs on older CPUs.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#define SME_INLINE inline __attribute__((always_inline))

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(__clang__)
#define SME_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SME_CLONES
#endif

namespace sme {

constexpr int kLanes = 16;
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));

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
  const vi idx = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
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

// exp(r) - 1 - r for |r| <= ln2 / 2, the degree-6 Cephes polynomial (about 1 ulp in exp).
SME_INLINE vf expm1_poly(vf r) {
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * (r * r);
}

// Range reduction shared by the exps: x = n ln2 + r (Cody-Waite, two steps), and 2^n as float bits.
// Adding magic = 1.5 * 2^23 + 127 rounds x / ln2 to an integer held in the low mantissa bits, offset
// by the exponent bias, so that one shift makes 2^n.
SME_INLINE vf exp_reduced(vf xc) {
  const vf magic = splat(12583039.0f);
  const vf nb = xc * 1.44269504088896341f + magic;
  const vf n = nb - magic;
  vf r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  return (expm1_poly(r) + r + 1.0f) * (vf)((vi)nb << 23);
}

// exp(x) in float, about 1 ulp on [-87.3, 88]: NaN propagates; x < -87.3 (and -inf) gives 0,
// x > 88 inf.
SME_INLINE vf vexp(vf x) {
  const vf lo = splat(-87.3365447505f), hi = splat(88.0f);
  vf xc = x < lo ? lo : x;  // NaN compares false and is kept
  xc = xc > hi ? hi : xc;
  const vf res = exp_reduced(xc);
  return x > hi ? splat(kInf) : (x < lo ? splat(0.0f) : res);
}

// exp(x) for x <= 0 or NaN, the terms of a sum of exponentials shifted by its max (which holds
// exp(0) = 1): vexp less its overflow and underflow selects, a third of the forward's arithmetic.
// Below -87.3 it returns exp(-87.3) ~ 1e-38 instead of 0, nothing next to that 1. A row whose max
// is -inf sums such terms instead of zeros, and its log-sum-exp stays -inf (the max plus a finite
// log).
SME_INLINE vf vexp_nonpos(vf x) {
  const vf lo = splat(-87.3365447505f);
  return exp_reduced(x < lo ? lo : x);
}

// ln(x) in float, about 1 ulp, for normal x > 0 (sums of exponentials shifted by their max are >= 1),
// 0 (-> -inf), +inf and NaN: Cephes' logf, x = f * 2^e with f in [sqrt(1/2), sqrt(2)).
SME_INLINE vf vlog(vf x) {
  const vi bits = (vi)x;
  vi e = ((bits >> 23) & 0xff) - 126;
  vf f = (vf)((bits & 0x007fffff) | 0x3f000000);  // mantissa in [0.5, 1)
  const vi below = f < 0.707106781186547524f;       // lanes of -1 (true) or 0
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

SME_INLINE float sexp(float x) { return vexp(splat(x))[0]; }

// Store 16 floats to a 16-byte aligned p bypassing the caches (movntps), for outputs far larger than
// the last-level cache: a normal store first reads every line it writes (read-for-ownership), which
// turns a 1 GB gradient write into 2 GB of traffic. Call stream_fence() before the data is used.
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

}  // namespace sme
