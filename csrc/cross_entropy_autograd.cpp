// softmax_ext::cross_entropy_index and ::cross_entropy_soft: cross-entropy with its reduction, and
// its one autograd node per target kind, the same for every device and backend.
//
// Forward calls the per-row kernel ce_*_fwd, reduces, and saves the logits, targets, weights and
// O(rows) statistics; backward scales the incoming gradient per row and calls ce_*_bwd. Kernels get
// the option block (csrc/loss_options.h) whole, as the operator received it.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "autograd_node.h"
#include "dispatch.h"
#include "loss_options.h"

namespace sme {
namespace {

// The arguments of cross_entropy_index / cross_entropy_soft: logits, target, weight, the option
// block, backend.
constexpr size_t kOptionsBegin = 3;

struct Call {
  at::Tensor logits, target, weight;  // weight undefined when absent
  std::vector<c10::IValue> options;   // the option block, passed on to the kernels as is
  LossOptions opt;
  int64_t backend = 0;

  // Pops the operator's arguments off the stack.
  static Call pop(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
    const auto& schema = op.schema();
    const size_t n = schema.arguments().size();
    auto args = torch::jit::last(*stack, n);
    Call c;
    c.logits = args[0].toTensor();
    c.target = args[1].toTensor();
    if (!args[2].isNone()) c.weight = args[2].toTensor();
    c.options.assign(args.begin() + kOptionsBegin, args.end() - 1);
    c.opt = LossOptions::read(schema, args, kOptionsBegin, n - 1);
    c.backend = args[n - 1].toInt();
    torch::jit::drop(*stack, n);
    return c;
  }
};

// A kernel's arguments: tensors (an undefined one is None), then the option block.
torch::jit::Stack kernel_args(std::initializer_list<at::Tensor> tensors,
                              const std::vector<c10::IValue>& options) {
  torch::jit::Stack s;
  s.reserve(tensors.size() + options.size());
  for (const at::Tensor& t : tensors) s.push_back(optional_tensor(t));
  s.insert(s.end(), options.begin(), options.end());
  return s;
}

// The number of classes as a plain integer. Under torch.compile and export these functions also run
// on fake tensors with symbolic shapes: the row count stays symbolic (sym_size everywhere), so a
// graph serves every batch size; the class count is a constant of the model, and guarding on it
// here is what makes it one.
int64_t class_count(const at::Tensor& logits) {
  return logits.sym_size(1).guard_int(__FILE__, __LINE__);
}

// ---- the reduction, for both target kinds -------------------------------------------------------

// PyTorch's denominator of a class-index mean: the number of non-ignored targets, or with class
// weights the sum of their weights. The gather uses clamped targets so that it can never assert on
// a device (an out-of-range target is reported by the kernels; its row is excluded here anyway).
at::Tensor index_mean_denominator(const Call& c) {
  const at::Tensor valid = c.target.ne(c.opt.ignore_index);
  // counted in the loss's dtype, as torch's total_weight: the division needs no type promotion
  if (!c.weight.defined()) return valid.sum(acc_type(c.logits.scalar_type()));
  return c.weight.gather(0, c.target.clamp(0, class_count(c.logits) - 1)).mul_(valid).sum();
}

// A mean divides by `denom` when it is defined, else by the number of rows: a soft-target mean,
// weighted or not, with no tensor (the row count stays symbolic under torch.compile).
at::Tensor reduce(const at::Tensor& rows, int64_t reduction, const at::Tensor& denom) {
  switch (reduction) {
    case at::Reduction::None:
      return rows;
    case at::Reduction::Sum:
      return rows.sum();
    case at::Reduction::Mean:
      return denom.defined() ? rows.sum().div_(denom) : rows.sum().div(rows.sym_size(0));
    default:
      TORCH_CHECK_VALUE(false, "softmax_ext: unknown reduction ", reduction);
  }
}

// The dtype of the operators' loss: the logits' (kernels and reductions work in the accumulation
// dtype; rounding here spares a float16/bfloat16 loss a second operator and autograd node), or the
// accumulation dtype while a z-loss is still to be added to it (then rounded once, in Python).
at::ScalarType loss_dtype(const at::Tensor& logits, const LossOptions& opt) {
  return opt.lse_square_scale == 0.0 ? logits.scalar_type() : acc_type(logits.scalar_type());
}

at::Tensor in_loss_dtype(const at::Tensor& loss, const at::Tensor& logits, const LossOptions& opt) {
  const at::ScalarType st = loss_dtype(logits, opt);
  return loss.scalar_type() == st ? loss : loss.to(st);
}

// The incoming gradient in the accumulation dtype, as the backward kernels read it.
at::Tensor in_acc_dtype(const at::Tensor& grad, const at::Tensor& logits) {
  const at::ScalarType acc = acc_type(logits.scalar_type());
  return grad.scalar_type() == acc ? grad : grad.to(acc);
}

// Whether `t` is an ordinary CPU tensor whose data this code may read: not a fake, functional,
// functorch-wrapped or Python-subclass tensor (torch.compile, torch.func), not meta.
bool plain_cpu(const at::Tensor& t) {
  static const c10::DispatchKeySet wrapped(
      {c10::DispatchKey::Python, c10::DispatchKey::Functionalize,
       c10::DispatchKey::FuncTorchGradWrapper, c10::DispatchKey::FuncTorchBatched,
       c10::DispatchKey::BatchedNestedTensor, c10::DispatchKey::PythonTLSSnapshot,
       c10::DispatchKey::Conjugate, c10::DispatchKey::Negative});
  return t.device().is_cpu() && t.layout() == at::kStrided && !t.key_set().has_any(wrapped) &&
         t.has_storage();
}

// The class-index reduction of plain CPU tensors in one loop: at a 256-row batch, the four small
// ATen ops of the general path below cost more than the loss kernel itself. The same values:
// sums in float64, rounded once to the accumulation dtype, the loss made in the logits' dtype; the
// denominator as index_mean_denominator.
template <typename A>
std::pair<at::Tensor, at::Tensor> reduce_index_cpu(const at::Tensor& rows, const Call& c) {
  const int64_t n = rows.size(0), rs = rows.stride(0), ts = c.target.stride(0);
  const A* r = rows.const_data_ptr<A>();
  const int64_t* t = c.target.const_data_ptr<int64_t>();
  const A* w = c.weight.defined() ? c.weight.const_data_ptr<A>() : nullptr;
  double total = 0, denom = 0;
  for (int64_t i = 0; i < n; ++i) {
    total += static_cast<double>(r[i * rs]);
    const int64_t ti = t[i * ts];
    if (ti != c.opt.ignore_index) denom += w ? static_cast<double>(w[ti]) : 1.0;
  }
  const auto out = c.logits.options().dtype(loss_dtype(c.logits, c.opt));
  if (c.opt.reduction == at::Reduction::Sum)
    return {at::scalar_tensor(static_cast<double>(static_cast<A>(total)), out), at::Tensor()};
  const at::Tensor d = at::scalar_tensor(denom, rows.options());
  // as torch: the sum and the denominator in the accumulation dtype, then their quotient
  return {
      at::scalar_tensor(static_cast<double>(static_cast<A>(total) / static_cast<A>(denom)), out),
      d};
}

// The loss of the per-row losses `rows` and, for a mean, its denominator (undefined otherwise).
std::pair<at::Tensor, at::Tensor> reduce_index(const at::Tensor& rows, const Call& c) {
  const int64_t reduction = c.opt.reduction;
  if (reduction != at::Reduction::None && plain_cpu(rows) && plain_cpu(c.target) &&
      (!c.weight.defined() ||
       (plain_cpu(c.weight) && c.weight.scalar_type() == rows.scalar_type()))) {
    // index targets were range-checked by the kernel, so w[t] is in bounds
    if (rows.scalar_type() == at::kFloat) return reduce_index_cpu<float>(rows, c);
    if (rows.scalar_type() == at::kDouble) return reduce_index_cpu<double>(rows, c);
  }
  at::Tensor denom;
  if (reduction == at::Reduction::Mean) denom = index_mean_denominator(c);
  return {in_loss_dtype(reduce(rows, reduction, denom), c.logits, c.opt), denom};
}

// d loss / d per-row loss: the gradient itself ('none') or a stride-0 expansion of a scalar.
at::Tensor row_scale(const at::Tensor& grad, int64_t reduction, const c10::SymInt& rows,
                     const at::Tensor& denom) {
  if (reduction == at::Reduction::None) return grad;
  const at::Tensor g = reduction != at::Reduction::Mean ? grad
                       : denom.defined()                ? grad.div(denom)
                                                        : grad.div(rows);
  return g.expand_symint({rows});
}

// An input as a source of torch::autograd::grad: itself, or a detached copy that requires a
// gradient when it does not (then only the gradient's own graph matters).
at::Tensor as_source(const at::Tensor& t) {
  return t.requires_grad() ? t : t.detach().requires_grad_(true);
}

// The backward as torch's own, for a differentiable backward: `outputs_of(inputs)` gives torch's
// cross-entropy of the saved inputs and each row's log-sum-exp; differentiated with a graph it
// gives exactly torch's second derivatives and gradients with respect to the incoming gradients
// (`grads`, one per output, undefined where that output got none). Only double backward pays for
// this; the first-order path builds no graph and calls the kernels. Empty when no graph arises.
template <typename OutputsOf>
variable_list differentiable_grads(const variable_list& grads, std::vector<at::Tensor> inputs,
                                   const std::vector<bool>& wanted, const OutputsOf& outputs_of) {
  std::vector<at::Tensor> sources;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!wanted[i]) continue;
    inputs[i] = as_source(inputs[i]);
    sources.push_back(inputs[i]);
  }
  const variable_list all = outputs_of(inputs);
  variable_list outs, outs_grads;
  for (size_t i = 0; i < all.size(); ++i) {
    if (!grads[i].defined()) continue;
    // No graph recorded (tensors of a torch.func transform that has returned, such as vjp's saved
    // ones, look as if they needed a gradient but record nothing): the caller's first-order path.
    if (!all[i].requires_grad()) return {};
    outs.push_back(all[i]);
    outs_grads.push_back(grads[i].to(all[i].scalar_type()));
  }
  const variable_list found =
      torch::autograd::grad(outs, sources, outs_grads, /*retain_graph=*/true,
                            /*create_graph=*/true, /*allow_unused=*/true);
  variable_list out(inputs.size());
  for (size_t i = 0, k = 0; i < inputs.size(); ++i) {
    if (!wanted[i]) continue;
    out[i] = found[k].defined() ? found[k] : at::zeros_like(inputs[i]);
    ++k;
  }
  return out;
}

