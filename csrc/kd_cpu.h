// The CPU kernel, built once per instruction set (kd_cpu_kernel.cpp with -DKD_CPU_ISA=<isa>).
#pragma once

#include "kd_args.h"

namespace kd {
namespace baseline {
void forward(const KDArgs& a);
}
namespace avx2 {
void forward(const KDArgs& a);
}
namespace avx512 {
void forward(const KDArgs& a);
}
namespace avx512_bf16 {
void forward(const KDArgs& a);
}

// The instruction set kd_forward_cpu runs with here: "avx512_bf16", "avx512", "avx2" or
// "baseline". The environment variable KDKERNELS_CPU_ISA can lower it (for tests and
// benchmarks).
const char* cpu_isa();
}  // namespace kd
