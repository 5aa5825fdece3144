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

// The largest thread block cluster a launch may use: clusters need an sm_90+ device AND device
// code compiled for sm_90+ (`code_arch`: the PTX architecture of the loaded kernels, from
// cudaFuncGetAttributes). A wheel built only for sm_80 runs on an H100 from compute_80 code,
// which has no cluster support: there every block of a "cluster" would take the first span of
// the row. So the choice follows what the loaded binary supports, not only the device.
inline int max_cluster_size(int device_major, int code_arch) {
  return device_major >= 9 && code_arch >= 90 ? 8 : 1;  // 8: the portable cluster size
}

}  // namespace kd
