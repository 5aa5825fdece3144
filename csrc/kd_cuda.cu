// Host side of the CUDA backend: launches the kernels of kd_cuda_kernel.cuh on the caller's
// stream and device, and turns every CUDA error into a message for the binding to raise.
#include <cstdlib>
#include <cstring>

#include "kd_cuda.h"
#include "kd_cuda_launch.cuh"

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
// (read once per process, like every knob of docs/DESIGN.md "Environment variables").
bool row_cache_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("KDKERNELS_CUDA_ROW_CACHE");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return enabled;
}

using FusedKernel = void (*)(KDArgs, const unsigned long long*, LaunchPlan);

gpu::DeviceLimits device_limits(int device, const char** error) {
  gpu::DeviceLimits limits;
  int smem = 0, major = 0;
  cudaFuncAttributes code = {};  // the architecture the loaded kernels were compiled for
  cudaError_t err = cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&code, gpu::count_rows_kernel);
  if (err != cudaSuccess) *error = cudaGetErrorString(err);
  limits.smem_per_block = row_cache_enabled() ? static_cast<size_t>(smem) : 0;
  limits.max_cluster = max_cluster_size(major, code.ptxVersion);
  return limits;
}

// Launches one planned kernel. A cluster the device cannot co-schedule (checked with the
// occupancy API) falls back to a block per row that re-reads the row through L2.
const char* launch_kernel(FusedKernel kernel, LaunchPlan plan, const KDArgs& a,
                          const unsigned long long* counts, cudaStream_t stream) {
  cudaLaunchConfig_t config = {};
  cudaLaunchAttribute cluster = {};
  const auto configure = [&] {
    config.gridDim = dim3(plan.blocks);
    config.blockDim = dim3(plan.threads);
    config.dynamicSmemBytes = plan.smem_bytes;
    config.stream = stream;
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = static_cast<unsigned>(plan.cluster);
    cluster.val.clusterDim.y = 1;
    cluster.val.clusterDim.z = 1;
    config.attrs = plan.cluster > 1 ? &cluster : nullptr;
    config.numAttrs = plan.cluster > 1 ? 1 : 0;
  };
  constexpr size_t kDefaultSmemLimit = 48 << 10;
  if (plan.smem_bytes > kDefaultSmemLimit) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(plan.smem_bytes));
    if (err != cudaSuccess) return cudaGetErrorString(err);
  }
  configure();
  if (plan.cluster > 1) {
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess || clusters == 0) {
      cudaGetLastError();  // clear the failed query
      plan.blocks /= static_cast<unsigned>(plan.cluster);
      plan.cluster = 1;
      plan.cache_row = false;
      plan.smem_bytes = gpu::SmemLayout::of(plan.threads, plan.threads).row;
      configure();
    }
  }
  const cudaError_t err = cudaLaunchKernelEx(&config, kernel, a, counts, plan);
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* kd_forward_cuda(const KDArgs& a, void* stream_handle, int device, void* workspace) {
  if (a.sum_rows) return "sum_rows is the CPU kernel's: the CUDA kernel writes one loss per row";
  if (a.num_rows == 0) return nullptr;
  if (a.num_rows > 0x7fffffffLL) return "the CUDA kernel takes at most 2^31 - 1 rows";
  DeviceGuard guard(device);
  auto stream = static_cast<cudaStream_t>(stream_handle);
  // The "mean" denominators: num_items_in_batch when given (int64 on the device, read as is),
  // else the valid rows, counted on the device.
  auto* counts = static_cast<unsigned long long*>(workspace);
  cudaError_t err = cudaSuccess;
  if (a.row_counts != nullptr) {
    counts = reinterpret_cast<unsigned long long*>(const_cast<int64_t*>(a.row_counts));
  } else {
    err = cudaMemsetAsync(counts, 0, 2 * sizeof(unsigned long long), stream);
    if (err != cudaSuccess) return cudaGetErrorString(err);
    gpu::count_rows_kernel<<<gpu::count_blocks(a), gpu::kCountThreads, 0, stream>>>(a, counts);
  }
  const char* problem = nullptr;
  const gpu::DeviceLimits limits = device_limits(device, &problem);
  if (problem != nullptr) return problem;
  problem = gpu::launch_fused(a, limits, [&](FusedKernel kernel, const LaunchPlan& plan) {
    return launch_kernel(kernel, plan, a, counts, stream);
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
