// The fused distillation loss on NVIDIA GPUs. nvcc compiles it in kd_cuda.cu; the host compiler
// compiles the same source against the emulator in kd_cuda_emulated.cpp for the CPU tests.
//
// A row is handled by a group of threads: a whole block (512 threads) for long rows, one warp
// for rows of at most 2048 classes (8 rows per block, so short rows keep many rows in flight),
// and a thread block cluster (sm_90) for rows too long for one block's shared memory: each block
// of the cluster owns a span of the row and the blocks merge their statistics through
// distributed shared memory.
// Pass 1 reads the row once with 16-byte loads where the layout allows and keeps per-thread
// online softmax states (max and sum) of the student at T and at 1 and of the teachers, merged
// across the group by warp shuffles (and shared memory across warps). When the row fits, pass 1
// also leaves a copy of it in shared memory, and pass 2 (soft term, gradient) reads that copy
// instead of global memory. Each thread re-reads only the elements it wrote itself, so the copy
// needs no barrier. Row-count scales for "mean" come from a counting kernel on the same stream:
// nothing synchronises with the host.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "kd_args.h"
#include "kd_cuda_compat.h"
#include "kd_cuda_plan.h"
#include "kd_row_math.h"

namespace kd::gpu {
inline namespace KD_GPU_BUILD {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kBlockRowThreads = 512;    // threads of a block that owns one row
constexpr int kWarpRowThreads = 256;     // threads of a block whose warps own one row each
constexpr int kCountThreads = 256;
constexpr float kNegInf = -INFINITY;

// Elements per vector access: 16 bytes of the wider of the two input types.
template <typename S, typename Tt>
constexpr int pack_width() {
  return 16 / static_cast<int>(sizeof(S) > sizeof(Tt) ? sizeof(S) : sizeof(Tt));
}

template <typename T, int K>
struct alignas(sizeof(T) * K) Pack {
  T v[K];
};

// Elements per access for V elements of T: all of them, or 16 bytes' worth.
template <typename T, int V>
constexpr int chunk() {
  return V * sizeof(T) <= 16 ? V : 16 / static_cast<int>(sizeof(T));
}

template <int V, typename T>
__device__ __forceinline__ void load(const T* p, float (&out)[V]) {
  constexpr int K = chunk<T, V>();
  KD_UNROLL
  for (int c = 0; c < V; c += K) {
    const Pack<T, K> pack = *reinterpret_cast<const Pack<T, K>*>(p + c);
    KD_UNROLL
    for (int k = 0; k < K; ++k) out[c + k] = to_f(pack.v[k]);
  }
}

template <int V, typename T>
__device__ __forceinline__ void store(T* p, const float (&in)[V]) {
  constexpr int K = chunk<T, V>();
  KD_UNROLL
  for (int c = 0; c < V; c += K) {
    Pack<T, K> pack;
    KD_UNROLL
    for (int k = 0; k < K; ++k) pack.v[k] = from_f<T>(in[c + k]);
    *reinterpret_cast<Pack<T, K>*>(p + c) = pack;
  }
}

// Online softmax state over values x: running max m (in x's units, so every x enters relative to
// the max and a constant added to a row cancels exactly) and the sum l of exp((x - m) * scale);
// with kTempered, l is at scale 1 and l_u at `scale` (the student's softmax at temperature T
// shares its max with the one at 1).
template <bool kTempered>
struct Online {
  float m = kNegInf, l = 0.f, l_u = 0.f;

  template <int V>
  __device__ void add(const float (&x)[V], float scale) {
    const float inv_t = scale, sl = kTempered ? 1.f : scale;
    float mx = x[0];
    KD_UNROLL
    for (int k = 1; k < V; ++k) mx = fmaxf(mx, x[k]);  // ignores NaN, which reaches l below
    if (mx > m) rescale(mx, inv_t);
    KD_UNROLL
    for (int k = 0; k < V; ++k) {
      if (x[k] == kNegInf) continue;  // exp(-inf - m) is 0, but -inf - -inf would be NaN
      l += __expf((x[k] - m) * sl);
      if constexpr (kTempered) l_u += __expf((x[k] - m) * inv_t);
    }
  }

  __device__ void merge(const Online& o, float scale) {
    const float inv_t = scale, sl = kTempered ? 1.f : scale;
    const float mx = fmaxf(m, o.m);
    if (mx == kNegInf) return;  // both empty
    l = l * __expf((m - mx) * sl) + o.l * __expf((o.m - mx) * sl);
    if constexpr (kTempered) l_u = l_u * __expf((m - mx) * inv_t) + o.l_u * __expf((o.m - mx) * inv_t);
    m = mx;
  }

 private:
  __device__ void rescale(float new_max, float scale) {
    const float inv_t = scale, sl = kTempered ? 1.f : scale;
    l *= __expf((m - new_max) * sl);
    if constexpr (kTempered) l_u *= __expf((m - new_max) * inv_t);
    m = new_max;
  }
};

template <bool kT>
__device__ Online<kT> warp_merge(Online<kT> s, float inv_t) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    Online<kT> o;
    o.m = __shfl_xor_sync(kFullMask, s.m, offset);
    o.l = __shfl_xor_sync(kFullMask, s.l, offset);
    if constexpr (kT) o.l_u = __shfl_xor_sync(kFullMask, s.l_u, offset);
    s.merge(o, inv_t);  // commutative, so every lane ends with the same bits
  }
  return s;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Group-wide merge and sum: every thread of the group gets the total. A block group goes
// through `scratch` (3 floats per warp), which the previous reduction may still be reading.
template <int kGroup, bool kT>
__device__ Online<kT> group_merge(Online<kT> s, float inv_t, float* scratch) {
  s = warp_merge(s, inv_t);
  if constexpr (kGroup > kWarpSize) {
    constexpr int kWarps = kGroup / kWarpSize;
    const int warp = threadIdx.x / kWarpSize;
    __syncthreads();
    if (threadIdx.x % kWarpSize == 0) {
      scratch[warp] = s.m;
      scratch[kWarps + warp] = s.l;
      scratch[2 * kWarps + warp] = s.l_u;
    }
    __syncthreads();
    Online<kT> total;
    for (int w = 0; w < kWarps; ++w) {
      Online<kT> o;
      o.m = scratch[w];
      o.l = scratch[kWarps + w];
      o.l_u = scratch[2 * kWarps + w];
      total.merge(o, inv_t);
    }
    s = total;
  }
  return s;
}

template <int kGroup>
__device__ float group_sum(float v, float* scratch) {
  v = warp_sum(v);
  if constexpr (kGroup > kWarpSize) {
    __syncthreads();
    if (threadIdx.x % kWarpSize == 0) scratch[threadIdx.x / kWarpSize] = v;
    __syncthreads();
    v = 0.f;
    for (int w = 0; w < kGroup / kWarpSize; ++w) v += scratch[w];
  }
  return v;
}

template <int kGroup>
__device__ float group_max(float v, float* scratch) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  if constexpr (kGroup > kWarpSize) {
    __syncthreads();
    if (threadIdx.x % kWarpSize == 0) scratch[threadIdx.x / kWarpSize] = v;
    __syncthreads();
    for (int w = 0; w < kGroup / kWarpSize; ++w) v = fmaxf(v, scratch[w]);
  }
  return v;
}

