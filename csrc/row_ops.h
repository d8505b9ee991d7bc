// Per-row building blocks shared by the softmax and cross-entropy kernels.
//
// Each works on a contiguous run of n values in the accumulation type A: float (SIMD, 16 lanes,
// used for float32 and, after conversion, float16/bfloat16 data) or double (plain loops; the exact
// reference path). Callers walk a row in cache-sized chunks and merge with an online max/sum.
#pragma once

#include "simd.h"

SME_NAMESPACE_BEGIN

// ---- online log-sum-exp over chunks of a row ----------------------------------------------------

// Fold a chunk's max cm into the running (max m, sum s of exp(x - m)).
template <typename A>
SME_INLINE void online_merge(A cm, A& m, A& s) {
  if (cm > m) {
    if (s != A(0)) s *= std::exp(m - cm);  // a row's first chunk needs no rescale (nor libm)
    m = cm;
  }
}

// Shift for exp in a chunk: the running max, or 0 while no finite value has been seen (so that an
// all -inf chunk adds exp(-inf) = 0 and never exp(-inf + inf) = NaN).
template <typename A>
SME_INLINE A safe_shift(A m) {
  return m == -std::numeric_limits<A>::infinity() ? A(0) : m;
}

// ---- float: SIMD -------------------------------------------------------------------------------

// Logit soft-capping, z = cap * tanh(x / cap) (cap > 0), into out (which may be x). x / cap is
// x * (1 / cap) here (within an ulp of the quotient): a vector division costs as much as the rest
// of the tanh.
SME_INLINE void softcap_chunk(const float* x, int64_t n, float cap, float* out) {
  const vf c = splat(cap), inv = splat(1.0f / cap);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) storeu(out + i, c * vtanh(loadu(x + i) * inv));
  if (i < n) store_part(out + i, c * vtanh(load_part(x + i, n - i, 0.0f) * inv), n - i);
}

SME_INLINE float softcap1(float x, float cap) {
  return (splat(cap) * vtanh(splat(x) * splat(1.0f / cap)))[0];
}

// d z / d x = 1 - (z / cap)^2, applied to g, a gradient with respect to the capped logits z.
SME_INLINE void softcap_grad_chunk(const float* z, int64_t n, float cap, float* g) {
  const vf inv = splat(1.0f / cap);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const vf q = loadu(z + i) * inv;
    storeu(g + i, loadu(g + i) * (1.0f - q * q));
  }
  for (; i < n; ++i) {
    const float q = z[i] / cap;
    g[i] *= 1.0f - q * q;
  }
}

// Where a walk over rows [.., end) in chunks reads after the chunk [c0, c0 + n) of row i: the next
// chunk of the row, the start of the next row, or nothing.
template <typename T>
SME_INLINE const void* next_chunk(const T* xr, int64_t c0, int64_t n, int64_t C, int64_t row_stride,
                                  bool last_row) {
  if (c0 + n < C) return xr + c0 + n;
  return last_row ? nullptr : xr + row_stride;
}

// One chunk of a row folded into the running (m, s) of its log-sum-exp: the max pass, then the
// exp-sum pass from L1. The partial last vector is loaded once and kept in a register for both.
// The max pass waits on memory and the exp pass on arithmetic; so that the two overlap, the exp
// pass prefetches `next` (the raw data read after this chunk, or nullptr), a line per 16 values.
SME_INLINE void chunk_lse(const float* x, int64_t n, float& m, float& s,
                          const void* next = nullptr) {
  const int64_t full = n & ~int64_t(kLanes - 1);
  const vf tail = full < n ? load_part(x + full, n - full, -kInf) : splat(-kInf);
  vf m0 = tail, m1 = splat(-kInf);
  int64_t i = 0;
  for (; i + 2 * kLanes <= full; i += 2 * kLanes) {
    m0 = vmax(loadu(x + i), m0);
    m1 = vmax(loadu(x + i + kLanes), m1);
  }
  if (i < full) m0 = vmax(loadu(x + i), m0);
  online_merge(hmax(vmax(m0, m1)), m, s);
  const vf vm = splat(safe_shift(m));
  vf s0 = full < n ? vexp_nonpos(tail - vm) : splat(0.0f), s1 = splat(0.0f);
  const char* pf = static_cast<const char*>(next);
  for (i = 0; i + 2 * kLanes <= full; i += 2 * kLanes) {
    if (pf) {
      __builtin_prefetch(pf + 4 * i, 0, 3);
      __builtin_prefetch(pf + 4 * i + 64, 0, 3);
    }
    s0 += vexp_nonpos(loadu(x + i) - vm);
    s1 += vexp_nonpos(loadu(x + i + kLanes) - vm);
  }
  if (i < full) s0 += vexp_nonpos(loadu(x + i) - vm);
  s += hsum(s0 + s1);
}

