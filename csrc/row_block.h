// Short rows, kLanes at a time, held transposed: element (row l, class c) of a block sits at
// buf[c * kLanes + l], so one vector instruction works on the same class of kLanes rows.
//
// For rows of a few dozen classes the per-row path (row_ops.h) spends its time on what every row
// pays once: masked tail loads, horizontal max and sum, a scalar log. Here those become one
// vertical operation per class and one vector log per kLanes rows (measured at 256 x 10 float32:
// the cross-entropy forward goes from ~63 ns to a few ns per row). Only float accumulation uses it;
// the float64 reference path stays per row.
#pragma once

#include "convert.h"

SME_NAMESPACE_BEGIN

// Largest class count served by blocks (the transposed block then fills 2 KB of L1).
constexpr int64_t kBlockMaxC = 32;

// Lanes whose value is finite (x - x is 0 only then).
SME_INLINE vf finite_or_zero(vf x) { return x - x == 0.0f ? x : splat(0.0f); }

// buf[c * kLanes + l] = rows[l][c] in float for l < k, and 0 for the lanes past k. Contiguous rows
// are widened in one call for the whole block (per row, a 10-value row would pay a call and a
// partial vector each).
template <typename T>
SME_INLINE void load_block(const T* x, int64_t row_stride, int64_t C, int64_t k, float* buf) {
  alignas(64) float rows[kBlockMaxC * kLanes];
  if (row_stride == C) {
    const float* xr = to_acc(x, k * C, rows);
    for (int64_t l = 0; l < k; ++l)
      for (int64_t c = 0; c < C; ++c) buf[c * kLanes + l] = xr[l * C + c];
  } else {
    for (int64_t l = 0; l < k; ++l) {
      const float* xr = to_acc(x + l * row_stride, C, rows);
      for (int64_t c = 0; c < C; ++c) buf[c * kLanes + l] = xr[c];
    }
  }
  for (int64_t l = k; l < kLanes; ++l)
    for (int64_t c = 0; c < C; ++c) buf[c * kLanes + l] = 0.0f;
}

// Lanes [0, k) of a transposed block as k contiguous rows of a (rows, C) output, rounded to T in
// one call.
template <typename T>
SME_INLINE void store_block(const float* buf, int64_t k, int64_t C, T* out) {
  alignas(64) float rows[kBlockMaxC * kLanes];
  float* dst = out_chunk(out, rows);
  for (int64_t l = 0; l < k; ++l)
    for (int64_t c = 0; c < C; ++c) dst[l * C + c] = buf[c * kLanes + l];
  from_acc(dst, k * C, out);
}

SME_NAMESPACE_END