// The logits as the kernels see them: soft-capped, cap * tanh(x / cap), when cap > 0 (for the
// differentiable backward, which differentiates this with torch's ops).
at::Tensor capped(const at::Tensor& x, double cap) {
  return cap > 0 ? x.div(cap).tanh().mul(cap) : x;
}

// The incoming gradients of (loss, lse) as the kernels take them: d loss in the accumulation
// dtype (zeros when only the log-sum-exp got a gradient) and d lse (undefined when it got none).
std::pair<at::Tensor, at::Tensor> loss_and_lse_grads(const variable_list& grads,
                                                     const at::Tensor& x, const at::Tensor& lse,
                                                     int64_t reduction) {
  at::Tensor gl = grads[1].defined() ? in_acc_dtype(grads[1], x) : at::Tensor();
  if (grads[0].defined()) return {in_acc_dtype(grads[0], x), gl};
  const auto opts = lse.options().dtype(acc_type(x.scalar_type()));
  return {reduction == at::Reduction::None ? at::zeros_symint(lse.sym_sizes(), opts)
                                           : at::zeros({}, opts),
          gl};
}

// Both outputs (loss, lse) of a cross-entropy operator come from `node`.
template <typename NodeRef>
void set_outputs_history(const at::Tensor& loss, const at::Tensor& lse, const NodeRef& node) {
  torch::autograd::set_history(loss, node);
  torch::autograd::set_history(lse, node);
}

