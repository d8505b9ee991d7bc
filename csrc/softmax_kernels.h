// softmax / log_softmax row kernels, forward and backward, over a range of work items: contiguous
// rows (inner == 1, in chunks with an online max/sum; rows of up to kBlockMaxC classes kLanes at a
// time, transposed) or tiles of kLanes neighbouring columns walked down the class dim (inner > 1),
// so no transpose copy is ever made. Included once per instruction set by kernel_set_body.h.
#pragma once

#include "kernel_args.h"
#include "row_block.h"
#include "row_ops.h"

SME_NAMESPACE_BEGIN
namespace {

// Rows [i0, i0 + k), k <= kLanes, C <= kBlockMaxC, float accumulation: the row path's arithmetic
// on a transposed block (row_block.h), one vertical operation per class for kLanes rows.
template <typename T>
SME_INLINE void softmax_fwd_block(const SoftmaxFwdArgs& a, int64_t i0, int64_t k) {
  alignas(64) float xt[kBlockMaxC * kLanes];
  const int64_t C = a.C;
  load_block(static_cast<const T*>(a.x) + i0 * C, C, C, k, xt);
  vf m = splat(-kInf);
  for (int64_t c = 0; c < C; ++c) m = vmax(loadu(xt + c * kLanes), m);
  vf s = splat(0.0f);
  for (int64_t c = 0; c < C; ++c) s += vexp_shifted(loadu(xt + c * kLanes) - m);
  const vf r = a.log ? vlog(s) : splat(1.0f) / s;
  for (int64_t c = 0; c < C; ++c) {
    const vf d = loadu(xt + c * kLanes) - m;
    storeu(xt + c * kLanes, a.log ? d - r : vexp_shifted(d) * r);
  }
  store_block(xt, k, C, static_cast<T*>(a.y) + i0 * C);
}

template <typename T>
SME_INLINE void softmax_bwd_block(const SoftmaxBwdArgs& a, int64_t i0, int64_t k) {
  alignas(64) float gt[kBlockMaxC * kLanes], yt[kBlockMaxC * kLanes];
  const int64_t C = a.C;
  load_block(static_cast<const T*>(a.g) + i0 * C, C, C, k, gt);
  load_block(static_cast<const T*>(a.y) + i0 * C, C, C, k, yt);
  vf s = splat(0.0f);
  for (int64_t c = 0; c < C; ++c) {
    const vf g = loadu(gt + c * kLanes);
    s += a.log ? g : g * loadu(yt + c * kLanes);
  }
  for (int64_t c = 0; c < C; ++c) {
    const vf g = loadu(gt + c * kLanes), y = loadu(yt + c * kLanes);
    storeu(gt + c * kLanes, a.log ? g - vexp_shifted(y) * s : y * (g - s));
  }
  store_block(gt, k, C, static_cast<T*>(a.gx) + i0 * C);
}

template <typename T>
SME_INLINE void softmax_fwd_rows(const SoftmaxFwdArgs& a, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  if constexpr (std::is_same_v<A, float>) {
    if (a.C <= kBlockMaxC) {
      for (int64_t i = begin; i < end; i += kLanes)
        softmax_fwd_block<T>(a, i, std::min<int64_t>(kLanes, end - i));
      return;
    }
  }
  alignas(64) A xbuf[kChunk], obuf[kChunk];
  const int64_t C = a.C;
  const bool one_chunk = C <= kChunk;  // then the second pass reuses the first one's conversion
  for (int64_t i = begin; i < end; ++i) {
    const T* xr = static_cast<const T*>(a.x) + i * C;
    T* yr = static_cast<T*>(a.y) + i * C;
    A m = -std::numeric_limits<A>::infinity(), s = 0;
    const A* x = nullptr;
    for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
      const int64_t n = std::min(kChunk, C - c0);
      x = to_acc(xr + c0, n, xbuf);
      chunk_lse(x, n, m, s, next_chunk(xr, c0, n, C, C, i + 1 == end));
    }
    const A c = a.log ? std::log(s) : A(1) / s;
    for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
      const int64_t n = std::min(kChunk, C - c0);
      A* out = out_chunk(yr + c0, obuf);
      softmax_write(one_chunk ? x : to_acc(xr + c0, n, xbuf), n, m, c, a.log, out);
      from_acc(out, n, yr + c0);
    }
  }
}

template <typename T>
SME_INLINE void softmax_bwd_rows(const SoftmaxBwdArgs& a, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  if constexpr (std::is_same_v<A, float>) {
    if (a.C <= kBlockMaxC) {
      for (int64_t i = begin; i < end; i += kLanes)
        softmax_bwd_block<T>(a, i, std::min<int64_t>(kLanes, end - i));
      return;
    }
  }
  alignas(64) A gbuf[kChunk], ybuf[kChunk], obuf[kChunk];
  const int64_t C = a.C;
  const bool one_chunk = C <= kChunk;  // then the second pass reuses the first one's conversions
  for (int64_t i = begin; i < end; ++i) {
    const T* gr = static_cast<const T*>(a.g) + i * C;
    const T* yr = static_cast<const T*>(a.y) + i * C;
    T* outr = static_cast<T*>(a.gx) + i * C;
    A s = 0;
    const A *g = nullptr, *y = nullptr;
    for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
      const int64_t n = std::min(kChunk, C - c0);
      g = to_acc(gr + c0, n, gbuf);
      if (!a.log) y = to_acc(yr + c0, n, ybuf);  // log_softmax's sum needs g alone
      s += dot(g, y, n);
    }
    for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
      const int64_t n = std::min(kChunk, C - c0);
      A* out = out_chunk(outr + c0, obuf);
      if (!one_chunk) g = to_acc(gr + c0, n, gbuf);
      if (!one_chunk || a.log) y = to_acc(yr + c0, n, ybuf);
      softmax_bwd_write(g, y, n, s, a.log, out);
      from_acc(out, n, outr + c0);
    }
  }
}

