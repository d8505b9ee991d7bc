// The Python module softmax_ext._C. Importing it runs the TORCH_LIBRARY_IMPL registrations of the
// CPU kernels; the operator schemas themselves are defined in softmax_ext/ops.py.
#include <torch/extension.h>

#include "convert_f16.h"
#include "grad_buffer.h"
#include "kernel_set.h"

namespace {

// Test hooks: the CPU kernels' float16 conversions on a contiguous CPU tensor, either the one the
// kernels use ("auto") or the portable one, so that tests can compare both with torch's.
at::Tensor f16_to_f32(const at::Tensor& h, bool portable) {
  TORCH_CHECK(h.scalar_type() == at::kHalf && h.is_contiguous() && h.is_cpu(),
              "expected a contiguous CPU float16 tensor");
  at::Tensor f = at::empty(h.sizes(), h.options().dtype(at::kFloat));
  (portable ? sme::f16_to_f32_portable : sme::f16_to_f32)(h.const_data_ptr<at::Half>(), h.numel(),
                                                          f.mutable_data_ptr<float>());
  return f;
}

at::Tensor f32_to_f16(const at::Tensor& f, bool portable) {
  TORCH_CHECK(f.scalar_type() == at::kFloat && f.is_contiguous() && f.is_cpu(),
              "expected a contiguous CPU float32 tensor");
  at::Tensor h = at::empty(f.sizes(), f.options().dtype(at::kHalf));
  (portable ? sme::f32_to_f16_portable : sme::f32_to_f16)(f.const_data_ptr<float>(), f.numel(),
                                                          h.mutable_data_ptr<at::Half>());
  return h;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "softmax_ext CPU kernels (registered with torch.library on import)";
  m.def("empty_cache", &sme::empty_cache,
        "Free the cached CPU gradient buffer; returns the bytes freed");
  m.def("_f16_to_f32", &f16_to_f32, "float16 -> float32 as the CPU kernels convert (test hook)");
  m.def("_f32_to_f16", &f32_to_f16, "float32 -> float16 as the CPU kernels round (test hook)");
  m.def(
      "_cpu_isa", [] { return std::string(sme::cpu_kernels().isa); },
      "The instruction set of the CPU kernels in use: avx512, avx2 or baseline "
      "(SOFTMAX_EXT_CPU_ISA picks a narrower one)");
  m.def("_f16_conversion_impl", &sme::f16_conversion_impl,
        "Which float16 conversion the CPU kernels use: avx512, f16c or portable");
}
