// Fused softmax-cross-entropy on CPU: forward and backward, class-index and class-probability
// targets, per-class weights, ignore_index and label smoothing.
//
// Forward reads each row once (chunks of kChunk values: max, then sum of exponentials from L1) and
// writes per-row results only; the backward reads each row once more and writes the gradient once.
// The log-sum-exp is kept in float64 so that the backward can split it as hi + lo and compute
// exp((x - hi) - lo) as accurately as PyTorch computes exp(log_softmax), even for logits near 1e4.
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include "dispatch.h"
#include "grad_buffer.h"
#include "loss_options.h"
#include "row_block.h"
#include "row_ops.h"

namespace sme {
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

struct IndexFwdArgs {
  const void* x;
  int64_t row_stride, C;
  const int64_t* target;
  int64_t target_stride;
  const void* w;  // acc type, or nullptr
  double W;       // sum of weights (C without weights)
  int64_t ignore_index;
  bool with_smooth;
  double nll_scale, smooth_scale;  // loss = nll_scale * nll + smooth_scale * smooth (with_smooth)
  void* loss;
  double* lse;
  double softcap;  // > 0: the logits are cap * tanh(x / cap); 0: off
};

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

struct IndexBwdArgs {
  const void* grad;  // d loss / d per-row loss; the two terms' gradients are it times the scales
  int64_t g_stride;
  const void* x;
  int64_t row_stride, C;
  const int64_t* target;
  int64_t target_stride;
  const void* w;
  double W;
  const double* lse;
  int64_t ignore_index;
  bool with_smooth;
  double nll_scale, smooth_scale;
  void* gx;     // contiguous (rows, C)
  bool stream;  // non-temporal stores: float32 output far larger than the caches, 16-byte rows
  double softcap;
  // d objective / d lse per row (acc type), or nullptr: the log-sum-exp output's gradient, which
  // adds glse * p to a row's gradient, ignored rows included (their lse is a function of the row)
  const void* glse;
  int64_t glse_stride;
};

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

struct SoftFwdArgs {
  const void* x;
  int64_t row_stride, C;
  const void* t;  // same storage type as x
  int64_t t_row_stride;
  const void* w;
  double eps;
  void* loss;
  double* lse;
  void* tsum;
  double softcap;
};

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

struct SoftBwdArgs {
  const void* grad;
  int64_t g_stride;
  const void* x;
  int64_t row_stride, C;
  const void* t;
  int64_t t_row_stride;
  const void* w;
  const double* lse;
  const void* tsum;
  double eps;
  void* gx;
  double softcap;
  const void* glse;  // as IndexBwdArgs::glse
  int64_t glse_stride;
};

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

SME_CLONED_ENTRY(ce_index_fwd_rows, IndexFwdArgs)
SME_CLONED_ENTRY(ce_index_bwd_rows, IndexBwdArgs)
SME_CLONED_ENTRY(ce_soft_fwd_rows, SoftFwdArgs)
SME_CLONED_ENTRY(ce_soft_bwd_rows, SoftBwdArgs)

// ---- argument checks shared by the four operators -----------------------------------------------

void check_logits(const at::Tensor& x, const char* op) {
  check_floating(x, op);
  TORCH_CHECK(x.dim() == 2, "softmax_ext::", op, ": logits must be (rows, classes), got ",
              x.sizes());
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "softmax_ext::", op,
              ": logits must have unit class stride");
}

// Shape, dtype and range of class-index targets. The range check runs here, before the kernels:
// an exception must not unwind through the ISA-cloned kernels (it would terminate the process),
// and checking first also reports the first bad target, deterministically, as PyTorch does.
void check_index_target(const at::Tensor& x, const at::Tensor& target, int64_t ignore_index,
                        const char* op) {
  TORCH_CHECK(target.scalar_type() == at::kLong, "softmax_ext::", op,
              ": expected int64 targets, got ", target.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == x.size(0), "softmax_ext::", op,
              ": target must be (rows,) = (", x.size(0), ",), got ", target.sizes());
  const int64_t* t = target.const_data_ptr<int64_t>();
  const int64_t n = target.size(0), stride = target.stride(0), C = x.size(1);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = t[i * stride];
    TORCH_CHECK_INDEX(v == ignore_index || (v >= 0 && v < C), "Target ", v, " is out of bounds.");
  }
}

