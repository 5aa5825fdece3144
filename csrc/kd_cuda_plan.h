// How the CUDA kernel is launched for a problem (chosen by kd::gpu::plan_launch): the same on
// the GPU and on the host emulator, and reported to the tests so they can see which paths ran.
#pragma once

#include <cstddef>

namespace kd {

struct LaunchPlan {
  bool warp_rows = false;   // a warp per row (short rows) or a block (or a cluster) per row
  bool vectorized = false;  // 16-byte accesses (every row start aligned, C a multiple of the width)
  bool cache_row = false;   // pass 1 copies the row into shared memory, pass 2 reads the copy
  int cluster = 1;          // blocks per row: a thread block cluster that shares out one long row
  size_t smem_bytes = 0;    // dynamic shared memory per block: reduction scratch + the row copy
  unsigned blocks = 0, threads = 0;
};

}  // namespace kd
