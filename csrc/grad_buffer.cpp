#include "grad_buffer.h"

#include <cstdlib>
#include <cstring>
#include <mutex>

#include <c10/core/InferenceMode.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace sme {
namespace {

constexpr int64_t kMinBytes = 8 << 20;  // below this, malloc reuses memory by itself

std::mutex mu;
// Two slots: a softmax forward output (saved for backward) and the backward's gradient alternate.
at::Tensor cached[2];
int next_victim = 0;

bool enabled() {
  static const bool on = [] {
    const char* v = std::getenv("SOFTMAX_EXT_REUSE_BUFFERS");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return on;
}

// Ask for transparent huge pages on a fresh buffer before its first touch: 2 MiB faults instead of
// 4 KiB ones (512x fewer) where THP is in "madvise" mode. Advisory only; failures are ignored.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = 2u << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = end & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}

}  // namespace

at::Tensor reusable_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const int64_t nbytes =
      numel * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
  if (!enabled() || nbytes < kMinBytes || options.device().type() != c10::DeviceType::CPU) {
    return at::empty(sizes, options);
  }
  // A buffer made under inference_mode is an inference tensor: handing it out later to an op
  // whose output autograd saves (or that becomes x.grad) would fail or leak the mode, so a slot
  // serves only calls in the mode it was made in.
  const bool inference = c10::InferenceMode::is_enabled();
  std::lock_guard<std::mutex> lock(mu);
  for (at::Tensor& c : cached) {
    if (c.defined() && c.use_count() == 1 && c.storage().use_count() == 1 &&
        c.dtype() == options.dtype() && c.numel() == numel && c.is_inference() == inference) {
      return c.view(sizes);  // a fresh TensorImpl over the idle storage
    }
  }
  at::Tensor& slot = cached[next_victim];
  next_victim ^= 1;
  slot = at::empty(sizes, options);
  advise_huge_pages(slot);
  return slot.view(sizes);  // callers never get our own TensorImpl, so its metadata stays ours
}

int64_t empty_cache() {
  std::lock_guard<std::mutex> lock(mu);
  int64_t bytes = 0;
  for (at::Tensor& c : cached) {
    if (c.defined()) bytes += static_cast<int64_t>(c.storage().nbytes());
    c.reset();
  }
  return bytes;
}

}  // namespace sme
