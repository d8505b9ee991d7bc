// The CPU row kernels as a table of function pointers, one table per instruction set
// (kernels_avx512.cpp, kernels_avx2.cpp, kernels_baseline.cpp), the table picked once per process.
//
// Each table is its own translation unit compiled for its ISA with a vector width that fits its
// registers (16 floats with AVX-512, 8 with AVX2, 4 with SSE2). One width for all (GCC's
// target_clones of 16-float code) left the AVX2 and baseline kernels without a register for a
// vector: every vector went through the stack, several times slower than torch.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "kernel_args.h"

// The x86-64 ISA-specific tables need GCC's `#pragma GCC target`; elsewhere only the baseline one.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SME_X86_KERNEL_SETS 1
#else
#define SME_X86_KERNEL_SETS 0
#endif

namespace sme {

// Work items [begin, end) of one kernel call.
template <typename Args>
using RangeKernel = void (*)(const Args&, int64_t begin, int64_t end);

// A kernel for each storage type.
template <typename Args>
struct TypedKernel {
  RangeKernel<Args> f32, f64, bf16, f16;
};

struct KernelSet {
  const char* isa;  // "avx512", "avx2" or "baseline"
  int lanes;        // floats per vector: rows per short-row block, columns per tile
  TypedKernel<SoftmaxFwdArgs> softmax_fwd_rows, softmax_fwd_tiles;
  TypedKernel<SoftmaxBwdArgs> softmax_bwd_rows, softmax_bwd_tiles;
  TypedKernel<IndexFwdArgs> ce_index_fwd_rows;
  TypedKernel<IndexBwdArgs> ce_index_bwd_rows;
  TypedKernel<SoftFwdArgs> ce_soft_fwd_rows;
  TypedKernel<SoftBwdArgs> ce_soft_bwd_rows;
};

#if SME_X86_KERNEL_SETS
extern const KernelSet kernels_avx512;
extern const KernelSet kernels_avx2;
#endif
extern const KernelSet kernels_baseline;

// The widest set this CPU runs, or the one SOFTMAX_EXT_CPU_ISA names (auto, avx512, avx2,
// baseline: a narrower one for tests and benchmarks; one the CPU lacks warns and falls back).
const KernelSet& cpu_kernels();

// The kernel for st over [0, n) with at::parallel_for.
template <typename Args>
void run_kernel(const TypedKernel<Args>& k, at::ScalarType st, const Args& a, int64_t n,
                int64_t grain) {
  RangeKernel<Args> f = nullptr;
  switch (st) {
    case at::kFloat:
      f = k.f32;
      break;
    case at::kDouble:
      f = k.f64;
      break;
    case at::kBFloat16:
      f = k.bf16;
      break;
    case at::kHalf:
      f = k.f16;
      break;
    default:
      TORCH_CHECK(false, "softmax_ext: unsupported dtype ", st);
  }
  at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) { f(a, b, e); });
}

}  // namespace sme
