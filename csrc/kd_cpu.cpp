// Run-time choice of the CPU kernel's instruction set: the wheel is built for any x86-64 (and
// aarch64), with AVX2 and AVX-512 variants of the kernel picked here when the CPU has them.
#include <cstdlib>
#include <cstring>

#include "kd_args.h"
#include "kd_cpu.h"

namespace kd {

namespace {

enum class Isa { kBaseline, kAvx2, kAvx512 };

Isa best_supported() {
#if defined(KD_CPU_X86_VARIANTS) && (defined(__x86_64__) || defined(_M_X64))
  __builtin_cpu_init();
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                  __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("f16c");
  const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
                  __builtin_cpu_supports("avx512vl");
  if (v4) return Isa::kAvx512;
  if (v3) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

Isa chosen() {
  static const Isa isa = [] {
    Isa best = best_supported();
    const char* want = std::getenv("KDKERNELS_CPU_ISA");
    if (want == nullptr) return best;
    if (std::strcmp(want, "baseline") == 0) return Isa::kBaseline;
    if (std::strcmp(want, "avx2") == 0 && best >= Isa::kAvx2) return Isa::kAvx2;
    return best;  // unknown names and unsupported requests keep the best supported
  }();
  return isa;
}

}  // namespace

const char* cpu_isa() {
  switch (chosen()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kBaseline: break;
  }
  return "baseline";
}

void kd_forward_cpu(const KDArgs& a) {
#if defined(KD_CPU_X86_VARIANTS)
  switch (chosen()) {
    case Isa::kAvx512: return avx512::forward(a);
    case Isa::kAvx2: return avx2::forward(a);
    case Isa::kBaseline: break;
  }
#endif
  baseline::forward(a);
}

}  // namespace kd