// What both cross-entropy nodes keep: the inputs, the log-sum-exp, the option block as the
// operator received it, and the backend.
struct CrossEntropyNode : torch::autograd::Node {
  SavedVariable logits_, target_, weight_, lse_;
  std::vector<c10::IValue> options_;
  LossOptions opt_;
  int64_t backend_ = 0;

  void save(Call& c, const at::Tensor& lse) {
    logits_ = SavedVariable(c.logits, false);
    target_ = SavedVariable(c.target, false);
    weight_ = SavedVariable(c.weight, false);
    lse_ = SavedVariable(lse, /*is_output=*/true);  // also the operator's second output
    options_ = std::move(c.options);
    opt_ = c.opt;
    backend_ = c.backend;
  }

  void release_variables() override {
    for (SavedVariable* v : {&logits_, &target_, &weight_, &lse_}) v->reset_data();
  }
};

// ---- class-index targets ------------------------------------------------------------------------

const Kernel& index_fwd() {
  static const Kernel k("ce_index_fwd");
  return k;
}

const Kernel& index_bwd() {
  static const Kernel k("ce_index_bwd");
  return k;
}

struct CrossEntropyIndexBackward : CrossEntropyNode {
  SavedVariable denom_;

  variable_list apply(variable_list&& grads) override {
    if ((!grads[0].defined() && !grads[1].defined()) || !should_compute_output(0))
      return {at::Tensor()};
    const auto self = getptr();
    const at::Tensor x = logits_.unpack(self), t = target_.unpack(self), w = weight_.unpack(self);
    const at::Tensor lse = lse_.unpack(self);
    const auto [grad, grad_lse] = loss_and_lse_grads(grads, x, lse, opt_.reduction);
    if (differentiable_backward(grad, {x}) ||
        (grad_lse.defined() && differentiable_backward(grad_lse, {x}))) {
      variable_list r = differentiable_grads(grads, {x}, {true}, [&](const auto& in) {
        const at::Tensor xa = capped(in[0].to(grad.scalar_type()), opt_.softcap);
        return variable_list{at::cross_entropy_loss(xa, t, maybe(w), opt_.reduction,
                                                    opt_.ignore_index, opt_.label_smoothing),
                             at::logsumexp(capped(in[0].to(at::kDouble), opt_.softcap), {1})};
      });
      if (!r.empty()) return r;
    }
    const at::Tensor g = row_scale(grad, opt_.reduction, x.sym_size(0), denom_.unpack(self));
    return {
        index_bwd()(backend_, kernel_args({g, x, t, w, lse, grad_lse}, options_))[0].toTensor()};
  }

