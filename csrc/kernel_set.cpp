#include "kernel_set.h"

#include <cstdlib>
#include <string>

namespace sme {
namespace {

// Every set of this build, widest first.
const KernelSet* const kSets[] = {
#if SME_X86_KERNEL_SETS
    &kernels_avx512,
    &kernels_avx2,
#endif
    &kernels_baseline,
};

bool runs_here(const KernelSet& k) {
#if SME_X86_KERNEL_SETS
  if (&k == &kernels_avx512) return __builtin_cpu_supports("x86-64-v4");
  if (&k == &kernels_avx2) return __builtin_cpu_supports("x86-64-v3");
#endif
  return true;  // baseline
}

const KernelSet& widest_here() {
  for (const KernelSet* k : kSets)
    if (runs_here(*k)) return *k;
  return kernels_baseline;
}

const KernelSet& choose() {
  const char* env = std::getenv("SOFTMAX_EXT_CPU_ISA");
  const std::string want = env ? env : "";
  if (want.empty() || want == "auto") return widest_here();
  for (const KernelSet* k : kSets) {
    if (want != k->isa) continue;
    if (runs_here(*k)) return *k;
    TORCH_WARN("softmax_ext: SOFTMAX_EXT_CPU_ISA=", want, " but this CPU lacks it; using ",
               widest_here().isa);
    return widest_here();
  }
  TORCH_CHECK(false, "SOFTMAX_EXT_CPU_ISA must be auto, avx512, avx2 or baseline, got '", want, "'",
              SME_X86_KERNEL_SETS ? "" : " (this build has only the baseline kernels)");
}

}  // namespace

const KernelSet& cpu_kernels() {
  static const KernelSet& k = choose();  // a throw leaves it unset: the next call asks again
  return k;
}

}  // namespace sme
