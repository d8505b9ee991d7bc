// The arguments of the CPU row kernels: plain data, filled in by the operators (softmax.cpp,
// cross_entropy.cpp) and read by the kernel sets compiled once per instruction set (kernel_set.h).
#pragma once

#include <cstdint>

namespace sme {

// ---- softmax / log_softmax: the tensor viewed as (outer, C, inner) ------------------------------

struct SoftmaxFwdArgs {
  const void* x;
  void* y;
  int64_t C, inner;
  bool log;
};

struct SoftmaxBwdArgs {
  const void* g;
  const void* y;
  void* gx;
  int64_t C, inner;
  bool log;
};

// ---- cross-entropy, class-index targets ---------------------------------------------------------

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

// ---- cross-entropy, class-probability targets ---------------------------------------------------

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

}  // namespace sme
