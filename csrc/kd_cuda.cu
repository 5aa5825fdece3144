// Host side of the CUDA backend: launches the kernels of kd_cuda_kernel.cuh on the caller's
// stream and device, and turns every CUDA error into a message for the binding to raise.
#include <cstdlib>
#include <cstring>

#include "kd_cuda.h"
#include "kd_cuda_kernel.cuh"

namespace kd {
namespace {

// Restores the caller's current device on scope exit.
struct DeviceGuard {
  int previous = -1;
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&previous) == cudaSuccess && previous != device) cudaSetDevice(device);
  }
  ~DeviceGuard() {
    if (previous >= 0) cudaSetDevice(previous);
  }
};

// KDKERNELS_CUDA_ROW_CACHE=0 turns the shared-memory row copy off, to measure what it buys
// (read on every call, so a benchmark can compare both in one process).
bool row_cache_enabled() {
  const char* v = std::getenv("KDKERNELS_CUDA_ROW_CACHE");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

using FusedKernel = void (*)(KDArgs, const unsigned long long*, bool);

}  // namespace

const char* kd_forward_cuda(const KDArgs& a, void* stream_handle, int device, void* workspace) {
  if (a.num_rows == 0) return nullptr;
  if (a.num_rows > 0x7fffffffLL) return "the CUDA kernel takes at most 2^31 - 1 rows";
  DeviceGuard guard(device);
  auto stream = static_cast<cudaStream_t>(stream_handle);
  auto* counts = static_cast<unsigned long long*>(workspace);
  cudaError_t err = cudaMemsetAsync(counts, 0, 2 * sizeof(unsigned long long), stream);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  gpu::count_rows_kernel<<<gpu::count_blocks(a), gpu::kCountThreads, 0, stream>>>(a, counts);

  int cache_limit = 0;  // the most dynamic shared memory a block may opt in to
  if (row_cache_enabled()) {
    err = cudaDeviceGetAttribute(&cache_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (err != cudaSuccess) return cudaGetErrorString(err);
  }
  const char* problem = gpu::launch_fused(
      a, static_cast<size_t>(cache_limit), [&](FusedKernel kernel, LaunchPlan plan) -> const char* {
        if (plan.cache_bytes > 0) {
          cudaFuncAttributes attributes;
          cudaError_t e = cudaFuncGetAttributes(&attributes, kernel);
          if (e != cudaSuccess) return cudaGetErrorString(e);
          if (plan.cache_bytes + attributes.sharedSizeBytes > static_cast<size_t>(cache_limit)) {
            plan.cache_bytes = 0;  // the static shared memory leaves too little for the row
          } else if (plan.cache_bytes > static_cast<size_t>(attributes.maxDynamicSharedSizeBytes)) {
            e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(plan.cache_bytes));
            if (e != cudaSuccess) return cudaGetErrorString(e);
          }
        }
        kernel<<<plan.blocks, plan.threads, plan.cache_bytes, stream>>>(a, counts, plan.cache_bytes > 0);
        return nullptr;
      });
  if (problem != nullptr) return problem;
  err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

int cuda_device_count(const char** why) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    *why = cudaGetErrorString(err);
    cudaGetLastError();  // clear the error so later calls start clean
    return 0;
  }
  *why = count == 0 ? "no CUDA device" : "";
  return count;
}

}  // namespace kd
