// Short rows, kLanes at a time, held transposed: element (row l, class c) of a block sits at
// buf[c * kLanes + l], so one vector instruction works on the same class of 16 rows.
//
// For rows of a few dozen classes the per-row path (row_ops.h) spends its time on what every row
// pays once: masked tail loads, horizontal max and sum, a scalar log. Here those become one
// vertical operation per class and one vector log per 16 rows (measured at 256 x 10 float32: the
// cross-entropy forward goes from ~63 ns to a few ns per row). Only float accumulation uses it; the
// float64 reference path stays per row.
#pragma once

#include "convert.h"

namespace sme {

// Largest class count served by blocks (the transposed block then fills 2 KB of L1).
constexpr int64_t kBlockMaxC = 32;

// ln(x) in float, about 1 ulp, for x >= 1 (sums of exponentials shifted by their max), 0 (-> -inf),
// +inf and NaN: Cephes' logf, x = f * 2^e with f in [sqrt(1/2), sqrt(2)).
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

// Lanes whose value is finite (x - x is 0 only then).
SME_INLINE vf finite_or_zero(vf x) { return x - x == 0.0f ? x : splat(0.0f); }

// buf[c * kLanes + l] = rows[l][c] in float for l < k, and 0 for the lanes past k.
template <typename T>
SME_INLINE void load_block(const T* x, int64_t row_stride, int64_t C, int64_t k, float* buf) {
  alignas(64) float row[kBlockMaxC];
  for (int64_t l = 0; l < k; ++l) {
    const float* xr = to_acc(x + l * row_stride, C, row);
    for (int64_t c = 0; c < C; ++c) buf[c * kLanes + l] = xr[c];
  }
  for (int64_t l = k; l < kLanes; ++l)
    for (int64_t c = 0; c < C; ++c) buf[c * kLanes + l] = 0.0f;
}

// Lane l of a transposed block as row l of a contiguous (rows, C) output, rounded to T.
template <typename T>
SME_INLINE void store_block_row(const float* buf, int64_t l, int64_t C, T* out) {
  alignas(64) float row[kBlockMaxC];
  for (int64_t c = 0; c < C; ++c) row[c] = buf[c * kLanes + l];
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(out, row, C * sizeof(float));
  } else {
    from_acc(row, C, out);
  }
}

}  // namespace sme