  std::string name() const override { return "CrossEntropyIndexBackward"; }

  void release_variables() override {
    CrossEntropyNode::release_variables();
    denom_.reset_data();
  }
};

// Registered twice: for the Autograd key (kAutograd, builds the node when the logits need a
// gradient) and for CompositeExplicitAutograd (below autograd: inference mode, tracing).
template <bool kAutograd>
void cross_entropy_index(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  Call c = Call::pop(op, stack);
  decltype(make_node<CrossEntropyIndexBackward>()) node;
  if (kAutograd && torch::autograd::compute_requires_grad(c.logits))
    node = make_node<CrossEntropyIndexBackward>();
  at::Tensor loss, lse, denom;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    torch::jit::Stack out =
        index_fwd()(c.backend, kernel_args({c.logits, c.target, c.weight}, c.options));
    lse = out[1].toTensor();
    std::tie(loss, denom) = reduce_index(out[0].toTensor(), c);
  }
  if (node) {
    node->set_next_edges(torch::autograd::collect_next_edges(c.logits));
    set_outputs_history(loss, lse, node);
    node->save(c, lse);
    node->denom_ = SavedVariable(denom, false);
  }
  torch::jit::push(*stack, std::move(loss), std::move(lse));
}

// ---- class-probability targets ------------------------------------------------------------------

const Kernel& soft_fwd() {
  static const Kernel k("ce_soft_fwd");
  return k;
}

const Kernel& soft_bwd() {
  static const Kernel k("ce_soft_bwd");
  return k;
}

struct CrossEntropySoftBackward : CrossEntropyNode {
  SavedVariable tsum_;

