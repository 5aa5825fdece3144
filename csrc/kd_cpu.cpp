// Run-time choice of the CPU kernel's instruction set: the wheel is built for any x86-64 (and
// aarch64), with AVX2 and AVX-512 (with and without BF16) variants of the kernel picked here
// when the CPU has them.
#include <cstdlib>
#include <cstring>

#include "kd_args.h"
#include "kd_cpu.h"

namespace kd {

namespace {

// In order of preference; the names are KDKERNELS_CPU_ISA's values and cpu_isa()'s.
enum class Isa { kBaseline, kAvx2, kAvx512, kAvx512Bf16 };
constexpr const char* kIsaNames[] = {"baseline", "avx2", "avx512", "avx512_bf16"};

Isa best_supported() {
#if defined(KD_CPU_X86_VARIANTS) && (defined(__x86_64__) || defined(_M_X64))
  __builtin_cpu_init();
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                  __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("f16c");
  const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
                  __builtin_cpu_supports("avx512vl");
#if defined(KD_CPU_AVX512_BF16)
  if (v4 && __builtin_cpu_supports("avx512bf16")) return Isa::kAvx512Bf16;
#endif
  if (v4) return Isa::kAvx512;
  if (v3) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

Isa chosen() {
  static const Isa isa = [] {
    const Isa best = best_supported();
    const char* want = std::getenv("KDKERNELS_CPU_ISA");
    for (int i = 0; want != nullptr && i <= static_cast<int>(best); ++i) {
      if (std::strcmp(want, kIsaNames[i]) == 0) return static_cast<Isa>(i);
    }
    return best;  // unset, unknown names and unsupported requests keep the best supported
  }();
  return isa;
}

}  // namespace

const char* cpu_isa() { return kIsaNames[static_cast<int>(chosen())]; }

void kd_forward_cpu(const KDArgs& a) {
#if defined(KD_CPU_X86_VARIANTS)
  switch (chosen()) {
#if defined(KD_CPU_AVX512_BF16)
    case Isa::kAvx512Bf16: return avx512_bf16::forward(a);
#else
    case Isa::kAvx512Bf16:  // never chosen: best_supported() knows it is not built
#endif
    case Isa::kAvx512: return avx512::forward(a);
    case Isa::kAvx2: return avx2::forward(a);
    case Isa::kBaseline: break;
  }
#endif
  baseline::forward(a);
}

}  // namespace kd