void check_soft_target(const at::Tensor& x, const at::Tensor& target, const char* op) {
  TORCH_CHECK(target.scalar_type() == x.scalar_type(), "softmax_ext::", op,
              ": soft targets must have the logits' dtype ", x.scalar_type(), ", got ",
              target.scalar_type());
  TORCH_CHECK(target.sizes() == x.sizes(), "softmax_ext::", op, ": soft target shape ",
              target.sizes(), " differs from logits ", x.sizes());
}

// The weight as a contiguous accumulation-type vector (or an undefined tensor) and its sum.
std::pair<at::Tensor, double> prepared_weight(const std::optional<at::Tensor>& weight,
                                              const at::Tensor& x, const char* op) {
  if (!weight.has_value() || !weight->defined())
    return {at::Tensor(), static_cast<double>(x.size(1))};
  TORCH_CHECK(weight->dim() == 1 && weight->size(0) == x.size(1), "softmax_ext::", op,
              ": weight must be (classes,) = (", x.size(1), ",), got ", weight->sizes());
  at::Tensor w = weight->to(acc_type(x.scalar_type())).contiguous();
  return {w, w.sum().item<double>()};
}

// A per-row vector in the accumulation type; a stride-0 expansion of a scalar stays one.
at::Tensor per_row(const at::Tensor& v, const at::Tensor& x, const char* name) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == x.size(0), "softmax_ext: ", name, " must be (rows,) = (",
              x.size(0), ",), got ", v.sizes());
  return v.to(acc_type(x.scalar_type()));
}

// An optional per-row vector (undefined when absent).
at::Tensor optional_per_row(const std::optional<at::Tensor>& v, const at::Tensor& x,
                            const char* name) {
  return v.has_value() && v->defined() ? per_row(*v, x, name) : at::Tensor();
}

at::Tensor lse_of(const at::Tensor& lse, const at::Tensor& x) {
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == x.size(0), "softmax_ext: lse must be (rows,)");
  return lse.to(at::kDouble).contiguous();
}

// Non-temporal stores pay off only for float32 outputs well beyond the last-level cache, and need
// 16-byte aligned rows.
bool streams_well(const at::Tensor& gx) {
  constexpr int64_t kMinBytes = int64_t(256) << 20;
  return gx.scalar_type() == at::kFloat && static_cast<int64_t>(gx.nbytes()) >= kMinBytes &&
         gx.size(1) % 4 == 0 && reinterpret_cast<uintptr_t>(gx.const_data_ptr()) % 16 == 0;
}

const void* data_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

// ---- the kernels: (rows, C) views in, per-row results out; the option block by name --------

// The arguments of one kernel call: tensors first, then the option block (softmax_ext/ops.py).
struct KernelCall {
  torch::jit::Stack args;
  LossOptions opt;
  size_t n = 0;

  KernelCall(const c10::OperatorHandle& op, torch::jit::Stack* stack, size_t n_tensors)
      : n(op.schema().arguments().size()) {
    auto view = torch::jit::last(*stack, n);
    args.assign(view.begin(), view.end());
    opt = LossOptions::read(op.schema(), args, n_tensors, n);
    torch::jit::drop(*stack, n);
  }
  const at::Tensor& tensor(size_t i) const { return args[i].toTensor(); }
  std::optional<at::Tensor> optional(size_t i) const { return args[i].toOptional<at::Tensor>(); }
};

std::pair<double, double> smoothing_scales(const LossOptions& o, int64_t C) {
  return {1.0 - o.label_smoothing, o.label_smoothing / static_cast<double>(C)};
}

// (logits, target, weight, options...) -> (loss, lse)
void ce_index_fwd(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const KernelCall k(op, stack, 3);
  const at::Tensor &logits = k.tensor(0), &target = k.tensor(1);
  check_logits(logits, "ce_index_fwd");
  check_index_target(logits, target, k.opt.ignore_index, "ce_index_fwd");
  auto [w, W] = prepared_weight(k.optional(2), logits, "ce_index_fwd");
  const int64_t rows = logits.size(0), C = logits.size(1);
  at::Tensor loss = at::empty({rows}, logits.options().dtype(acc_type(logits.scalar_type())));
  at::Tensor lse = at::empty({rows}, logits.options().dtype(at::kDouble));
  if (rows > 0) {
    TORCH_CHECK(C > 0, "softmax_ext::ce_index_fwd: no classes");
    const auto [nll_scale, smooth_scale] = smoothing_scales(k.opt, C);
    const IndexFwdArgs a{logits.const_data_ptr(),
                         logits.stride(0),
                         C,
                         target.const_data_ptr<int64_t>(),
                         target.stride(0),
                         data_or_null(w),
                         W,
                         k.opt.ignore_index,
                         k.opt.with_smooth(),
                         nll_scale,
                         smooth_scale,
                         loss.mutable_data_ptr(),
                         lse.mutable_data_ptr<double>(),
                         k.opt.softcap};
    ce_index_fwd_rows_run(logits.scalar_type(), a, rows, grain_for(C));
  }
  torch::jit::push(*stack, std::move(loss), std::move(lse));
}

