// The CUDA kernel on the host emulator, for tests on machines without a GPU.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kd_args.h"
#include "kd_cuda_plan.h"

namespace kd {

// What the emulated device offers: shared memory per block (0 turns the row copy off) and the
// largest thread block cluster (1: none), so tests can steer the kernel down each path.
struct EmulatedDevice {
  size_t smem_per_block = 227 << 10;  // H100/H200
  int max_cluster = 8;
  int64_t warp_row_max_classes = 2048;
};

// Runs the CUDA kernel's code on host memory. Returns nullptr or what went wrong.
const char* kd_forward_cuda_emulated(const KDArgs& a, const EmulatedDevice& device);

// The launch the GPU would make for `a` on such a device.
LaunchPlan kd_cuda_launch_plan(const KDArgs& a, const EmulatedDevice& device);

}  // namespace kd
