// What the autograd nodes of csrc/*_autograd.cpp share: node allocation across torch versions, the
// kernels they call through the dispatcher, and boxed calls.
//
// The nodes are hand-written torch::autograd::Node subclasses, as PyTorch's generated ones are, not
// torch::autograd::Function: they cost less per call (which matters at a 256 x 10 batch, where the
// bookkeeping around a Function costs more than both kernels) and they work under the torch.func
// transforms (grad, vjp, jacrev, vmap), which refuse C++ Functions.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <type_traits>
#include <utility>

namespace sme {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// torch 2.11 holds autograd nodes in std::shared_ptr, later versions in c10::intrusive_ptr.
using NodePtr = decltype(std::declval<torch::autograd::Node&>().getptr());

template <class T>
auto make_node() {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>)
    return std::make_shared<T>();
  else
    return c10::make_intrusive<T>();
}

// The operators' `backend` argument (softmax_ext/ops.py: BACKEND_DEFAULT, BACKEND_TRITON).
constexpr int64_t kBackendTriton = 1;

// A per-backend kernel: softmax_ext::<name> (the device's kernels: C++ on CPU, Triton on CUDA) and
// softmax_ext_triton::<name> (Triton's interpreter on CPU tensors). Looked up on first use: the
// schemas are defined by softmax_ext/ops.py, which may import after this library.
class Kernel {
 public:
  explicit Kernel(const std::string& name)
      : default_(find("softmax_ext::" + name)), triton_(find("softmax_ext_triton::" + name)) {}

  // Runs the kernel on `args` (the schema's arguments, in order); returns its outputs.
  torch::jit::Stack operator()(int64_t backend, torch::jit::Stack args) const {
    (backend == kBackendTriton ? triton_ : default_).callBoxed(&args);
    return args;
  }

 private:
  static c10::OperatorHandle find(const std::string& name) {
    return c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), "");
  }
  c10::OperatorHandle default_, triton_;
};

// Whether this backward must itself be differentiable: backward with create_graph=True (or under
// torch.func, whose transforms differentiate with a graph) where the incoming gradient or a saved
// tensor still needs a gradient (a torch.func transform that has returned leaves neither).
inline bool differentiable_backward(const at::Tensor& grad,
                                    std::initializer_list<at::Tensor> saved) {
  if (!at::GradMode::is_enabled()) return false;
  if (grad.requires_grad()) return true;
  for (const at::Tensor& t : saved)
    if (t.defined() && t.requires_grad()) return true;
  return false;
}

inline std::optional<at::Tensor> maybe(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

inline c10::IValue optional_tensor(const at::Tensor& t) {
  return t.defined() ? c10::IValue(t) : c10::IValue();
}

}  // namespace sme
