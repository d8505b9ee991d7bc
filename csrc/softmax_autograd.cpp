// softmax_ext::softmax: softmax or log_softmax along a dim, and its one autograd node, the same for
// every device and backend. The backward needs only the forward's output.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "autograd_node.h"

namespace sme {
namespace {

const Kernel& softmax_fwd() {
  static const Kernel k("softmax_fwd");
  return k;
}

const Kernel& softmax_bwd() {
  static const Kernel k("softmax_bwd");
  return k;
}

struct SoftmaxBackward : torch::autograd::Node {
  SavedVariable out_;
  int64_t dim_ = 0;
  bool log_ = false;
  int64_t backend_ = 0;

  variable_list apply(variable_list&& grads) override {
    const at::Tensor& grad = grads[0];
    if (!grad.defined() || !should_compute_output(0)) return {at::Tensor()};
    const at::Tensor y = out_.unpack(getptr());
    if (differentiable_backward(grad, {y})) {
      // create_graph=True (or torch.func): a formula differentiable in grad and in y, whose own
      // gradient reaches the input through this node again
      if (log_) return {grad - y.exp() * grad.sum(dim_, /*keepdim=*/true)};
      return {y * (grad - (grad * y).sum(dim_, /*keepdim=*/true))};
    }
    return {softmax_bwd()(backend_, {grad.contiguous(), y, dim_, log_})[0].toTensor()};
  }

  std::string name() const override { return log_ ? "LogSoftmaxBackward" : "SoftmaxBackward"; }

  void release_variables() override { out_.reset_data(); }
};

// Arguments: input, dim, log, backend. Registered for the Autograd key (kAutograd: builds the node
// when the input needs a gradient) and for CompositeExplicitAutograd (below autograd).
template <bool kAutograd>
void softmax(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  auto args = torch::jit::last(*stack, 4);
  const at::Tensor input = args[0].toTensor();
  const int64_t dim = args[1].toInt(), backend = args[3].toInt();
  const bool log = args[2].toBool();
  torch::jit::drop(*stack, 4);
  decltype(make_node<SoftmaxBackward>()) node;
  if (kAutograd && torch::autograd::compute_requires_grad(input))
    node = make_node<SoftmaxBackward>();
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    out = softmax_fwd()(backend, {input.contiguous(), dim, log})[0].toTensor();
  }
  if (node) {
    node->set_next_edges(torch::autograd::collect_next_edges(input));
    torch::autograd::set_history(out, node);
    node->out_ = SavedVariable(out, /*is_output=*/true);
    node->dim_ = dim;
    node->log_ = log;
    node->backend_ = backend;
  }
  torch::jit::push(*stack, std::move(out));
}

}  // namespace
}  // namespace sme

TORCH_LIBRARY_IMPL(softmax_ext, Autograd, m) {
  m.impl("softmax", torch::CppFunction::makeFromBoxedFunction<&sme::softmax<true>>());
}

TORCH_LIBRARY_IMPL(softmax_ext, CompositeExplicitAutograd, m) {
  m.impl("softmax", torch::CppFunction::makeFromBoxedFunction<&sme::softmax<false>>());
}
