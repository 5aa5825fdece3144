// How the fused kernel is launched: the plan for a problem on a device (warp rows, block rows,
// clusters, the shared-memory row copy, vector width) and the kernel instance that runs it. The
// GPU launch (kd_cuda.cu) and the host emulator (kd_cuda_emulated.cpp) both use it.
#pragma once

#include "kd_cuda_kernel.cuh"

namespace kd::gpu {
inline namespace KD_GPU_BUILD {

template <typename T>
bool rows_aligned(const void* base, int64_t row_stride, int width) {
  return reinterpret_cast<uintptr_t>(base) % (sizeof(T) * width) == 0 && row_stride % width == 0;
}

// What the device offers a launch: the dynamic shared memory one block may use (0 turns the
// row copy off) and the largest thread block cluster (1: none, before sm_90). Rows of at most
// warp_row_max_classes get a warp each (the tests lower it to run every case on block rows).
struct DeviceLimits {
  size_t smem_per_block = 0;
  int max_cluster = 1;
  int64_t warp_row_max_classes = 2048;
};

template <typename S, typename Tt>
LaunchPlan plan_launch(const KDArgs& a, const DeviceLimits& limits) {
  constexpr int V = pack_width<S, Tt>();
  const int64_t C = a.num_classes;
  bool vectorized = C % V == 0 && rows_aligned<S>(a.student, a.student_row_stride, V) &&
                    (a.grad == nullptr || rows_aligned<S>(a.grad, C, V));
  for (int m = 0; m < a.num_teachers; ++m)
    vectorized = vectorized && rows_aligned<Tt>(a.teachers[m], a.teacher_row_strides[m], V);
  LaunchPlan plan;
  plan.warp_rows = C <= limits.warp_row_max_classes;
  plan.vectorized = vectorized;
  if (plan.warp_rows) {
    constexpr int64_t rows_per_block = kWarpRowThreads / kWarpSize;
    plan.blocks = static_cast<unsigned>((a.num_rows + rows_per_block - 1) / rows_per_block);
    plan.threads = kWarpRowThreads;
    plan.smem_bytes = SmemLayout::of(kWarpRowThreads, kWarpSize).row;
    return plan;
  }
  // A long row: one block, or the smallest cluster whose blocks' spans fit in shared memory.
  const size_t header = SmemLayout::of(kBlockRowThreads, kBlockRowThreads).row;
  const int width = vectorized ? V : 1;
  for (int cluster = 1; cluster <= limits.max_cluster; cluster *= 2) {
    const size_t bytes = header + row_copy_bytes<S, Tt>(a, cluster_span_length(C, cluster, width));
    if (bytes <= limits.smem_per_block && a.num_rows * cluster <= 0x7fffffffLL) {
      plan.cache_row = true;
      plan.cluster = cluster;
      plan.smem_bytes = bytes;
      break;
    }
  }
  if (!plan.cache_row) plan.smem_bytes = header;  // pass 2 re-reads the row through L2
  plan.blocks = static_cast<unsigned>(a.num_rows * plan.cluster);
  plan.threads = kBlockRowThreads;
  return plan;
}

// The kernel instance a plan runs; `launch(kernel, plan)` launches it on the GPU or emulator.
template <typename S, typename Tt, typename Launch>
const char* launch_planned(const KDArgs& a, const DeviceLimits& limits, Launch&& launch) {
  constexpr int V = pack_width<S, Tt>();
  const LaunchPlan p = plan_launch<S, Tt>(a, limits);
  if (p.warp_rows) {
    return p.vectorized ? launch(kd_fwd_kernel<S, Tt, kWarpRowThreads, kWarpSize, V>, p)
                        : launch(kd_fwd_kernel<S, Tt, kWarpRowThreads, kWarpSize, 1>, p);
  }
  return p.vectorized ? launch(kd_fwd_kernel<S, Tt, kBlockRowThreads, kBlockRowThreads, V>, p)
                      : launch(kd_fwd_kernel<S, Tt, kBlockRowThreads, kBlockRowThreads, 1>, p);
}

template <typename S, typename Launch>
const char* launch_for_teacher(const KDArgs& a, const DeviceLimits& limits, Launch&& launch) {
  switch (a.teacher_dtype) {
    case DType::kFloat32: return launch_planned<S, float>(a, limits, launch);
    case DType::kFloat16: return launch_planned<S, f16>(a, limits, launch);
    case DType::kBFloat16: return launch_planned<S, bf16>(a, limits, launch);
    case DType::kFloat64: break;
  }
  return "the CUDA kernel takes float32/float16/bfloat16 teachers";
}

// Chooses the kernel for the dtypes and layout of `a` and hands it to `launch`.
template <typename Launch>
const char* launch_fused(const KDArgs& a, const DeviceLimits& limits, Launch&& launch) {
  switch (a.student_dtype) {
    case DType::kFloat32: return launch_for_teacher<float>(a, limits, launch);
    case DType::kFloat16: return launch_for_teacher<f16>(a, limits, launch);
    case DType::kBFloat16: return launch_for_teacher<bf16>(a, limits, launch);
    case DType::kFloat64: break;
  }
  return "the CUDA kernel takes float32/float16/bfloat16 students";
}

inline unsigned count_blocks(const KDArgs& a) {
  const int64_t blocks = (a.num_rows + kCountThreads - 1) / kCountThreads;
  return static_cast<unsigned>(blocks < 64 ? blocks : 64);
}

}  // namespace KD_GPU_BUILD
}  // namespace kd::gpu