// The grad_logits argument of the backward kernels' _into variants, checked: a contiguous (rows, C)
// tensor of the logits' dtype and device that is either the logits themselves or disjoint from
// them (the kernels read each logit before writing its gradient, so only a partial overlap would be
// wrong) and disjoint from every other input.
at::Tensor checked_grad_out(const at::Tensor& gx, const at::Tensor& logits,
                            std::initializer_list<const at::Tensor*> others, const char* op) {
  TORCH_CHECK(gx.sizes() == logits.sizes(), "softmax_ext::", op, ": grad_logits must be ",
              logits.sizes(), ", got ", gx.sizes());
  TORCH_CHECK(gx.scalar_type() == logits.scalar_type() && gx.device() == logits.device(),
              "softmax_ext::", op, ": grad_logits must be ", logits.scalar_type(), " on ",
              logits.device(), ", got ", gx.scalar_type(), " on ", gx.device());
  TORCH_CHECK(gx.is_contiguous(), "softmax_ext::", op, ": grad_logits must be contiguous");
  at::assert_no_internal_overlap(gx);
  at::assert_no_partial_overlap(gx, logits);
  for (const at::Tensor* t : others)
    if (t->defined()) at::assert_no_overlap(gx, *t);
  return gx;
}

// (grad_loss, logits, target, weight, lse, grad_lse[, grad_logits], options...): the gradient into
// grad_logits when the call has it (ce_index_bwd_into), else into a new tensor that it returns.
void ce_index_bwd(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const bool into = op.schema().returns().empty();
  const char* name = into ? "ce_index_bwd_into" : "ce_index_bwd";
  const KernelCall k(op, stack, into ? 7 : 6);
  const at::Tensor &logits = k.tensor(1), &target = k.tensor(2);
  check_logits(logits, name);
  check_index_target(logits, target, k.opt.ignore_index, name);
  auto [w, W] = prepared_weight(k.optional(3), logits, name);
  const at::Tensor g = per_row(k.tensor(0), logits, "grad_loss");
  const at::Tensor l = lse_of(k.tensor(4), logits);
  const at::Tensor gl = optional_per_row(k.optional(5), logits, "grad_lse");
  at::Tensor gx = into ? checked_grad_out(k.tensor(6), logits, {&target, &g, &l, &gl, &w}, name)
                       : reusable_empty(logits.sizes(), logits.options());
  if (logits.numel() > 0) {
    const auto [nll_scale, smooth_scale] = smoothing_scales(k.opt, logits.size(1));
    const IndexBwdArgs a{g.const_data_ptr(),
                         g.stride(0),
                         logits.const_data_ptr(),
                         logits.stride(0),
                         logits.size(1),
                         target.const_data_ptr<int64_t>(),
                         target.stride(0),
                         data_or_null(w),
                         W,
                         l.const_data_ptr<double>(),
                         k.opt.ignore_index,
                         k.opt.with_smooth(),
                         nll_scale,
                         smooth_scale,
                         gx.mutable_data_ptr(),
                         streams_well(gx),
                         k.opt.softcap,
                         data_or_null(gl),
                         gl.defined() ? gl.stride(0) : 0};
    ce_index_bwd_rows_run(logits.scalar_type(), a, logits.size(0), grain_for(logits.size(1)));
  }
  if (!into) torch::jit::push(*stack, std::move(gx));
}

// Soft targets in the logits' layout: unit class stride.
at::Tensor soft_target(const at::Tensor& target) {
  return target.size(1) <= 1 || target.stride(1) == 1 ? target : target.contiguous();
}