// sum w[c] * (x[c] - r), or sum (x[c] - r) without weights. The shift r keeps rows far from zero
// (say every logit near +1000) from cancelling catastrophically.
SME_INLINE float wdot_shift(const float* x, const float* w, int64_t n, float r) {
  const vf vr = splat(r);
  vf s0 = splat(0.0f), s1 = s0;  // two chains, as in dot
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    const vf d0 = loadu(x + i) - vr, d1 = loadu(x + i + kLanes) - vr;
    s0 += w ? loadu(w + i) * d0 : d0;
    s1 += w ? loadu(w + i + kLanes) * d1 : d1;
  }
  for (; i + kLanes <= n; i += kLanes) {
    const vf d = loadu(x + i) - vr;
    s0 += w ? loadu(w + i) * d : d;
  }
  if (i < n) {
    const vf d = load_part(x + i, n - i, r) - vr;
    s1 += w ? load_part(w + i, n - i, 0.0f) * d : d;
  }
  return hsum(s0 + s1);
}

// With q = a * t + b: tsum += sum w q and tx += sum w q (x - r).
SME_INLINE void soft_sums(const float* x, const float* t, const float* w, int64_t n, float a,
                          float b, float r, float& tsum, float& tx) {
  const vf vr = splat(r);
  vf s = splat(0.0f), d = splat(0.0f);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    vf q = loadu(t + i) * a + b;
    if (w) q *= loadu(w + i);
    s += q;
    d += q * (loadu(x + i) - vr);
  }
  if (i < n) {
    const int64_t k = n - i;
    vf q = load_part(t + i, k, 0.0f) * a + b;
    if (w) q *= load_part(w + i, k, 0.0f);
    for (int64_t l = k; l < kLanes; ++l) q[l] = 0.0f;  // lanes past n would otherwise hold b
    s += q;
    d += q * (load_part(x + i, k, r) - vr);
  }
  tsum += hsum(s);
  tx += hsum(d);
}

// softmax: out = exp(x - m) * inv_s; log_softmax: out = (x - m) - log_s.
SME_INLINE void softmax_write(const float* x, int64_t n, float m, float c, bool log, float* out) {
  const vf vm = splat(m), vc = splat(c);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const vf d = loadu(x + i) - vm;
    storeu(out + i, log ? d - vc : vexp_shifted(d) * vc);
  }
  if (i < n) {
    const vf d = load_part(x + i, n - i, 0.0f) - vm;
    store_part(out + i, log ? d - vc : vexp_shifted(d) * vc, n - i);
  }
}

// Cross-entropy gradient with index targets (the true class is fixed up by the caller):
// out = alpha * exp((x - hi) - lo) - gs * w, the log-sum-exp split as hi + lo for accuracy.
SME_INLINE void ce_index_grad(const float* x, const float* w, int64_t n, float hi, float lo,
                              float alpha, float gs, float* out, bool stream = false) {
  const vf vh = splat(hi), vl = splat(lo), va = splat(alpha), vg = splat(gs);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const vf p = vexp_shifted((loadu(x + i) - vh) - vl);
    const vf r = va * p - (w ? vg * loadu(w + i) : vg);
    if (stream)
      stream_store(out + i, r);
    else
      storeu(out + i, r);
  }
  if (i < n) {
    const int64_t k = n - i;
    const vf p = vexp_shifted((load_part(x + i, k, -kInf) - vh) - vl);
    store_part(out + i, va * p - (w ? vg * load_part(w + i, k, 0.0f) : vg), k);
  }
}

// Soft-target gradient: out = gS * exp((x - hi) - lo) - w * (c1 * t + c0).
SME_INLINE void ce_soft_grad(const float* x, const float* t, const float* w, int64_t n, float hi,
                             float lo, float gS, float c1, float c0, float* out) {
  const vf vh = splat(hi), vl = splat(lo), vg = splat(gS);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    vf q = loadu(t + i) * c1 + c0;
    if (w) q *= loadu(w + i);
    storeu(out + i, vg * vexp_shifted((loadu(x + i) - vh) - vl) - q);
  }
  if (i < n) {
    const int64_t k = n - i;
    vf q = load_part(t + i, k, 0.0f) * c1 + c0;
    if (w) q *= load_part(w + i, k, 0.0f);
    store_part(out + i, vg * vexp_shifted((load_part(x + i, k, -kInf) - vh) - vl) - q, k);
  }
}