template <int kGroup>
__device__ __forceinline__ void group_sync() {
  if constexpr (kGroup > kWarpSize) {
    __syncthreads();
  } else {
    __syncwarp();
  }
}

template <typename Tt>
__device__ __forceinline__ const Tt* teacher_row(const KDArgs& a, int m, int64_t row) {
  return static_cast<const Tt*>(a.teachers[m]) + row * a.teacher_row_strides[m];
}

__device__ __forceinline__ bool finite(float x) { return x - x == 0.f; }

// The geometric teacher relative to the student, for V classes starting at j:
// D = sum_m w_m (t_m - s_hat), exact where teacher and student are close (where the KL cancels),
// with s_hat the student where finite and s_ref (its row's first finite value or 0) elsewhere.
// The combined teacher logit is then z = (D + s_hat - s_ref) / T: every term is a difference
// within the row, so a constant added to a row cancels exactly.
template <int V, typename Tt>
__device__ __forceinline__ void geometric_diff(const KDArgs& a, int64_t row, int64_t j,
                                               const float (&s_hat)[V], float (&diff)[V]) {
  KD_UNROLL
  for (int k = 0; k < V; ++k) diff[k] = 0.f;
  for (int m = 0; m < a.num_teachers; ++m) {
    const float w = static_cast<float>(a.teacher_weights[m]);
    if (w == 0.f) continue;
    float t[V];
    load<V>(teacher_row<Tt>(a, m, row) + j, t);
    KD_UNROLL
    for (int k = 0; k < V; ++k) diff[k] += w * (t[k] - s_hat[k]);
  }
}

