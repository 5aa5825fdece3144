// How the CUDA kernel is launched for a problem (chosen by kd::gpu::plan_launch): the same on
// the GPU and on the host emulator, and reported to the tests so they can see which paths ran.
#pragma once

#include <cstddef>

namespace kd {

struct LaunchPlan {
  bool warp_rows = false;   // a warp per row (short rows) or a block per row
  bool vectorized = false;  // 16-byte accesses (every row start aligned, C a multiple of the width)
  size_t cache_bytes = 0;   // dynamic shared memory for the row copy; 0: pass 2 re-reads the row
  unsigned blocks = 0, threads = 0;
};

}  // namespace kd
