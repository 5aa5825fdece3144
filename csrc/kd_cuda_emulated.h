// The CUDA kernel on the host emulator, for tests on machines without a GPU.
#pragma once

#include <cstddef>

#include "kd_args.h"
#include "kd_cuda_plan.h"

namespace kd {

// Runs the CUDA kernel's code on host memory; `cache_limit` is the shared memory a block may use
// for its row copy (0 tests the path that re-reads the row). Returns nullptr or what went wrong.
const char* kd_forward_cuda_emulated(const KDArgs& a, size_t cache_limit);

// The launch the GPU would make for `a` with `cache_limit` bytes of shared memory per block.
LaunchPlan kd_cuda_launch_plan(const KDArgs& a, size_t cache_limit);

}  // namespace kd
