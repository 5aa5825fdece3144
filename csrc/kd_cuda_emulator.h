// A small CUDA emulator for the host, so the CUDA kernel's own code (thread indexing, warp
// shuffles, barriers, shared memory, vector loads) is tested on machines without a GPU. It is
// included instead of the CUDA headers when kd_cuda_kernel.cuh is compiled by the host compiler.
//
// Every thread of a block is a fiber (ucontext) on the calling OS thread; the blocks of one
// thread block cluster run together (they wait for each other), clusters one after another.
// Shared memory is the dynamic kind only, one buffer per block, since the blocks of a cluster
// run at once (a function-static `__shared__` would be shared between them).
// Barriers and shuffles switch fibers cooperatively. Three contract violations are reported
// instead of hanging or passing silently: a barrier no fiber can ever pass (a __syncthreads or
// shuffle some threads skip), a thread that exits while others wait for it at __syncthreads,
// and a full-warp shuffle after a lane of that warp has exited.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The running fiber's coordinates (blockDim and gridDim: the current launch's).
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(threads)

namespace kd::emu {

// Runs `kernel` for every block of `grid` with `block` threads (1-D launches only),
// `dynamic_smem` bytes of dynamic shared memory per block and `cluster` blocks per cluster.
// Returns nullptr, or what went wrong.
const char* launch(dim3 grid, dim3 block, size_t dynamic_smem, const std::function<void()>& kernel,
                   unsigned cluster = 1);

// Device-side primitives, valid only inside a kernel run by launch().
void sync_threads();
void sync_warp();
void sync_cluster();
uint32_t shuffle_xor_bits(uint32_t value, int lane_mask);
unsigned char* dynamic_shared_memory();
unsigned cluster_rank();
unsigned char* map_shared_rank(unsigned char* address, unsigned rank);

}  // namespace kd::emu

inline void __syncthreads() { kd::emu::sync_threads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { kd::emu::sync_warp(); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  static_assert(sizeof(T) == 4, "the emulator shuffles 32-bit values");
  (void)mask;  // the kernels always shuffle whole warps
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  bits = kd::emu::shuffle_xor_bits(bits, lane_mask);
  std::memcpy(&value, &bits, 4);
  return value;
}

// Fibers never run concurrently, so atomics are plain read-modify-writes.
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
  const unsigned long long old = *address;
  *address = old + value;
  return old;
}

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