  variable_list apply(variable_list&& grads) override {
    const std::vector<bool> wanted = {should_compute_output(0), should_compute_output(1),
                                      should_compute_output(2)};
    if (!grads[0].defined() && !grads[1].defined()) return variable_list(3);
    const auto self = getptr();
    const at::Tensor x = logits_.unpack(self), t = target_.unpack(self), w = weight_.unpack(self);
    const at::Tensor lse = lse_.unpack(self);
    const auto [grad, grad_lse] = loss_and_lse_grads(grads, x, lse, opt_.reduction);
    if (differentiable_backward(grad, {x, t, w}) ||
        (grad_lse.defined() && differentiable_backward(grad_lse, {x, t, w}))) {
      variable_list r = differentiable_grads(grads, {x, t, w}, wanted, [&](const auto& in) {
        return variable_list{
            at::cross_entropy_loss(capped(in[0].to(grad.scalar_type()), opt_.softcap),
                                   in[1].to(grad.scalar_type()), maybe(in[2]), opt_.reduction, -100,
                                   opt_.label_smoothing),
            at::logsumexp(capped(in[0].to(at::kDouble), opt_.softcap), {1})};
      });
      if (!r.empty()) return r;
    }
    const at::Tensor g = row_scale(grad, opt_.reduction, x.sym_size(0), at::Tensor());
    variable_list out(3);
    if (wanted[0])
      out[0] = soft_bwd()(backend_,
                          kernel_args({g, x, t, w, lse, tsum_.unpack(self), grad_lse}, options_))[0]
                   .toTensor();
    // the log-sum-exp depends on the logits alone: target and weight gradients come from the loss
    if ((wanted[1] || wanted[2]) && grads[0].defined()) {
      // Rare (distillation with a learned teacher, learned class weights), so tensor ops on an
      // N x C temporary rather than a kernel:
      //   d loss / d target[c] = (1 - eps) * w[c] * (lse - x[c]) * g
      //   d loss / d w[c] = sum over rows of q[c] * (lse - x[c]) * g, q the smoothed target
      const double eps = opt_.label_smoothing;
      at::Tensor neg_logp = lse.unsqueeze(1) - capped(x.to(lse.scalar_type()), opt_.softcap);
      const at::Tensor gcol = g.unsqueeze(1);
      if (wanted[2]) {
        const at::Tensor q = t.to(lse.scalar_type()) * (1.0 - eps) + eps / class_count(x);
        out[2] = (neg_logp * q * gcol).sum(0).to(w.scalar_type());
      }
      if (wanted[1]) {
        if (w.defined()) neg_logp = neg_logp * w;
        out[1] = (neg_logp * (gcol * (1.0 - eps))).to(t.scalar_type());
      }
    }
    return out;
  }

  std::string name() const override { return "CrossEntropySoftBackward"; }

  void release_variables() override {
    CrossEntropyNode::release_variables();
    tsum_.reset_data();
  }
};

template <bool kAutograd>
void cross_entropy_soft(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  Call c = Call::pop(op, stack);
  decltype(make_node<CrossEntropySoftBackward>()) node;
  if (kAutograd && torch::autograd::compute_requires_grad(c.logits, c.target, c.weight))
    node = make_node<CrossEntropySoftBackward>();
  at::Tensor loss, lse, tsum;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    torch::jit::Stack out =
        soft_fwd()(c.backend, kernel_args({c.logits, c.target, c.weight}, c.options));
    lse = out[1].toTensor();
    tsum = out[2].toTensor();
    loss = in_loss_dtype(reduce(out[0].toTensor(), c.opt.reduction, at::Tensor()), c.logits, c.opt);
  }
  if (node) {
    node->set_next_edges(torch::autograd::collect_next_edges(c.logits, c.target, c.weight));
    set_outputs_history(loss, lse, node);
    node->save(c, lse);
    node->tsum_ = SavedVariable(tsum, false);
  }
  torch::jit::push(*stack, std::move(loss), std::move(lse));
}

}  // namespace
}  // namespace sme

TORCH_LIBRARY_IMPL(softmax_ext, Autograd, m) {
  m.impl("cross_entropy_index",
         torch::CppFunction::makeFromBoxedFunction<&sme::cross_entropy_index<true>>());
  m.impl("cross_entropy_soft",
         torch::CppFunction::makeFromBoxedFunction<&sme::cross_entropy_soft<true>>());
}

TORCH_LIBRARY_IMPL(softmax_ext, CompositeExplicitAutograd, m) {
  m.impl("cross_entropy_index",
         torch::CppFunction::makeFromBoxedFunction<&sme::cross_entropy_index<false>>());
  m.impl("cross_entropy_soft",
         torch::CppFunction::makeFromBoxedFunction<&sme::cross_entropy_soft<false>>());
}
