// The fused distillation loss on NVIDIA GPUs: one block per row. Pass 1 reads the row once and
// keeps per-thread online softmax states (running max and sum) of the student at T and at 1 and
// of the teachers, merged across the block with warp shuffles; pass 2 re-reads the row (from L2
// for all but the longest rows) to accumulate the soft term and write the gradient. The
// valid-row counts for "mean" come from a small counting kernel on the same stream: nothing
// synchronises with the host.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "kd_args.h"
#include "kd_cuda.h"
#include "kd_row_math.h"

namespace kd {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr float kNegInf = -INFINITY;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename S>
__device__ __forceinline__ S from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_f<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Online softmax state: running max m and sum l of exp(x - m); l_u sums exp((x - m) / T).
struct Online {
  float m = kNegInf, l = 0.f, l_u = 0.f;

  __device__ void add(float x, float inv_t) {
    if (x > m) {  // a new max (never taken by NaN, which reaches l below)
      l = l * __expf(m - x) + 1.f;
      l_u = l_u * __expf((m - x) * inv_t) + 1.f;
      m = x;
    } else if (x != kNegInf) {
      l += __expf(x - m);
      l_u += __expf((x - m) * inv_t);
    }
  }

  __device__ void merge(float m2, float l2, float lu2, float inv_t) {
    const float mx = fmaxf(m, m2);
    if (mx == kNegInf) return;  // both empty
    const float a = m == kNegInf ? 0.f : __expf(m - mx);
    const float b = m2 == kNegInf ? 0.f : __expf(m2 - mx);
    const float au = m == kNegInf ? 0.f : __expf((m - mx) * inv_t);
    const float bu = m2 == kNegInf ? 0.f : __expf((m2 - mx) * inv_t);
    l = l * a + l2 * b;
    l_u = l_u * au + lu2 * bu;
    m = mx;
  }
};

// Merges every thread's state into all threads' copies.
__device__ Online block_merge(Online s, float inv_t, float* smem) {
  for (int offset = 16; offset > 0; offset /= 2) {
    s.merge(__shfl_xor_sync(0xffffffffu, s.m, offset), __shfl_xor_sync(0xffffffffu, s.l, offset),
            __shfl_xor_sync(0xffffffffu, s.l_u, offset), inv_t);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // smem may still be read by a previous reduction
  if (lane == 0) {
    smem[3 * warp] = s.m;
    smem[3 * warp + 1] = s.l;
    smem[3 * warp + 2] = s.l_u;
  }
  __syncthreads();
  Online total;
  for (int w = 0; w < kWarps; ++w) total.merge(smem[3 * w], smem[3 * w + 1], smem[3 * w + 2], inv_t);
  return total;
}

__device__ float block_sum(float v, float* smem) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < kWarps; ++w) total += smem[w];
  return total;
}

template <typename Tt>
__device__ __forceinline__ float teacher_at(const KDArgs& a, int m, int64_t row, int64_t j) {
  return to_f(static_cast<const Tt*>(a.teachers[m])[row * a.teacher_row_strides[m] + j]);
}

template <typename Tt>
__device__ __forceinline__ float geometric_z(const KDArgs& a, int64_t row, int64_t j, float inv_t) {
  float z = 0.f;
  for (int m = 0; m < a.num_teachers; ++m) {
    const float w = static_cast<float>(a.teacher_weights[m]);
    if (w > 0.f) z += w * teacher_at<Tt>(a, m, row, j);
  }
  return z * inv_t;
}

__global__ void count_rows_kernel(KDArgs a, unsigned long long* counts) {
  unsigned long long soft = 0, hard = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < a.num_rows;
       i += int64_t(gridDim.x) * blockDim.x) {
    const RowRole role = row_role(a, a.labels ? a.labels[i] : 0);
    soft += role.soft;
    hard += role.hard;
  }
  if (soft) atomicAdd(counts, soft);
  if (hard) atomicAdd(counts + 1, hard);
}

