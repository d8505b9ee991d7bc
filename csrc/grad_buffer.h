// Reuse of large CPU output buffers (gradients, softmax outputs) between calls.
//
// A fresh multi-GB tensor costs more in first-touch page faults than the whole kernel (measured
// here: 1 GB takes ~0.9 s to fault in, ~0.11 s to write once mapped), because glibc returns large
// blocks to the OS on free. Like a caching allocator, we keep the last two large buffers and hand
// one out again only when nobody else holds it (tensor and storage use counts of one), so the reuse
// is invisible to callers. SOFTMAX_EXT_REUSE_BUFFERS=0 turns it off; softmax_ext.empty_cache()
// frees it.
#pragma once

#include <ATen/ATen.h>

namespace sme {

// An uninitialised contiguous CPU tensor, possibly a reused one.
at::Tensor reusable_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

// Drop the cached buffers; returns the bytes released.
int64_t empty_cache();

}  // namespace sme