template <int V>
__device__ __forceinline__ void student_hat(const float (&s)[V], float s_ref, float (&s_hat)[V]) {
  KD_UNROLL
  for (int k = 0; k < V; ++k) s_hat[k] = finite(s[k]) ? s[k] : s_ref;
}

constexpr size_t align16(size_t bytes) { return (bytes + 15) & ~size_t(15); }

constexpr int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

// Dynamic shared memory of a block, in this order: the reduction scratch (3 floats per warp of a
// group), each row's arithmetic-ensemble member statistics (max, sum), the slots the blocks of a
// cluster read each other's partial results from, then the optional copy of the row.
struct SmemLayout {
  // st (3), zt (2), each member (2), then one float each for the soft sum, max |D| and A.
  static constexpr int kMemberSlots = 5, kSoftSlot = kMemberSlots + 2 * kMaxTeachers;
  static constexpr int kDiffSlot = kSoftSlot + 1, kRowSumSlot = kSoftSlot + 2;
  static constexpr int kClusterSlots = kRowSumSlot + 1;

  size_t scratch, member_stats, cluster_slots, row;  // byte offsets

  __host__ __device__ static constexpr SmemLayout of(int threads, int group) {
    const size_t scratch_bytes = align16(sizeof(float) * 3 * (group / kWarpSize));
    const size_t stats_bytes = align16(sizeof(float) * 2 * kMaxTeachers * (threads / group));
    const size_t slot_bytes = align16(sizeof(float) * kClusterSlots);
    return {0, scratch_bytes, scratch_bytes + stats_bytes, scratch_bytes + stats_bytes + slot_bytes};
  }
};

// Bytes of the shared-memory copy of `len` classes of a row: the student in its own dtype, then
// the combined teacher logits z (geometric, float) or every member's row (arithmetic).
template <typename S, typename Tt>
size_t row_copy_bytes(const KDArgs& a, int64_t len) {
  const size_t n = static_cast<size_t>(len);
  const size_t teachers = combines_logits(a) ? n * sizeof(float)
                                                             : n * sizeof(Tt) * a.num_teachers;
  return align16(n * sizeof(S)) + align16(teachers);
}

// The classes [begin, end) of a row that one block of a cluster owns (the whole row without one);
// boundaries are multiples of V so every block's packs stay aligned.
struct Span {
  int64_t begin, end;
};

