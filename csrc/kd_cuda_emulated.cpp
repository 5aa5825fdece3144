// The CUDA kernel of kd_cuda_kernel.cuh run by the host emulator (kd_cuda_emulator.h) on host
// memory: what the CPU test suite uses to test the CUDA code on machines without a GPU. The
// launch plan is the GPU's, for the device limits the caller describes.
#include "kd_cuda_emulated.h"

#include "kd_cuda_launch.cuh"

namespace kd {
namespace {

using FusedKernel = void (*)(KDArgs, const unsigned long long*, LaunchPlan);

gpu::DeviceLimits limits_of(const EmulatedDevice& device) {
  gpu::DeviceLimits limits;
  limits.smem_per_block = device.smem_per_block;
  limits.max_cluster = device.max_cluster;
  limits.warp_row_max_classes = device.warp_row_max_classes;
  return limits;
}

}  // namespace

const char* kd_forward_cuda_emulated(const KDArgs& a, const EmulatedDevice& device) {
  if (a.sum_rows) return "sum_rows is the CPU kernel's: the CUDA kernel writes one loss per row";
  if (a.num_rows == 0) return nullptr;
  if (a.num_rows > 0x7fffffffLL) return "the CUDA kernel takes at most 2^31 - 1 rows";
  unsigned long long counts[2] = {0, 0};
  if (a.row_counts != nullptr) {  // num_items_in_batch
    counts[0] = static_cast<unsigned long long>(a.row_counts[0]);
    counts[1] = static_cast<unsigned long long>(a.row_counts[1]);
  } else {
    const char* error = emu::launch(gpu::count_blocks(a), gpu::kCountThreads, 0,
                                    [&] { gpu::count_rows_kernel(a, counts); });
    if (error != nullptr) return error;
  }
  return gpu::launch_fused(a, limits_of(device), [&](FusedKernel kernel, const LaunchPlan& plan) {
    return emu::launch(plan.blocks, plan.threads, plan.smem_bytes,
                       [&] { kernel(a, counts, plan); }, static_cast<unsigned>(plan.cluster));
  });
}

LaunchPlan kd_cuda_launch_plan(const KDArgs& a, const EmulatedDevice& device) {
  LaunchPlan chosen;
  gpu::launch_fused(a, limits_of(device), [&](FusedKernel, const LaunchPlan& plan) -> const char* {
    chosen = plan;
    return nullptr;
  });
  return chosen;
}

}  // namespace kd