// sum a[i] * b[i] (b == nullptr: sum a[i]). Four accumulators: with one, each add waits for the
// last (4 cycles), and a 1000-value row takes ~250 cycles of latency instead of ~70 of throughput.
SME_INLINE float dot(const float* a, const float* b, int64_t n) {
  vf s0 = splat(0.0f), s1 = s0, s2 = s0, s3 = s0;
  int64_t i = 0;
  for (; i + 4 * kLanes <= n; i += 4 * kLanes) {
    if (b) {
      s0 += loadu(a + i) * loadu(b + i);
      s1 += loadu(a + i + kLanes) * loadu(b + i + kLanes);
      s2 += loadu(a + i + 2 * kLanes) * loadu(b + i + 2 * kLanes);
      s3 += loadu(a + i + 3 * kLanes) * loadu(b + i + 3 * kLanes);
    } else {
      s0 += loadu(a + i);
      s1 += loadu(a + i + kLanes);
      s2 += loadu(a + i + 2 * kLanes);
      s3 += loadu(a + i + 3 * kLanes);
    }
  }
  for (; i + kLanes <= n; i += kLanes) s0 += b ? loadu(a + i) * loadu(b + i) : loadu(a + i);
  if (i < n) {
    const vf va = load_part(a + i, n - i, 0.0f);
    s1 += b ? va * load_part(b + i, n - i, 0.0f) : va;
  }
  return hsum((s0 + s1) + (s2 + s3));
}

// softmax backward: out = y * (g - s); log_softmax backward: out = g - exp(y) * s.
SME_INLINE void softmax_bwd_write(const float* g, const float* y, int64_t n, float s, bool log,
                                  float* out) {
  const vf vs = splat(s);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const vf vg = loadu(g + i), vy = loadu(y + i);
    storeu(out + i, log ? vg - vexp_shifted(vy) * vs : vy * (vg - vs));
  }
  if (i < n) {
    const vf vg = load_part(g + i, n - i, 0.0f), vy = load_part(y + i, n - i, 0.0f);
    store_part(out + i, log ? vg - vexp_shifted(vy) * vs : vy * (vg - vs), n - i);
  }
}

// ---- double: the exact reference path ----------------------------------------------------------

SME_INLINE void softcap_chunk(const double* x, int64_t n, double cap, double* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = cap * std::tanh(x[i] / cap);
}

SME_INLINE double softcap1(double x, double cap) { return cap * std::tanh(x / cap); }

SME_INLINE void softcap_grad_chunk(const double* z, int64_t n, double cap, double* g) {
  for (int64_t i = 0; i < n; ++i) {
    const double q = z[i] / cap;
    g[i] *= 1.0 - q * q;
  }
}

SME_INLINE double max_of(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

SME_INLINE double sum_exp(const double* x, int64_t n, double m) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += std::exp(x[i] - m);
  return s;
}

SME_INLINE void chunk_lse(const double* x, int64_t n, double& m, double& s, const void* = nullptr) {
  online_merge(max_of(x, n), m, s);
  s += sum_exp(x, n, safe_shift(m));
}

SME_INLINE double wdot_shift(const double* x, const double* w, int64_t n, double r) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += w ? w[i] * (x[i] - r) : x[i] - r;
  return s;
}

SME_INLINE void soft_sums(const double* x, const double* t, const double* w, int64_t n, double a,
                          double b, double r, double& tsum, double& tx) {
  for (int64_t i = 0; i < n; ++i) {
    const double q = (a * t[i] + b) * (w ? w[i] : 1.0);
    tsum += q;
    tx += q * (x[i] - r);
  }
}

SME_INLINE void softmax_write(const double* x, int64_t n, double m, double c, bool log,
                              double* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = log ? (x[i] - m) - c : std::exp(x[i] - m) * c;
}

SME_INLINE void ce_index_grad(const double* x, const double* w, int64_t n, double hi, double lo,
                              double alpha, double gs, double* out, bool = false) {
  for (int64_t i = 0; i < n; ++i)
    out[i] = alpha * std::exp((x[i] - hi) - lo) - gs * (w ? w[i] : 1.0);
}

SME_INLINE void ce_soft_grad(const double* x, const double* t, const double* w, int64_t n,
                             double hi, double lo, double gS, double c1, double c0, double* out) {
  for (int64_t i = 0; i < n; ++i)
    out[i] = gS * std::exp((x[i] - hi) - lo) - (c1 * t[i] + c0) * (w ? w[i] : 1.0);
}

SME_INLINE double dot(const double* a, const double* b, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += b ? a[i] * b[i] : a[i];
  return s;
}

SME_INLINE void softmax_bwd_write(const double* g, const double* y, int64_t n, double s, bool log,
                                  double* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = log ? g[i] - std::exp(y[i]) * s : y[i] * (g[i] - s);
}

SME_NAMESPACE_END
