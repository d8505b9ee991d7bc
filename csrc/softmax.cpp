// softmax / log_softmax forward and backward on CPU, along any dim: the operators around the row
// kernels of softmax_kernels.h. The tensor is viewed as (outer, C, inner): contiguous rows when
// inner == 1, else tiles of the kernel set's lane count of neighbouring columns.
#include <torch/library.h>

#include "dispatch.h"
#include "grad_buffer.h"
#include "kernel_set.h"

namespace sme {
namespace {

struct Shape3 {
  int64_t outer, C, inner;
};

Shape3 shape3(const at::Tensor& t, int64_t dim) {
  const int64_t nd = std::max<int64_t>(t.dim(), 1);
  TORCH_CHECK_INDEX(dim >= 0 && dim < nd, "softmax_ext: dim ", dim, " out of range for a ", t.dim(),
                    "-d tensor");
  if (t.dim() == 0) return {1, 1, 1};
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < dim; ++d) outer *= t.size(d);
  for (int64_t d = dim + 1; d < t.dim(); ++d) inner *= t.size(d);
  return {outer, t.size(dim), inner};
}

at::Tensor softmax_fwd(const at::Tensor& input, int64_t dim, bool log) {
  check_floating(input, "softmax_fwd");
  const at::Tensor x = input.contiguous();
  at::Tensor y = reusable_empty(x.sizes(), x.options());
  const Shape3 s = shape3(x, dim);
  if (x.numel() == 0) return y;
  const SoftmaxFwdArgs a{x.const_data_ptr(), y.mutable_data_ptr(), s.C, s.inner, log};
  const KernelSet& k = cpu_kernels();
  if (s.inner == 1) {
    run_kernel(k.softmax_fwd_rows, x.scalar_type(), a, s.outer, grain_for(s.C));
  } else {
    const int64_t tiles = (s.inner + k.lanes - 1) / k.lanes;
    run_kernel(k.softmax_fwd_tiles, x.scalar_type(), a, s.outer * tiles, grain_for(s.C * k.lanes));
  }
  return y;
}

at::Tensor softmax_bwd(const at::Tensor& grad_output, const at::Tensor& output, int64_t dim,
                       bool log) {
  check_floating(output, "softmax_bwd");
  TORCH_CHECK(grad_output.sizes() == output.sizes(), "softmax_ext::softmax_bwd: grad_output ",
              grad_output.sizes(), " and output ", output.sizes(), " differ in shape");
  const at::Tensor y = output.contiguous();
  const at::Tensor g = grad_output.to(y.scalar_type()).contiguous();
  at::Tensor gx = reusable_empty(y.sizes(), y.options());
  const Shape3 s = shape3(y, dim);
  if (y.numel() == 0) return gx;
  const SoftmaxBwdArgs a{
      g.const_data_ptr(), y.const_data_ptr(), gx.mutable_data_ptr(), s.C, s.inner, log};
  const KernelSet& k = cpu_kernels();
  if (s.inner == 1) {
    run_kernel(k.softmax_bwd_rows, y.scalar_type(), a, s.outer, grain_for(s.C));
  } else {
    const int64_t tiles = (s.inner + k.lanes - 1) / k.lanes;
    run_kernel(k.softmax_bwd_tiles, y.scalar_type(), a, s.outer * tiles, grain_for(s.C * k.lanes));
  }
  return gx;
}

}  // namespace
}  // namespace sme

TORCH_LIBRARY_IMPL(softmax_ext, CPU, m) {
  m.impl("softmax_fwd", &sme::softmax_fwd);
  m.impl("softmax_bwd", &sme::softmax_bwd);
}
