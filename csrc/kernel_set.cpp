#include "kernel_set.h"

#include <cstdlib>
#include <string>

namespace sme {
namespace {

const KernelSet& best_supported() {
#if SME_X86_KERNEL_SETS
  if (__builtin_cpu_supports("x86-64-v4")) return kernels_avx512;
  if (__builtin_cpu_supports("x86-64-v3")) return kernels_avx2;
#endif
  return kernels_baseline;
}

bool supported(const KernelSet& k) {
#if SME_X86_KERNEL_SETS
  if (&k == &kernels_avx512) return __builtin_cpu_supports("x86-64-v4");
  if (&k == &kernels_avx2) return __builtin_cpu_supports("x86-64-v3");
#endif
  return &k == &kernels_baseline;
}

const KernelSet& choose() {
  const char* env = std::getenv("SOFTMAX_EXT_CPU_ISA");
  const std::string want = env ? env : "";
  if (want.empty() || want == "auto") return best_supported();
  const KernelSet* k = nullptr;
#if SME_X86_KERNEL_SETS
  if (want == "avx512") k = &kernels_avx512;
  if (want == "avx2") k = &kernels_avx2;
#endif
  if (want == "baseline") k = &kernels_baseline;
  TORCH_CHECK(k != nullptr, "SOFTMAX_EXT_CPU_ISA must be auto, avx512, avx2 or baseline, got '",
              want, "'", SME_X86_KERNEL_SETS ? "" : " (this build has only the baseline kernels)");
  if (!supported(*k)) {
    TORCH_WARN("softmax_ext: SOFTMAX_EXT_CPU_ISA=", want, " but this CPU lacks it; using ",
               best_supported().isa);
    return best_supported();
  }
  return *k;
}

}  // namespace

const KernelSet& cpu_kernels() {
  static const KernelSet& k = choose();  // a throw leaves it unset: the next call asks again
  return k;
}

}  // namespace sme