// (logits, target, weight, options...) -> (loss, lse, tsum)
void ce_soft_fwd(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const KernelCall k(op, stack, 3);
  const at::Tensor& logits = k.tensor(0);
  check_logits(logits, "ce_soft_fwd");
  check_soft_target(logits, k.tensor(1), "ce_soft_fwd");
  auto [w, W] = prepared_weight(k.optional(2), logits, "ce_soft_fwd");
  const at::Tensor t = soft_target(k.tensor(1));
  const int64_t rows = logits.size(0), C = logits.size(1);
  const auto opts = logits.options().dtype(acc_type(logits.scalar_type()));
  at::Tensor loss = at::empty({rows}, opts), tsum = at::empty({rows}, opts);
  at::Tensor lse = at::empty({rows}, logits.options().dtype(at::kDouble));
  if (rows > 0) {
    TORCH_CHECK(C > 0, "softmax_ext::ce_soft_fwd: no classes");
    const SoftFwdArgs a{logits.const_data_ptr(),
                        logits.stride(0),
                        C,
                        t.const_data_ptr(),
                        t.stride(0),
                        data_or_null(w),
                        k.opt.label_smoothing,
                        loss.mutable_data_ptr(),
                        lse.mutable_data_ptr<double>(),
                        tsum.mutable_data_ptr(),
                        k.opt.softcap};
    ce_soft_fwd_rows_run(logits.scalar_type(), a, rows, grain_for(C));
  }
  torch::jit::push(*stack, std::move(loss), std::move(lse), std::move(tsum));
}

// (grad_loss, logits, target, weight, lse, tsum, grad_lse[, grad_logits], options...): as
// ce_index_bwd, for soft targets.
void ce_soft_bwd(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const bool into = op.schema().returns().empty();
  const char* name = into ? "ce_soft_bwd_into" : "ce_soft_bwd";
  const KernelCall k(op, stack, into ? 8 : 7);
  const at::Tensor& logits = k.tensor(1);
  check_logits(logits, name);
  check_soft_target(logits, k.tensor(2), name);
  auto [w, W] = prepared_weight(k.optional(3), logits, name);
  const at::Tensor t = soft_target(k.tensor(2));
  const at::Tensor g = per_row(k.tensor(0), logits, "grad_loss");
  const at::Tensor ts = per_row(k.tensor(5), logits, "tsum").contiguous();
  const at::Tensor l = lse_of(k.tensor(4), logits);
  const at::Tensor gl = optional_per_row(k.optional(6), logits, "grad_lse");
  at::Tensor gx = into ? checked_grad_out(k.tensor(7), logits, {&t, &g, &ts, &l, &gl, &w}, name)
                       : reusable_empty(logits.sizes(), logits.options());
  if (logits.numel() > 0) {
    const SoftBwdArgs a{
        g.const_data_ptr(),  g.stride(0),           logits.const_data_ptr(),
        logits.stride(0),    logits.size(1),        t.const_data_ptr(),
        t.stride(0),         data_or_null(w),       l.const_data_ptr<double>(),
        ts.const_data_ptr(), k.opt.label_smoothing, gx.mutable_data_ptr(),
        k.opt.softcap,       data_or_null(gl),      gl.defined() ? gl.stride(0) : 0};
    ce_soft_bwd_rows_run(logits.scalar_type(), a, logits.size(0), grain_for(logits.size(1)));
  }
  if (!into) torch::jit::push(*stack, std::move(gx));
}

}  // namespace
}  // namespace sme

// Boxed: each kernel reads the option block by name (csrc/loss_options.h), so a new option needs
// no new parameter here.
TORCH_LIBRARY_IMPL(softmax_ext, CPU, m) {
  m.impl("ce_index_fwd", torch::CppFunction::makeFromBoxedFunction<&sme::ce_index_fwd>());
  m.impl("ce_index_bwd", torch::CppFunction::makeFromBoxedFunction<&sme::ce_index_bwd>());
  m.impl("ce_soft_fwd", torch::CppFunction::makeFromBoxedFunction<&sme::ce_soft_fwd>());
  m.impl("ce_soft_bwd", torch::CppFunction::makeFromBoxedFunction<&sme::ce_soft_bwd>());
  m.impl("ce_index_bwd_into", torch::CppFunction::makeFromBoxedFunction<&sme::ce_index_bwd>());
  m.impl("ce_soft_bwd_into", torch::CppFunction::makeFromBoxedFunction<&sme::ce_soft_bwd>());
}
