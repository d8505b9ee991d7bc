// Fused softmax-cross-entropy on CPU: the operators (argument checks, option block, output
// buffers) around the row kernels of ce_kernels.h. The log-sum-exp is kept in float64 so that the
// backward can split it as hi + lo and compute exp((x - hi) - lo) as accurately as PyTorch computes
// exp(log_softmax), even for logits near 1e4.
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include "dispatch.h"
#include "grad_buffer.h"
#include "loss_options.h"
#include "kernel_set.h"

namespace sme {
namespace {
// ---- argument checks shared by the four operators -----------------------------------------------

void check_logits(const at::Tensor& x, const char* op) {
  check_floating(x, op);
  TORCH_CHECK(x.dim() == 2, "softmax_ext::", op, ": logits must be (rows, classes), got ",
              x.sizes());
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "softmax_ext::", op,
              ": logits must have unit class stride");
}

// Shape, dtype and range of class-index targets. The range check runs here, before the kernels:
// an exception must not unwind through the row kernels (inside at::parallel_for, it would end the
// process), and checking first also reports the first bad target, deterministically, as PyTorch
// does.
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
    run_kernel(cpu_kernels().ce_index_fwd_rows, logits.scalar_type(), a, rows, grain_for(C));
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
    run_kernel(cpu_kernels().ce_index_bwd_rows, logits.scalar_type(), a, logits.size(0),
               grain_for(logits.size(1)));
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
    run_kernel(cpu_kernels().ce_soft_fwd_rows, logits.scalar_type(), a, rows, grain_for(C));
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
    run_kernel(cpu_kernels().ce_soft_bwd_rows, logits.scalar_type(), a, logits.size(0),
               grain_for(logits.size(1)));
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