__host__ __device__ inline int64_t cluster_span_length(int64_t C, int cluster, int V) {
  return round_up((C + cluster - 1) / cluster, V);
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

// Combines the partial states the blocks of a cluster left in their `slot` (same offset in every
// block's shared memory): publish, one cluster barrier, read all. Each reduction has its own
// slot, written once per row, so no second barrier is needed before reuse.
template <bool kT>
__device__ Online<kT> cluster_merge(Online<kT> s, float inv_t, float* slot, int cluster) {
  if (threadIdx.x == 0) {
    slot[0] = s.m;
    slot[1] = s.l;
    if constexpr (kT) slot[2] = s.l_u;
  }
  cluster_sync();
  Online<kT> total;
  for (int r = 0; r < cluster; ++r) {
    const float* remote = cluster_map(slot, static_cast<unsigned>(r));
    Online<kT> o;
    o.m = remote[0];
    o.l = remote[1];
    if constexpr (kT) o.l_u = remote[2];
    total.merge(o, inv_t);
  }
  return total;
}

__device__ inline float cluster_max(float v, float* slot, int cluster) {
  if (threadIdx.x == 0) *slot = v;
  cluster_sync();
  float top = v;
  for (int r = 0; r < cluster; ++r) top = fmaxf(top, *cluster_map(slot, static_cast<unsigned>(r)));
  return top;
}

__device__ inline float cluster_sum(float v, float* slot, int cluster) {
  if (threadIdx.x == 0) *slot = v;
  cluster_sync();
  float total = 0.f;
  for (int r = 0; r < cluster; ++r) total += *cluster_map(slot, static_cast<unsigned>(r));
  return total;
}

// A row as the passes after the first see it: where its inputs are (global memory, or this
// block's shared-memory copy of its span) and the statistics pass 1 found.
template <typename S, typename Tt>
struct RowPass {
  const S* s_row;
  const S* s_cache;         // the student's span in shared memory, or null
  const float* diff_cache;  // geometric: D over the span, or null
  const Tt* t_cache;        // arithmetic: every member's span, or null
  const float* member_stats;  // arithmetic: (max, sum) per member
  int64_t row, span_begin, span_len;
  float inv_t, s_ref, m_s, l_s, log_ls, log_lu, m_z, log_lz, d_const;
  bool geometric, use_diff;
};

// Pass 1: online statistics of the student (at 1 and at T) and of the combined teacher, and
// the shared-memory copy of the row. The geometric teacher is kept as D = sum_m w_m (t_m - s)
// (see geometric_diff), with the largest finite |D|; an arithmetic member's (max, sum) goes
// to member_stats. Fills every statistic of `r`.
template <typename S, typename Tt, int kGroup, int V>
__device__ __forceinline__ void row_statistics(const KDArgs& a, bool soft, int cluster, int64_t first, int64_t step,
                               int64_t span_end, S* s_cache, float* diff_cache, Tt* t_cache,
                               float* member_stats, float* scratch, float* slots, RowPass<S, Tt>& r) {
  const int rank = threadIdx.x % kGroup;
  const float inv_t = r.inv_t;
  Online<true> st;
  Online<false> zt;
  float diff_max = 0.f;
  for (int64_t j = first; j < span_end; j += step) {
    float s[V];
    load<V>(r.s_row + j, s);
    if (s_cache) store<V>(s_cache + (j - r.span_begin), s);
    st.add(s, inv_t);
    if (soft && r.geometric) {
      float s_hat[V], diff[V], z[V];
      student_hat(s, r.s_ref, s_hat);
      geometric_diff<V, Tt>(a, r.row, j, s_hat, diff);
      if (diff_cache) store<V>(diff_cache + (j - r.span_begin), diff);
      KD_UNROLL
      for (int k = 0; k < V; ++k) {
        z[k] = (diff[k] + (s_hat[k] - r.s_ref)) * inv_t;
        if (finite(diff[k])) diff_max = fmaxf(diff_max, fabsf(diff[k]));
      }
      zt.add(z, 1.f);
    }
  }
  st = group_merge<kGroup>(st, inv_t, scratch);
  if (cluster > 1) st = cluster_merge(st, inv_t, slots, cluster);
  if (soft && r.geometric) {
    zt = group_merge<kGroup>(zt, 1.f, scratch);
    diff_max = group_max<kGroup>(diff_max, scratch);
    if (cluster > 1) {
      zt = cluster_merge(zt, 1.f, slots + 3, cluster);
      diff_max = cluster_max(diff_max, slots + SmemLayout::kDiffSlot, cluster);
    }
  }
  if (soft && !r.geometric) {  // one sweep per member: each has its own softmax
    for (int m = 0; m < a.num_teachers; ++m) {
      if (a.teacher_weights[m] == 0.0) continue;
      const Tt* t_row = teacher_row<Tt>(a, m, r.row);
      Online<false> mt;  // over the raw logits at scale 1/T: relative to the member's max
      for (int64_t j = first; j < span_end; j += step) {
        float t[V];
        load<V>(t_row + j, t);
        if (t_cache) store<V>(t_cache + m * r.span_len + (j - r.span_begin), t);
        mt.add(t, inv_t);
      }
      mt = group_merge<kGroup>(mt, inv_t, scratch);
      if (cluster > 1) mt = cluster_merge(mt, inv_t, slots + SmemLayout::kMemberSlots + 2 * m, cluster);
      if (rank == 0) {
        member_stats[2 * m] = mt.m;
        member_stats[2 * m + 1] = mt.l;
      }
    }
    group_sync<kGroup>();
  }
  r.m_s = st.m;
  r.l_s = st.l;
  r.log_ls = __logf(st.l);
  r.log_lu = __logf(st.l_u);
  r.m_z = zt.m;
  r.log_lz = __logf(zt.l);
  // Geometric: log p - log q = D / T + d_const. Near the teachers (every |D| / T small) that
  // form keeps d's digits; far from them, where it would cancel, the log-softmaxes are
  // subtracted instead (kdkernels/reference.py, _geometric_log_ratio).
  r.d_const = (r.m_s - r.s_ref) * inv_t - r.m_z - r.log_lz + r.log_lu;
  r.use_diff = diff_max * inv_t <= 64.f;
}

// log p_j of an arithmetic ensemble in log space, for a class where every member's share
// underflowed (p rounds to 0 but log p, which reverse KL needs, is finite); -inf only where every
// member's logit is -inf. o: the class's position in the row copy.
template <typename Tt>
__device__ __forceinline__ float arithmetic_log_p(const KDArgs& a, const Tt* t_cache, const float* member_stats,
                                  int64_t span_len, int64_t row, float inv_t, int64_t j, int64_t o) {
  float top = kNegInf, sum = 0.f;
  for (int m = 0; m < a.num_teachers; ++m) {
    const float w = static_cast<float>(a.teacher_weights[m]);
    if (w == 0.f) continue;
    const float t = to_f(t_cache ? t_cache[m * span_len + o] : teacher_row<Tt>(a, m, row)[j]);
    const float lp = (t - member_stats[2 * m]) * inv_t + __logf(w / member_stats[2 * m + 1]);
    if (lp > top) {
      sum = sum * __expf(top - lp) + 1.f;
      top = lp;
    } else if (lp > kNegInf) {
      sum += __expf(lp - top);
    }
  }
  return top > kNegInf ? top + __logf(sum) : kNegInf;
}

// The V classes from j as the soft term sees them: the student s, log q, and (soft rows) p,
// log p and d = log p - log q, from the shared-memory copy when there is one.
template <int V, typename S, typename Tt>
__device__ __forceinline__ void soft_inputs(const KDArgs& a, const RowPass<S, Tt>& r, bool soft, int64_t j,
                                            float (&s)[V], float (&log_q)[V], float (&p)[V],
                                            float (&log_p)[V], float (&d)[V]) {
  const int64_t o = j - r.span_begin;  // position in the row copy
  load<V>(r.s_cache ? r.s_cache + o : r.s_row + j, s);
  KD_UNROLL
  for (int k = 0; k < V; ++k) log_q[k] = (s[k] - r.m_s) * r.inv_t - r.log_lu;  // relative to the max
  if (soft && r.geometric) {
    float s_hat[V], diff[V];
    student_hat(s, r.s_ref, s_hat);
    if (r.diff_cache) {
      load<V>(r.diff_cache + o, diff);
    } else {
      geometric_diff<V, Tt>(a, r.row, j, s_hat, diff);
    }
    KD_UNROLL
    for (int k = 0; k < V; ++k) {
      log_p[k] = (diff[k] + (s_hat[k] - r.s_ref)) * r.inv_t - r.m_z - r.log_lz;
      p[k] = __expf(log_p[k]);
      d[k] = r.use_diff && finite(s[k]) ? diff[k] * r.inv_t + r.d_const : log_p[k] - log_q[k];
    }
  } else if (soft) {
    KD_UNROLL
    for (int k = 0; k < V; ++k) p[k] = 0.f;
    for (int m = 0; m < a.num_teachers; ++m) {
      const float w = static_cast<float>(a.teacher_weights[m]);
      if (w == 0.f) continue;
      const float scale = w / r.member_stats[2 * m + 1], max_m = r.member_stats[2 * m];
      float t[V];
      load<V>(r.t_cache ? r.t_cache + m * r.span_len + o : teacher_row<Tt>(a, m, r.row) + j, t);
      KD_UNROLL
      for (int k = 0; k < V; ++k) p[k] += scale * __expf((t[k] - max_m) * r.inv_t);
    }
    KD_UNROLL
    for (int k = 0; k < V; ++k) {
      log_p[k] = p[k] > 0.f ? __logf(p[k])
                            : arithmetic_log_p(a, r.t_cache, r.member_stats, r.span_len, r.row, r.inv_t,
                                               j + k, o + k);
      d[k] = log_p[k] - log_q[k];
    }
  }
}

// One class's share of the divergence (kd_row_math.h, the divergence axis).
__device__ __forceinline__ SoftElement<float> soft_element(const KDArgs& a, float p, float log_p, float d,
                                                            float q, float log_q) {
  const float beta = static_cast<float>(a.beta);
  return visit_divergence(divergence_of(a), [&](auto divergence) {
    return decltype(divergence)::element(p, log_p, d, q, log_q, beta);
  });
}

// One row per group of kGroup threads (a warp, or the whole block), or, with plan.cluster > 1,
// one row per cluster of blocks, each block owning a contiguous span of it. V classes per access.
// Pass 1 (row_statistics) reads the row; pass 2 sums the soft term and, for KL and CE, writes
// the gradient; a divergence whose gradient needs a row sum (reverse KL, JSD) writes it in a
// pass 3, once the sum is known.
template <typename S, typename Tt, int kThreads, int kGroup, int V>
__global__ void __launch_bounds__(kThreads)
    kd_fwd_kernel(KDArgs a, const unsigned long long* counts, LaunchPlan plan) {
  static_assert(kThreads % kGroup == 0 && kGroup % kWarpSize == 0, "groups are whole warps");
  constexpr int kRows = kThreads / kGroup;
  constexpr SmemLayout kLayout = SmemLayout::of(kThreads, kGroup);
  unsigned char* smem = dynamic_smem();
  float* scratch = reinterpret_cast<float*>(smem + kLayout.scratch);
  const int group = threadIdx.x / kGroup, rank = threadIdx.x % kGroup;
  float* member_stats = reinterpret_cast<float*>(smem + kLayout.member_stats) + group * 2 * kMaxTeachers;
  float* slots = reinterpret_cast<float*>(smem + kLayout.cluster_slots);

  const int cluster = plan.cluster;
  const int64_t row = cluster > 1 ? int64_t(blockIdx.x) / cluster : int64_t(blockIdx.x) * kRows + group;
  if (row >= a.num_rows) return;  // a whole group: only the last block of warp rows has these
  const int64_t C = a.num_classes;
  Span span{0, C};
  if (cluster > 1) {
    const int64_t len = cluster_span_length(C, cluster, V);
    span.begin = len * cluster_rank() < C ? len * cluster_rank() : C;
    span.end = span.begin + len < C ? span.begin + len : C;
  }
  const int64_t label = a.labels ? a.labels[row] : 0;
  const RowRole role = row_role(a, label);  // the same for the whole group or cluster
  float* loss = static_cast<float*>(a.row_loss) + row;
  S* grad = a.grad ? static_cast<S*>(a.grad) + row * C : nullptr;
  const bool leader = rank == 0 && (cluster == 1 || cluster_rank() == 0);
  if (role.bad || (!role.soft && !role.hard)) {
    const float v = role.bad ? NAN : 0.f;
    if (leader) *loss = v;
    if (grad)
      for (int64_t j = span.begin + rank; j < span.end; j += kGroup) grad[j] = from_f<S>(v);
    return;
  }
  const TermScales scales = term_scales(a, static_cast<int64_t>(counts[0]), static_cast<int64_t>(counts[1]));
  const int64_t first = span.begin + int64_t(rank) * V, step = int64_t(kGroup) * V;

  // The row copy holds this block's span: class j is at j - span.begin.
  RowPass<S, Tt> r{};
  r.row = row;
  r.s_row = static_cast<const S*>(a.student) + row * a.student_row_stride;
  r.span_begin = span.begin;
  r.span_len = span.end - span.begin;
  r.inv_t = 1.f / static_cast<float>(a.temperature);
  r.geometric = combines_logits(a);
  r.member_stats = member_stats;
  const float s_first = to_f(r.s_row[0]);
  r.s_ref = finite(s_first) ? s_first : 0.f;
  unsigned char* copy = smem + kLayout.row;
  S* s_cache = plan.cache_row ? reinterpret_cast<S*>(copy) : nullptr;
  unsigned char* teacher_copy = copy + align16(r.span_len * sizeof(S));
  float* diff_cache = plan.cache_row && r.geometric ? reinterpret_cast<float*>(teacher_copy) : nullptr;
  Tt* t_cache = plan.cache_row && !r.geometric ? reinterpret_cast<Tt*>(teacher_copy) : nullptr;
  row_statistics<S, Tt, kGroup, V>(a, role.soft, cluster, first, step, span.end, s_cache, diff_cache, t_cache,
                                   member_stats, scratch, slots, r);
  r.s_cache = s_cache;
  r.diff_cache = diff_cache;
  r.t_cache = t_cache;

  // Pass 2: the soft term (and its row sum A), and the gradient unless it needs A.
  const bool row_sum = visit_divergence(divergence_of(a), [](auto divergence) {
    return decltype(divergence)::row_sum_gradient;
  });
  const float cs = role.soft ? static_cast<float>(scales.soft_grad) : 0.f;
  const float ch = role.hard ? static_cast<float>(scales.hard_grad) : 0.f;
  // Captures by value: a reference to `r` would give it an address, and a stack frame.
  auto hard_part = [ch, hard = role.hard, m_s = r.m_s, log_ls = r.log_ls, label](float s, int64_t j) {
    return hard ? ch * (__expf(s - m_s - log_ls) - (j == label ? 1.f : 0.f)) : 0.f;
  };
  // The gradient is written here unless it needs A (then pass 3 writes it, and nothing of it is
  // formed here: the hard part costs an exponential per class).
  const bool write_now = grad != nullptr && !(row_sum && role.soft);
  float soft_sum = 0.f, qa_sum = 0.f;
  for (int64_t j = first; j < span.end; j += step) {
    float s[V], log_q[V], p[V], log_p[V], d[V], g[V];
    soft_inputs<V>(a, r, role.soft, j, s, log_q, p, log_p, d);
    KD_UNROLL
    for (int k = 0; k < V; ++k) {
      g[k] = write_now ? hard_part(s[k], j + k) : 0.f;
      if (role.soft) {
        const float q = __expf(log_q[k]);
        const SoftElement<float> e = soft_element(a, p[k], log_p[k], d[k], q, log_q[k]);
        soft_sum += e.term;
        qa_sum += e.qa;
        g[k] += cs * (q - p[k]);
      }
    }
    if (write_now) store<V>(grad + j, g);
  }
  soft_sum = group_sum<kGroup>(soft_sum, scratch);
  if (cluster > 1) soft_sum = cluster_sum(soft_sum, slots + SmemLayout::kSoftSlot, cluster);

  // Pass 3 (reverse KL, JSD): g = cs q (a - A) + the hard term's gradient.
  if (grad && row_sum && role.soft) {
    qa_sum = group_sum<kGroup>(qa_sum, scratch);
    if (cluster > 1) qa_sum = cluster_sum(qa_sum, slots + SmemLayout::kRowSumSlot, cluster);
    for (int64_t j = first; j < span.end; j += step) {
      float s[V], log_q[V], p[V], log_p[V], d[V], g[V];
      soft_inputs<V>(a, r, true, j, s, log_q, p, log_p, d);
      KD_UNROLL
      for (int k = 0; k < V; ++k) {
        const float q = __expf(log_q[k]);
        const SoftElement<float> e = soft_element(a, p[k], log_p[k], d[k], q, log_q[k]);
        g[k] = hard_part(s[k], j + k) + weighted_or_zero(cs * q, e.a - qa_sum);
      }
      store<V>(grad + j, g);
    }
  }
  if (cluster > 1) cluster_sync();  // no block leaves while another may still read its slots
  if (leader) {
    float v = 0.f;
    if (role.soft) v += static_cast<float>(scales.soft_loss) * soft_sum;
    if (role.hard) v += static_cast<float>(scales.hard_loss) * hard_term(r.m_s, r.l_s, to_f(r.s_row[label]));
    *loss = v;
  }
}

}  // namespace KD_GPU_BUILD
}  // namespace kd::gpu
