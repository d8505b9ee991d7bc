// softmax_ext::cross_entropy_index: class-index cross-entropy with its reduction, differentiable in
// C++.
//
// The forward and backward call the per-row operators ce_index_fwd / ce_index_bwd through the
// dispatcher, so one autograd node serves every device those have kernels for (C++ on CPU, Triton
// on CUDA). Being a C++ autograd node rather than a Python torch.autograd.Function is the point: at
// small shapes (a 256 x 10 batch) the Python Function's bookkeeping, and the Python-level ops of
// the reduction, cost more than both kernels together.
#include <ATen/core/Reduction.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace sme {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using FwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                              const std::optional<at::Tensor>&,
                                                              int64_t, bool);
using BwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                          int64_t, bool);

// Looked up on first use: the schemas are defined by softmax_ext/ops.py, which may import after us.
const c10::TypedOperatorHandle<FwdSig>& fwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("softmax_ext::ce_index_fwd", "")
                             .typed<FwdSig>();
  return op;
}

const c10::TypedOperatorHandle<BwdSig>& bwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("softmax_ext::ce_index_bwd", "")
                             .typed<BwdSig>();
  return op;
}

std::optional<at::Tensor> defined_or_none(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// PyTorch's denominator of a mean: the number of non-ignored targets, or with class weights the sum
// of their weights. The gather uses clamped targets so that it can never assert on a device (an
// out-of-range target is reported by the kernels; its row is excluded here anyway).
at::Tensor mean_denominator(const at::Tensor& target, const at::Tensor& weight,
                            int64_t ignore_index, int64_t n_classes) {
  const at::Tensor valid = target.ne(ignore_index);
  if (!weight.defined()) return valid.sum();  // int64: dividing a float by it promotes
  return weight.gather(0, target.clamp(0, n_classes - 1)).mul_(valid).sum();
}

struct LossAndState {
  at::Tensor loss, lse, denom;
};

// The number of classes as a plain integer. Under torch.compile and export these functions also run
// on fake tensors with symbolic shapes: the row count stays symbolic (sym_size everywhere), so a
// graph serves every batch size; the class count is a constant of the model, and guarding on it
// here is what makes it one.
int64_t class_count(const at::Tensor& logits) {
  return logits.sym_size(1).guard_int(__FILE__, __LINE__);
}

LossAndState forward_impl(const at::Tensor& logits, const at::Tensor& target,
                          const at::Tensor& weight, int64_t ignore_index, double eps,
                          int64_t reduction) {
  const bool with_smooth = eps > 0.0;
  auto [nll, smooth, lse] =
      fwd_op().call(logits, target, defined_or_none(weight), ignore_index, with_smooth);
  at::Tensor rows = nll;
  if (with_smooth)
    rows = nll.mul(1.0 - eps).add_(smooth, eps / static_cast<double>(class_count(logits)));
  at::Tensor denom;
  switch (reduction) {
    case at::Reduction::None:
      return {rows, lse, denom};
    case at::Reduction::Sum:
      return {rows.sum(), lse, denom};
    case at::Reduction::Mean:
      denom = mean_denominator(target, weight, ignore_index, class_count(logits));
      return {rows.sum().div_(denom), lse, denom};
    default:
      TORCH_CHECK_VALUE(false, "softmax_ext::cross_entropy_index: unknown reduction ", reduction);
  }
}

// d loss / d per-row term, scaled by coef: grad itself ('none') or a stride-0 expansion of a
// scalar.
at::Tensor row_scale(const at::Tensor& grad, int64_t reduction, const c10::SymInt& rows,
                     const at::Tensor& denom, double coef) {
  at::Tensor g = reduction == at::Reduction::Mean ? grad.div(denom) : grad;
  if (coef != 1.0) g = g.mul(coef);
  return reduction == at::Reduction::None ? g : g.expand_symint({rows});
}

// The backward as torch's own, for backward with create_graph=True: torch's cross-entropy of the
// saved logits, differentiated with a graph, gives exactly its second derivatives (and gradients
// with respect to the incoming gradient). Only double backward pays for this; the first-order path
// builds no graph and calls the kernels.
at::Tensor differentiable_grad(const at::Tensor& grad, const at::Tensor& logits,
                               const at::Tensor& target, const at::Tensor& w, int64_t ignore_index,
                               double eps, int64_t reduction) {
  const at::Tensor loss = at::cross_entropy_loss(logits.to(grad.scalar_type()), target,
                                                 defined_or_none(w), reduction, ignore_index, eps);
  return torch::autograd::grad({loss}, {logits}, {grad}, /*retain_graph=*/true,
                               /*create_graph=*/true)[0];
}

struct CrossEntropyIndexFunction : public torch::autograd::Function<CrossEntropyIndexFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits,
                            const at::Tensor& target, const std::optional<at::Tensor>& weight,
                            int64_t ignore_index, double eps, int64_t reduction) {
    const at::Tensor w = weight.value_or(at::Tensor());
    LossAndState r = forward_impl(logits, target, w, ignore_index, eps, reduction);
    ctx->save_for_backward({logits, target, w, r.lse, r.denom});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["reduction"] = reduction;
    return r.loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &logits = saved[0], &target = saved[1], &w = saved[2], &lse = saved[3],
                     &denom = saved[4];
    const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    const double eps = ctx->saved_data["eps"].toDouble();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const c10::SymInt rows = logits.sym_size(0);
    const int64_t n_classes = class_count(logits);
    const bool with_smooth = eps > 0.0;
    at::Tensor grad_logits;
    if (at::GradMode::is_enabled()) {  // create_graph=True
      grad_logits = differentiable_grad(grads[0], logits, target, w, ignore_index, eps, reduction);
    } else {
      const at::Tensor g_nll = row_scale(grads[0], reduction, rows, denom, 1.0 - eps);
      const at::Tensor g_smooth = with_smooth ? row_scale(grads[0], reduction, rows, denom,
                                                          eps / static_cast<double>(n_classes))
                                              : g_nll;
      grad_logits = bwd_op().call(g_nll, g_smooth, logits, target, defined_or_none(w), lse,
                                  ignore_index, with_smooth);
    }
    return {grad_logits, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor cross_entropy_index_autograd(const at::Tensor& logits, const at::Tensor& target,
                                        const std::optional<at::Tensor>& weight,
                                        int64_t ignore_index, double label_smoothing,
                                        int64_t reduction) {
  return CrossEntropyIndexFunction::apply(logits, target, weight, ignore_index, label_smoothing,
                                          reduction);
}

// Below autograd (no_grad is not enough to get here: inference_mode, or tracing below the autograd
// key): the same forward, nothing saved.
at::Tensor cross_entropy_index_plain(const at::Tensor& logits, const at::Tensor& target,
                                     const std::optional<at::Tensor>& weight, int64_t ignore_index,
                                     double label_smoothing, int64_t reduction) {
  return forward_impl(logits, target, weight.value_or(at::Tensor()), ignore_index, label_smoothing,
                      reduction)
      .loss;
}

}  // namespace
}  // namespace sme

TORCH_LIBRARY_IMPL(softmax_ext, Autograd, m) {
  m.impl("cross_entropy_index", &sme::cross_entropy_index_autograd);
}

TORCH_LIBRARY_IMPL(softmax_ext, CompositeExplicitAutograd, m) {
  m.impl("cross_entropy_index", &sme::cross_entropy_index_plain);
}