template <typename S, typename Tt>
__global__ void __launch_bounds__(kThreads) kd_row_kernel(KDArgs a, const unsigned long long* counts) {
  __shared__ float smem[3 * kWarps];
  __shared__ float teacher_stats[2 * kMaxTeachers];  // arithmetic: each member's (max, sum)
  const int64_t row = blockIdx.x;
  const int64_t C = a.num_classes;
  const int64_t label = a.labels ? a.labels[row] : 0;
  const RowRole role = row_role(a, label);
  float* loss = static_cast<float*>(a.row_loss) + row;
  S* grad = a.grad ? static_cast<S*>(a.grad) + row * C : nullptr;
  if (role.bad || (!role.soft && !role.hard)) {
    const float v = role.bad ? NAN : 0.f;
    if (threadIdx.x == 0) *loss = v;
    if (grad)
      for (int64_t j = threadIdx.x; j < C; j += kThreads) grad[j] = from_f<S>(v);
    return;
  }
  const TermScales scales = term_scales(a, static_cast<int64_t>(counts[0]), static_cast<int64_t>(counts[1]));
  const S* s = static_cast<const S*>(a.student) + row * a.student_row_stride;
  const float inv_t = 1.f / static_cast<float>(a.temperature);
  const bool geometric = a.ensemble == Ensemble::kGeometric;

  // Pass 1: online statistics.
  Online st, zt;
  for (int64_t j = threadIdx.x; j < C; j += kThreads) {
    st.add(to_f(s[j]), inv_t);
    if (role.soft && geometric) zt.add(geometric_z<Tt>(a, row, j, inv_t), 1.f);
  }
  st = block_merge(st, inv_t, smem);
  if (role.soft && geometric) zt = block_merge(zt, 1.f, smem);
  if (role.soft && !geometric) {
    for (int m = 0; m < a.num_teachers; ++m) {
      Online mt;
      if (a.teacher_weights[m] > 0.0)
        for (int64_t j = threadIdx.x; j < C; j += kThreads) mt.add(teacher_at<Tt>(a, m, row, j) * inv_t, 1.f);
      mt = block_merge(mt, 1.f, smem);
      if (threadIdx.x == 0) {
        teacher_stats[2 * m] = mt.m;
        teacher_stats[2 * m + 1] = mt.l;
      }
    }
    __syncthreads();
  }
  const float m_s = st.m, log_ls = __logf(st.l), log_lu = __logf(st.l_u), m_u = m_s * inv_t;
  const float log_lz = __logf(zt.l);

  // Pass 2: soft term and gradient.
  const float cs = role.soft ? static_cast<float>(scales.soft_grad) : 0.f;
  const float ch = role.hard ? static_cast<float>(scales.hard_grad) : 0.f;
  const bool kl = a.soft_loss == SoftLoss::kKL;
  float soft_sum = 0.f;
  for (int64_t j = threadIdx.x; j < C; j += kThreads) {
    const float sj = to_f(s[j]);
    float g = 0.f;
    if (role.soft) {
      const float log_q = sj * inv_t - m_u - log_lu;
      float p, log_p;
      if (geometric) {
        log_p = geometric_z<Tt>(a, row, j, inv_t) - zt.m - log_lz;
        p = __expf(log_p);
      } else {
        p = 0.f;
        for (int m = 0; m < a.num_teachers; ++m) {
          const float w = static_cast<float>(a.teacher_weights[m]);
          if (w > 0.f)
            p += (w / teacher_stats[2 * m + 1]) *
                 __expf(teacher_at<Tt>(a, m, row, j) * inv_t - teacher_stats[2 * m]);
        }
        log_p = __logf(p);
      }
      soft_sum += weighted_or_zero(p, kl ? log_p - log_q : -log_q);
      g = cs * (__expf(log_q) - p);
    }
    if (role.hard) g += ch * (__expf(sj - m_s - log_ls) - (j == label ? 1.f : 0.f));
    if (grad) grad[j] = from_f<S>(g);
  }
  soft_sum = block_sum(soft_sum, smem);
  if (threadIdx.x == 0) {
    float v = 0.f;
    if (role.soft) v += static_cast<float>(scales.soft_loss) * soft_sum;
    if (role.hard) v += static_cast<float>(scales.hard_loss) * hard_term(m_s, st.l, to_f(s[label]));
    *loss = v;
  }
}

template <typename S>
void launch_for_teacher(const KDArgs& a, cudaStream_t stream, const unsigned long long* counts) {
  const dim3 grid(static_cast<unsigned>(a.num_rows));
  switch (a.teacher_dtype) {
    case DType::kFloat32: kd_row_kernel<S, float><<<grid, kThreads, 0, stream>>>(a, counts); break;
    case DType::kFloat16: kd_row_kernel<S, __half><<<grid, kThreads, 0, stream>>>(a, counts); break;
    case DType::kBFloat16:
      kd_row_kernel<S, __nv_bfloat16><<<grid, kThreads, 0, stream>>>(a, counts);
      break;
    case DType::kFloat64: break;
  }
}

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

}  // namespace

const char* kd_forward_cuda(const KDArgs& a, void* stream_handle, int device, void* workspace) {
  if (a.num_rows == 0) return nullptr;
  if (a.student_dtype == DType::kFloat64) return "the CUDA kernel takes float32/float16/bfloat16";
  if (a.num_rows > 0x7fffffffLL) return "the CUDA kernel takes at most 2^31 - 1 rows";
  DeviceGuard guard(device);
  auto stream = static_cast<cudaStream_t>(stream_handle);
  auto* counts = static_cast<unsigned long long*>(workspace);
  cudaError_t err = cudaMemsetAsync(counts, 0, 2 * sizeof(unsigned long long), stream);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  count_rows_kernel<<<64, 256, 0, stream>>>(a, counts);
  switch (a.student_dtype) {
    case DType::kFloat32: launch_for_teacher<float>(a, stream, counts); break;
    case DType::kFloat16: launch_for_teacher<__half>(a, stream, counts); break;
    case DType::kBFloat16: launch_for_teacher<__nv_bfloat16>(a, stream, counts); break;
    case DType::kFloat64: break;
  }
  err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

int cuda_device_count(const char** why) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    *why = cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky-free error state for later calls
    return 0;
  }
  *why = count == 0 ? "no CUDA device" : "";
  return count;
}

}  // namespace kd
