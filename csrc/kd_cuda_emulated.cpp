// The CUDA kernel of kd_cuda_kernel.cuh run by the host emulator (kd_cuda_emulator.h) on host
// memory: what the CPU test suite uses to test the CUDA code on machines without a GPU. The
// launch plan is the GPU's; only the shared-memory limit for the row copy is the caller's.
#include "kd_cuda_emulated.h"

#include "kd_cuda_kernel.cuh"

namespace kd {

const char* kd_forward_cuda_emulated(const KDArgs& a, size_t cache_limit) {
  if (a.num_rows == 0) return nullptr;
  if (a.num_rows > 0x7fffffffLL) return "the CUDA kernel takes at most 2^31 - 1 rows";
  unsigned long long counts[2] = {0, 0};
  const char* error = emu::launch(gpu::count_blocks(a), gpu::kCountThreads, 0,
                                  [&] { gpu::count_rows_kernel(a, counts); });
  if (error != nullptr) return error;
  using FusedKernel = void (*)(KDArgs, const unsigned long long*, bool);
  return gpu::launch_fused(a, cache_limit, [&](FusedKernel kernel, const LaunchPlan& plan) {
    return emu::launch(plan.blocks, plan.threads, plan.cache_bytes,
                       [&] { kernel(a, counts, plan.cache_bytes > 0); });
  });
}

LaunchPlan kd_cuda_launch_plan(const KDArgs& a, size_t cache_limit) {
  LaunchPlan chosen;
  gpu::launch_fused(a, cache_limit, [&](auto, const LaunchPlan& plan) -> const char* {
    chosen = plan;
    return nullptr;
  });
  return chosen;
}

}  // namespace kd
