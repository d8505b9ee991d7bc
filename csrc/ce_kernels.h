// Fused softmax-cross-entropy row kernels: forward and backward, class-index and class-probability
// targets, per-class weights, ignore_index, label smoothing, soft-capping and the log-sum-exp's
// gradient. Forward reads each row once (chunks of kChunk values: max, then sum of exponentials
// from L1) and writes per-row results only; the backward reads each row once more and writes the
// gradient once. Included once per instruction set by kernel_set_body.h.
#pragma once

#include "kernel_args.h"
#include "row_block.h"
#include "row_ops.h"

SME_NAMESPACE_BEGIN
namespace {

// Running statistics of one row: m + log(s) is its log-sum-exp.
template <typename A>
struct RowStats {
  A m = -std::numeric_limits<A>::infinity();
  A s = 0;
  A shift = 0;  // reference r for the shifted sums (first finite chunk max)
  bool shift_set = false;
  SME_INLINE void add(const A* x, int64_t n, const void* next) {
    chunk_lse(x, n, m, s, next);
    if (!shift_set) {  // after the first chunk m is that chunk's max
      shift = std::isfinite(m) ? m : A(0);
      shift_set = true;
    }
  }
};

// ---- class-index targets ------------------------------------------------------------------------

// Soft-capping of a transposed block in place (the lanes past k hold 0, which stays 0).
SME_INLINE void softcap_block(float* xt, int64_t C, float cap) {
  const vf c = splat(cap), inv = splat(1.0f / cap);  // as softcap_chunk
  for (int64_t j = 0; j < C; ++j) storeu(xt + j * kLanes, c * vtanh(loadu(xt + j * kLanes) * inv));
}

// The per-row loss from its two terms: (1 - eps) * nll + eps / C * smooth, or nll alone.
template <typename A, typename Args>
SME_INLINE A combine(const Args& a, A nll, A smooth) {
  return a.with_smooth ? static_cast<A>(a.nll_scale) * nll + static_cast<A>(a.smooth_scale) * smooth
                       : nll;
}

// Rows [i0, i0 + k), k <= kLanes, C <= kBlockMaxC, float accumulation: the row path's arithmetic
// on a transposed block (same shift rules: exp relative to the max, or to 0 in an all -inf row; the
// smoothing sum relative to the max, or to 0 where the max is not finite).
template <typename T>
SME_INLINE void ce_index_fwd_block(const IndexFwdArgs& a, int64_t i0, int64_t k) {
  alignas(64) float xt[kBlockMaxC * kLanes], mv[kLanes], lsv[kLanes], shv[kLanes], wdv[kLanes];
  const int64_t C = a.C;
  const float* w = static_cast<const float*>(a.w);
  load_block(static_cast<const T*>(a.x) + i0 * a.row_stride, a.row_stride, C, k, xt);
  if (a.softcap > 0) softcap_block(xt, C, static_cast<float>(a.softcap));
  vf m = splat(-kInf);
  for (int64_t c = 0; c < C; ++c) m = vmax(loadu(xt + c * kLanes), m);
  const vf shift_exp = m == -kInf ? splat(0.0f) : m, shift = finite_or_zero(m);
  vf s = splat(0.0f), wd = splat(0.0f);
  for (int64_t c = 0; c < C; ++c) {
    const vf x = loadu(xt + c * kLanes);
    s += vexp_nonpos(x - shift_exp);
    if (a.with_smooth) wd += w ? (x - shift) * w[c] : x - shift;
  }
  storeu(mv, m);
  storeu(lsv, vlog(s));
  storeu(shv, shift);
  storeu(wdv, wd);
  for (int64_t l = 0; l < k; ++l) {
    const int64_t i = i0 + l, t = a.target[i * a.target_stride];
    a.lse[i] = static_cast<double>(mv[l]) + static_cast<double>(lsv[l]);
    float nll = 0, smooth = 0;
    if (t != a.ignore_index) {
      nll = (w ? w[t] : 1.0f) * ((mv[l] - xt[t * kLanes + l]) + lsv[l]);
      if (a.with_smooth) smooth = static_cast<float>(a.W) * ((mv[l] - shv[l]) + lsv[l]) - wdv[l];
    }
    static_cast<float*>(a.loss)[i] = combine(a, nll, smooth);
  }
}

template <typename T>
SME_INLINE void ce_index_fwd_rows(const IndexFwdArgs& a, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  if constexpr (std::is_same_v<A, float>) {
    if (a.C <= kBlockMaxC) {
      for (int64_t i = begin; i < end; i += kLanes)
        ce_index_fwd_block<T>(a, i, std::min<int64_t>(kLanes, end - i));
      return;
    }
  }
  alignas(64) A xbuf[kChunk], zbuf[kChunk];
  const A* w = static_cast<const A*>(a.w);
  const A cap = static_cast<A>(a.softcap);
  for (int64_t i = begin; i < end; ++i) {
    const T* xr = static_cast<const T*>(a.x) + i * a.row_stride;
    const int64_t t = a.target[i * a.target_stride];
    const bool ignored = t == a.ignore_index;  // other targets were range-checked up front
    RowStats<A> st;
    A wdot = 0;
    for (int64_t c0 = 0; c0 < a.C; c0 += kChunk) {
      const int64_t n = std::min(kChunk, a.C - c0);
      const A* x = to_acc(xr + c0, n, xbuf);
      if (cap > 0) {
        softcap_chunk(x, n, cap, zbuf);
        x = zbuf;
      }
      st.add(x, n, next_chunk(xr, c0, n, a.C, a.row_stride, i + 1 == end));
      if (a.with_smooth && !ignored) wdot += wdot_shift(x, w ? w + c0 : nullptr, n, st.shift);
    }
    const A ls = std::log(st.s);
    a.lse[i] = static_cast<double>(st.m) + static_cast<double>(ls);
    A nll = 0, smooth = 0;
    if (!ignored) {
      const A zt = cap > 0 ? softcap1(load1(xr + t), cap) : load1(xr + t);
      nll = (w ? w[t] : A(1)) * ((st.m - zt) + ls);
      if (a.with_smooth) smooth = static_cast<A>(a.W) * ((st.m - st.shift) + ls) - wdot;
    }
    static_cast<A*>(a.loss)[i] = combine(a, nll, smooth);
  }
}

template <typename A, typename Args>
SME_INLINE A lse_grad(const Args& a, int64_t i) {
  return a.glse ? static_cast<const A*>(a.glse)[i * a.glse_stride] : A(0);
}

// Rows [i0, i0 + k) of the backward on a transposed block (C <= kBlockMaxC, float accumulation).
template <typename T>
SME_INLINE void ce_index_bwd_block(const IndexBwdArgs& a, int64_t i0, int64_t k) {
  alignas(64) float xt[kBlockMaxC * kLanes], ot[kBlockMaxC * kLanes],
      hv[kLanes] = {}, lv[kLanes] = {}, av[kLanes] = {}, gv[kLanes] = {}, gtv[kLanes], glv[kLanes];
  int64_t tv[kLanes];
  const int64_t C = a.C;
  const float* w = static_cast<const float*>(a.w);
  // The weights of all classes enter only the smoothing term: without it, a non-finite weight of a
  // class no target uses must not reach the gradient (0 * inf is NaN), as in torch.
  const float* ws = a.with_smooth ? w : nullptr;
  for (int64_t l = 0; l < k; ++l) {  // per-row scalars; ignored rows are zeroed when stored
    const int64_t i = i0 + l, t = tv[l] = a.target[i * a.target_stride];
    const float gl = glv[l] = lse_grad<float>(a, i);
    hv[l] = static_cast<float>(a.lse[i]);
    lv[l] = static_cast<float>(a.lse[i] - static_cast<double>(hv[l]));
    if (t == a.ignore_index) {  // only the log-sum-exp's gradient, if any
      av[l] = gl;
      continue;
    }
    const float g = static_cast<const float*>(a.grad)[i * a.g_stride];
    const float gs = a.with_smooth ? g * static_cast<float>(a.smooth_scale) : 0.0f;
    const float gn = a.with_smooth ? g * static_cast<float>(a.nll_scale) : g;
    gtv[l] = gn * (w ? w[t] : 1.0f);
    av[l] = (a.with_smooth ? gtv[l] + gs * static_cast<float>(a.W) : gtv[l]) + gl;
    gv[l] = gs;
  }
  load_block(static_cast<const T*>(a.x) + i0 * a.row_stride, a.row_stride, C, k, xt);
  const float cap = static_cast<float>(a.softcap);
  if (cap > 0) softcap_block(xt, C, cap);  // xt holds the capped logits z from here on
  const vf vh = loadu(hv), vl = loadu(lv), va = loadu(av), vg = loadu(gv);
  for (int64_t c = 0; c < C; ++c) {
    const vf p = vexp_shifted((loadu(xt + c * kLanes) - vh) - vl);
    storeu(ot + c * kLanes, va * p - (ws ? vg * ws[c] : vg));
  }
  for (int64_t l = 0; l < k; ++l) {
    if (tv[l] == a.ignore_index) {
      // +0 throughout without a log-sum-exp gradient; with one, glse * p alone (recomputed so that
      // the smoothing term's weights, which may be infinite, stay out of the row)
      const float gl = glv[l];
      for (int64_t c = 0; c < C; ++c)
        ot[c * kLanes + l] =
            gl != 0.0f ? gl * std::exp((xt[c * kLanes + l] - hv[l]) - lv[l]) : 0.0f;
      continue;
    }
    // the true-class term, in float, rounded once as the row path does
    ot[tv[l] * kLanes + l] -= gtv[l];
  }
  if (cap > 0) {  // through the cap: d z / d x = 1 - (z / cap)^2
    for (int64_t c = 0; c < C; ++c) {
      const vf q = loadu(xt + c * kLanes) * splat(1.0f / cap);
      storeu(ot + c * kLanes, loadu(ot + c * kLanes) * (1.0f - q * q));
    }
  }
  store_block(ot, k, C, static_cast<T*>(a.gx) + i0 * C);
}

template <typename T>
SME_INLINE void ce_index_bwd_rows(const IndexBwdArgs& a, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  if constexpr (std::is_same_v<A, float>) {
    if (a.C <= kBlockMaxC) {
      for (int64_t i = begin; i < end; i += kLanes)
        ce_index_bwd_block<T>(a, i, std::min<int64_t>(kLanes, end - i));
      return;
    }
  }
  alignas(64) A xbuf[kChunk], obuf[kChunk], zbuf[kChunk];
  const A* w = static_cast<const A*>(a.w);
  const A* ws = a.with_smooth ? w : nullptr;  // as in the block path: weights only for smoothing
  const A cap = static_cast<A>(a.softcap);
  for (int64_t i = begin; i < end; ++i) {
    const T* xr = static_cast<const T*>(a.x) + i * a.row_stride;
    T* gr = static_cast<T*>(a.gx) + i * a.C;
    const int64_t t = a.target[i * a.target_stride];
    const bool ignored = t == a.ignore_index;
    const A gl = lse_grad<A>(a, i);
    if (ignored && gl == A(0)) {
      std::memset(static_cast<void*>(gr), 0, a.C * sizeof(T));
      continue;
    }
    // an ignored row reaches here only for its log-sum-exp's gradient: glse * p alone
    const A g = ignored ? A(0) : static_cast<const A*>(a.grad)[i * a.g_stride];
    const A gn = a.with_smooth ? g * static_cast<A>(a.nll_scale) : g;
    const A gs = a.with_smooth ? g * static_cast<A>(a.smooth_scale) : A(0);
    const A gt = ignored ? A(0) : gn * (w ? w[t] : A(1));  // weight of the true-class term
    const A alpha = (a.with_smooth ? gt + gs * static_cast<A>(a.W) : gt) + gl;
    const A* row_ws = ignored ? nullptr : ws;
    const A hi = static_cast<A>(a.lse[i]);
    const A lo = static_cast<A>(a.lse[i] - static_cast<double>(hi));
    for (int64_t c0 = 0; c0 < a.C; c0 += kChunk) {
      const int64_t n = std::min(kChunk, a.C - c0);
      A* out = out_chunk(gr + c0, obuf);
      // the soft-capped path multiplies the output in place after the fact: no streaming there
      const bool stream = std::is_same_v<T, float> && a.stream && !(cap > 0);
      const A* z = to_acc(xr + c0, n, xbuf);
      if (cap > 0) {
        softcap_chunk(z, n, cap, zbuf);
        z = zbuf;
      }
      ce_index_grad(z, row_ws ? row_ws + c0 : nullptr, n, hi, lo, alpha, gs, out, stream);
      // in the accumulation type, then rounded once
      if (!ignored && t >= c0 && t < c0 + n) out[t - c0] -= gt;
      if (cap > 0) softcap_grad_chunk(z, n, cap, out);
      from_acc(out, n, gr + c0);
    }
  }
  if (a.stream) stream_fence();
}

// ---- class-probability targets ------------------------------------------------------------------

template <typename T>
SME_INLINE void ce_soft_fwd_rows(const SoftFwdArgs& a, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  alignas(64) A xbuf[kChunk], tbuf[kChunk], zbuf[kChunk];
  const A* w = static_cast<const A*>(a.w);
  const A qa = static_cast<A>(1.0 - a.eps), qb = static_cast<A>(a.eps / a.C);
  const A cap = static_cast<A>(a.softcap);
  for (int64_t i = begin; i < end; ++i) {
    const T* xr = static_cast<const T*>(a.x) + i * a.row_stride;
    const T* tr = static_cast<const T*>(a.t) + i * a.t_row_stride;
    RowStats<A> st;
    A tsum = 0, tx = 0;
    for (int64_t c0 = 0; c0 < a.C; c0 += kChunk) {
      const int64_t n = std::min(kChunk, a.C - c0);
      const A* x = to_acc(xr + c0, n, xbuf);
      if (cap > 0) {
        softcap_chunk(x, n, cap, zbuf);
        x = zbuf;
      }
      st.add(x, n, next_chunk(xr, c0, n, a.C, a.row_stride, i + 1 == end));
      soft_sums(x, to_acc(tr + c0, n, tbuf), w ? w + c0 : nullptr, n, qa, qb, st.shift, tsum, tx);
    }
    const A ls = std::log(st.s);
    a.lse[i] = static_cast<double>(st.m) + static_cast<double>(ls);
    static_cast<A*>(a.loss)[i] = tsum * ((st.m - st.shift) + ls) - tx;
    static_cast<A*>(a.tsum)[i] = tsum;
  }
}

template <typename T>
SME_INLINE void ce_soft_bwd_rows(const SoftBwdArgs& a, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  alignas(64) A xbuf[kChunk], tbuf[kChunk], obuf[kChunk], zbuf[kChunk];
  const A* w = static_cast<const A*>(a.w);
  const A cap = static_cast<A>(a.softcap);
  for (int64_t i = begin; i < end; ++i) {
    const T* xr = static_cast<const T*>(a.x) + i * a.row_stride;
    const T* tr = static_cast<const T*>(a.t) + i * a.t_row_stride;
    T* gr = static_cast<T*>(a.gx) + i * a.C;
    const A g = static_cast<const A*>(a.grad)[i * a.g_stride];
    const A gS = g * static_cast<const A*>(a.tsum)[i] + lse_grad<A>(a, i);
    const A c1 = g * static_cast<A>(1.0 - a.eps), c0 = g * static_cast<A>(a.eps / a.C);
    const A hi = static_cast<A>(a.lse[i]);
    const A lo = static_cast<A>(a.lse[i] - static_cast<double>(hi));
    for (int64_t k0 = 0; k0 < a.C; k0 += kChunk) {
      const int64_t n = std::min(kChunk, a.C - k0);
      A* out = out_chunk(gr + k0, obuf);
      const A* z = to_acc(xr + k0, n, xbuf);
      if (cap > 0) {
        softcap_chunk(z, n, cap, zbuf);
        z = zbuf;
      }
      ce_soft_grad(z, to_acc(tr + k0, n, tbuf), w ? w + k0 : nullptr, n, hi, lo, gS, c1, c0, out);
      if (cap > 0) softcap_grad_chunk(z, n, cap, out);
      from_acc(out, n, gr + k0);
    }
  }
}

}  // namespace
SME_NAMESPACE_END
