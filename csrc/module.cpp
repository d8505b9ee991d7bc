// The Python module softmax_ext._C. Importing it runs the TORCH_LIBRARY_IMPL registrations of the
// CPU kernels; the operator schemas themselves are defined in softmax_ext/ops.py.
#include <torch/extension.h>

#include "grad_buffer.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "softmax_ext CPU kernels (registered with torch.library on import)";
  m.def("empty_cache", &sme::empty_cache,
        "Free the cached CPU gradient buffer; returns the bytes freed");
}