// ---- class dim not last: tiles of kLanes columns ------------------------------------------------

// Lanes [0, k) of one class-dim step of a tile as 16 floats (or doubles, lane-wise).
template <typename T>
SME_INLINE vf load_lanes(const T* p, int64_t k) {
  if constexpr (std::is_same_v<T, float>) {
    return k == kLanes ? loadu(p) : load_part(p, k, 0.0f);
  } else {
    alignas(64) float tmp[kLanes] = {};
    to_acc(p, k, tmp);
    return loadu(tmp);
  }
}

template <typename T>
SME_INLINE void store_lanes(T* p, vf v, int64_t k) {
  if constexpr (std::is_same_v<T, float>) {
    if (k == kLanes)
      storeu(p, v);
    else
      store_part(p, v, k);
  } else {
    alignas(64) float tmp[kLanes];
    storeu(tmp, v);
    from_acc(tmp, k, p);
  }
}

template <typename T>
SME_INLINE void softmax_fwd_tiles(const SoftmaxFwdArgs& a, int64_t begin, int64_t end) {
  const int64_t C = a.C, inner = a.inner, tiles = (inner + kLanes - 1) / kLanes;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t o = task / tiles, j0 = (task % tiles) * kLanes,
                  k = std::min<int64_t>(kLanes, inner - j0);
    const T* x = static_cast<const T*>(a.x) + o * C * inner + j0;
    T* y = static_cast<T*>(a.y) + o * C * inner + j0;
    if constexpr (std::is_same_v<T, double>) {
      for (int64_t l = 0; l < k; ++l) {
        double m = -std::numeric_limits<double>::infinity(), s = 0;
        for (int64_t c = 0; c < C; ++c) m = x[c * inner + l] > m ? x[c * inner + l] : m;
        const double sh = safe_shift(m);
        for (int64_t c = 0; c < C; ++c) s += std::exp(x[c * inner + l] - sh);
        const double cst = a.log ? std::log(s) : 1.0 / s;
        for (int64_t c = 0; c < C; ++c) {
          const double d = x[c * inner + l] - m;
          y[c * inner + l] = a.log ? d - cst : std::exp(d) * cst;
        }
      }
    } else {
      vf m = splat(-kInf), s = splat(0.0f);
      for (int64_t c = 0; c < C; ++c) m = vmax(load_lanes(x + c * inner, k), m);
      const vf sh = m == splat(-kInf) ? splat(0.0f) : m;
      for (int64_t c = 0; c < C; ++c) s += vexp_nonpos(load_lanes(x + c * inner, k) - sh);
      const vf cst = a.log ? vlog(s) : 1.0f / s;
      for (int64_t c = 0; c < C; ++c) {
        const vf d = load_lanes(x + c * inner, k) - m;
        store_lanes(y + c * inner, a.log ? d - cst : vexp_shifted(d) * cst, k);
      }
    }
  }
}

template <typename T>
SME_INLINE void softmax_bwd_tiles(const SoftmaxBwdArgs& a, int64_t begin, int64_t end) {
  const int64_t C = a.C, inner = a.inner, tiles = (inner + kLanes - 1) / kLanes;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t o = task / tiles, j0 = (task % tiles) * kLanes,
                  k = std::min<int64_t>(kLanes, inner - j0);
    const int64_t base = o * C * inner + j0;
    const T* g = static_cast<const T*>(a.g) + base;
    const T* y = static_cast<const T*>(a.y) + base;
    T* gx = static_cast<T*>(a.gx) + base;
    if constexpr (std::is_same_v<T, double>) {
      for (int64_t l = 0; l < k; ++l) {
        double s = 0;
        for (int64_t c = 0; c < C; ++c)
          s += a.log ? g[c * inner + l] : g[c * inner + l] * y[c * inner + l];
        for (int64_t c = 0; c < C; ++c) {
          const double gv = g[c * inner + l], yv = y[c * inner + l];
          gx[c * inner + l] = a.log ? gv - std::exp(yv) * s : yv * (gv - s);
        }
      }
    } else {
      vf s = splat(0.0f);
      for (int64_t c = 0; c < C; ++c) {
        const vf gv = load_lanes(g + c * inner, k);
        s += a.log ? gv : gv * load_lanes(y + c * inner, k);
      }
      for (int64_t c = 0; c < C; ++c) {
        const vf gv = load_lanes(g + c * inner, k), yv = load_lanes(y + c * inner, k);
        store_lanes(gx + c * inner, a.log ? gv - vexp_shifted(yv) * s : yv * (gv - s), k);
      }
    }
  }
}

}  // namespace
SME_NAMESPACE_END
