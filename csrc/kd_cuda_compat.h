// What the CUDA kernel needs from its compiler, in one place: storage types for float16 and
// bfloat16 with their conversions, fast exp/log, and dynamic shared memory. Under nvcc these are
// the CUDA intrinsics; under a host compiler they come from the host emulator
// (kd_cuda_emulator.h) and kd_dtype.h, so the same kernel source runs in the CPU test suite.
#pragma once

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>
#else
#include "kd_cuda_emulator.h"
#include "kd_dtype.h"
#endif

// The kernel's code lives in kd::gpu; its device and emulated builds are told apart by an inline
// namespace, so the two can sit in one library without clashing symbols.
#if defined(__CUDACC__)
#define KD_UNROLL _Pragma("unroll")
#define KD_GPU_BUILD device
#else
#define KD_UNROLL
#define KD_GPU_BUILD emulated
#endif

namespace kd::gpu {
inline namespace KD_GPU_BUILD {

#if defined(__CUDACC__)
using f16 = __half;
using bf16 = __nv_bfloat16;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(f16 v) { return __half2float(v); }
__device__ __forceinline__ float to_f(bf16 v) { return __bfloat162float(v); }

template <typename S>
__device__ __forceinline__ S from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ f16 from_f<f16>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ bf16 from_f<bf16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char kd_dynamic_smem[];
  return kd_dynamic_smem;
}

// Thread block clusters (sm_90+; the host launches clusters only there, so the fallbacks for
// older architectures are never reached with a cluster of more than one block).
__device__ __forceinline__ unsigned cluster_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().block_rank();
#else
  return 0;
#endif
}

__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::this_cluster().sync();
#else
  __syncthreads();
#endif
}

// The address of `p` (in this block's shared memory) in the shared memory of block `rank`.
template <typename T>
__device__ __forceinline__ T* cluster_map(T* p, unsigned rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().map_shared_rank(p, rank);
#else
  (void)rank;
  return p;
#endif
}
#else
using f16 = Half;
using bf16 = BFloat16;

inline float to_f(float v) { return v; }
inline float to_f(f16 v) { return to_float(v); }
inline float to_f(bf16 v) { return to_float(v); }

template <typename S>
inline S from_f(float v) {
  return from_acc<S>(v);
}

inline unsigned char* dynamic_smem() { return emu::dynamic_shared_memory(); }
inline unsigned cluster_rank() { return emu::cluster_rank(); }
inline void cluster_sync() { emu::sync_cluster(); }
template <typename T>
inline T* cluster_map(T* p, unsigned rank) {
  return reinterpret_cast<T*>(emu::map_shared_rank(reinterpret_cast<unsigned char*>(p), rank));
}
#endif

}  // namespace KD_GPU_BUILD
}  // namespace kd::gpu
