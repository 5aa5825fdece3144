// The fused distillation loss on the CPU: one call computes every row's weighted loss and, when
// asked, the student's gradient. A row is read from memory once: pass 1 converts it into a
// per-thread float buffer (student s, combined teacher z) and takes the maxima; pass 2 computes
// the three exponentials per element (teacher, student at T, student at 1) and the sums; pass 3
// writes the gradient from the buffered exponentials. The buffers are C floats each and stay in
// cache, so the only [N, C] memory touched is the inputs and the gradient.
//
// This file is compiled once per instruction set (baseline, AVX2, AVX-512 on x86-64), each into
// its own namespace kd::<isa>; kd_cpu.cpp picks one at run time.
#include <algorithm>
#include <array>
#include <limits>
#include <type_traits>
#include <vector>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kd_args.h"
#include "kd_dtype.h"
#include "kd_cpu.h"
#include "kd_row_math.h"

#ifndef KD_CPU_ISA
#error "compile this file once per instruction set, with -DKD_CPU_ISA=<namespace>"
#endif

namespace kd {
namespace KD_CPU_ISA {
namespace {

// Buffers of one thread: four rows of padded_classes(C) accumulator values. The student and
// teacher rows are padded with -inf up to a whole number of lane blocks, so the exponential
// pass runs full vector blocks only (exp(-inf) = 0 adds nothing); short rows (C = 10) would
// otherwise run entirely in the scalar tail.
template <typename Acc>
struct RowBuffers {
  Acc* s;  // student logits, then exp(s - m_s)
  Acc* z;  // combined teacher logits (or log p), then exp(z - m_z)
  Acc* u;  // exp(s / T - m_u)
  Acc* t;  // scratch for one teacher of an arithmetic ensemble
};

// Pass 2 computes from cache and leaves memory idle; it prefetches the thread's next row of
// every input into L2 meanwhile, so that pass 1 of that row no longer waits on DRAM.
struct NextRow {
  const char* rows[kMaxTeachers + 1];
  int64_t elem_bytes[kMaxTeachers + 1];
  int count = 0;

  void operator()(int64_t j) const {
    for (int r = 0; r < count; ++r) __builtin_prefetch(rows[r] + j * elem_bytes[r], 0, 2);
  }
};

// Row loops run in blocks of kLanes elements with one accumulator per lane: the inner loop is a
// plain vector loop (no reduction across lanes), so it vectorises at any width without letting
// the compiler reassociate floating-point sums; the lanes are combined once per row.
constexpr int64_t kLanes = 16;

// The float32 KL is recomputed accurately when it is below this fraction of its largest term
// (3e-3: a fuzz over T in [0.5, 100], C up to 8000, students near and far from their teachers
// kept every row within 1e-4 relative or 1e-9 absolute of float64, the worst at 0.43 of that).
constexpr double kAccurateBelow = 3e-3;

struct NoHook {
  void operator()(int64_t) const {}
};

// body(j, lane) for j in [0, n); block_hook(j) before each block of kLanes elements.
template <typename Body, typename Hook = NoHook>
inline void for_lanes(int64_t n, Body&& body, Hook&& block_hook = {}) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    block_hook(j);
#pragma omp simd
    for (int64_t k = 0; k < kLanes; ++k) body(j + k, k);
  }
  for (int64_t k = 0; j < n; ++j, ++k) body(j, k);
}

inline int64_t padded_classes(int64_t C) { return (C + kLanes - 1) / kLanes * kLanes; }

template <typename Acc>
void pad_row(Acc* row, int64_t C) {
  std::fill(row + C, row + padded_classes(C), -std::numeric_limits<Acc>::infinity());
}

template <typename Acc>
Acc lane_sum(const Acc (&lanes)[kLanes]) {
  Acc total = 0;
  for (Acc v : lanes) total += v;
  return total;
}

template <typename Acc>
Acc lane_max(const Acc (&lanes)[kLanes]) {
  Acc m = lanes[0];
  for (Acc v : lanes) m = v > m ? v : m;
  return m;
}

template <typename Acc>
struct Lanes {
  Acc v[kLanes];
  explicit Lanes(Acc init) {
    for (Acc& x : v) x = init;
  }
};

// dst = (src - ref) * scale; returns its max.
template <typename Acc, typename In>
Acc load_scaled_max(const In* __restrict__ src, Acc* __restrict__ dst, int64_t n, Acc ref,
                    Acc scale) {
  Lanes<Acc> m(-std::numeric_limits<Acc>::infinity());
  for_lanes(n, [&](int64_t j, int64_t k) {
    const Acc v = (static_cast<Acc>(to_float(src[j])) - ref) * scale;
    dst[j] = v;
    m.v[k] = v > m.v[k] ? v : m.v[k];  // a NaN never becomes the max; it reaches the sums via exp
  });
  return lane_max(m.v);
}

template <typename Acc>
Acc row_max(const Acc* __restrict__ x, int64_t n) {
  Lanes<Acc> m(-std::numeric_limits<Acc>::infinity());
  for_lanes(n, [&](int64_t j, int64_t k) { m.v[k] = x[j] > m.v[k] ? x[j] : m.v[k]; });
  return lane_max(m.v);
}

// A teacher row enters the arithmetic relative to its first element: a constant added to the
// row then cancels exactly instead of costing float32 digits (DESIGN section 1, shift invariance).
template <typename Acc, typename Tt>
Acc row_reference(const Tt* row) {
  const Acc first = static_cast<Acc>(to_float(row[0]));
  return first - first == Acc(0) ? first : Acc(0);  // 0 for an infinite or NaN first element
}

// Geometric ensemble: z_j = sum_m (w_m / T) (t_mj - ref_m). Returns max_j z_j.
template <typename Tt, typename Acc>
Acc combine_geometric(const KDArgs& a, int64_t row, Acc inv_t, const RowBuffers<Acc>& b) {
  const int64_t C = a.num_classes;
  int32_t active[kMaxTeachers];  // a zero-weight member is not part of the ensemble
  int32_t count = 0;
  for (int32_t m = 0; m < a.num_teachers; ++m) {
    if (a.teacher_weights[m] > 0.0) active[count++] = m;
  }
  auto row_of = [&](int32_t m) {
    return static_cast<const Tt*>(a.teachers[m]) + row * a.teacher_row_strides[m];
  };
  auto coeff = [&](int32_t m) { return static_cast<Acc>(a.teacher_weights[m]) * inv_t; };
  // The first member initialises z (and, alone, gives its max); later members accumulate, the
  // last one taking the max in the same pass.
  if (count == 1) {
    const Tt* t = row_of(active[0]);
    return load_scaled_max(t, b.z, C, row_reference<Acc>(t), coeff(active[0]));
  }
  {
    const Tt* __restrict__ t = row_of(active[0]);
    const Acc c = coeff(active[0]), ref = row_reference<Acc>(t);
    for (int64_t j = 0; j < C; ++j) b.z[j] = c * (static_cast<Acc>(to_float(t[j])) - ref);
  }
  for (int32_t i = 1; i + 1 < count; ++i) {
    const Tt* __restrict__ t = row_of(active[i]);
    const Acc c = coeff(active[i]), ref = row_reference<Acc>(t);
    for (int64_t j = 0; j < C; ++j) b.z[j] += c * (static_cast<Acc>(to_float(t[j])) - ref);
  }
  const Tt* __restrict__ t = row_of(active[count - 1]);
  const Acc c = coeff(active[count - 1]), ref = row_reference<Acc>(t);
  Lanes<Acc> m(-std::numeric_limits<Acc>::infinity());
  for_lanes(C, [&](int64_t j, int64_t k) {
    const Acc v = b.z[j] + c * (static_cast<Acc>(to_float(t[j])) - ref);
    b.z[j] = v;
    m.v[k] = v > m.v[k] ? v : m.v[k];
  });
  return lane_max(m.v);
}

// Arithmetic ensemble: z_j = log sum_m w_m softmax(t_m / T)_j. Returns max_j z_j.
template <typename Tt, typename Acc>
[[gnu::noinline]] Acc combine_arithmetic(const KDArgs& a, int64_t row, Acc inv_t, const RowBuffers<Acc>& b) {
  const int64_t C = a.num_classes;
  bool first = true;
  for (int32_t m = 0; m < a.num_teachers; ++m) {
    const Acc w = static_cast<Acc>(a.teacher_weights[m]);
    if (w == Acc(0)) continue;
    const Tt* t = static_cast<const Tt*>(a.teachers[m]) + row * a.teacher_row_strides[m];
    const Acc mt = load_scaled_max(t, b.t, C, Acc(0), Acc(1));  // raw: x - max is exact
    Lanes<Acc> l(0);
    for_lanes(C, [&](int64_t j, int64_t k) {
      b.t[j] = fast_exp((b.t[j] - mt) * inv_t);
      l.v[k] += b.t[j];
    });
    const Acc c = w / lane_sum(l.v);
    if (first) {
      for (int64_t j = 0; j < C; ++j) b.z[j] = c * b.t[j];
      first = false;
    } else {
      for (int64_t j = 0; j < C; ++j) b.z[j] += c * b.t[j];
    }
  }
  for (int64_t j = 0; j < C; ++j) b.z[j] = std::log(b.z[j]);
  return row_max(b.z, C);
}

template <typename Out, typename Acc>
void fill_row(Out* dst, int64_t n, Acc v) {
  const Out o = from_acc<Out>(v);
  std::fill(dst, dst + n, o);
}

// The running sum of exp_pass for the divergences without a one-pass form: none.
struct NoOnePassSum {
  template <typename Acc>
  static Acc fast_element(Acc, Acc, Acc) {
    return Acc(0);
  }
};

template <typename Acc>
struct RowSums {
  Acc l_z = 1, l_u = 1, l_s = 1, sum_ex = 0;
};

// Pass 2 over the buffered row: the exponentials and their sums. kSoft/kHard select the terms,
// kKeep stores the exponentials for the gradient pass, and kPow > 0 says T == kPow (1, 2, 4 or
// 8): then exp(ds) = exp(ds / T)^T takes log2(kPow) squarings instead of a third exponential
// (relative error kPow times that of one exp). Each combination is its own branch-free loop.
// Kept out of line (as is the accurate pass): each instance's loop is vectorised on its own; inlined
// into the row function, GCC left some instances scalar (10x slower).
template <bool kSoft, bool kHard, bool kKeep, typename Div, int kPow, typename Acc>
[[gnu::noinline]] RowSums<Acc> exp_pass(const RowBuffers<Acc>& b, const NextRow& next, int64_t C, Acc m_z, Acc m_s,
                      Acc inv_t) {
  Acc* __restrict__ s = b.s;
  Acc* __restrict__ z = b.z;
  Acc* __restrict__ u = b.u;
  Lanes<Acc> l_z(0), l_u(0), l_s(0), sum_ex(0);
  for_lanes(C, [&](int64_t j, int64_t k) {
    const Acc ds = s[j] - m_s;
    Acc e_u = 0;
    if constexpr (kSoft) {
      const Acc dz = z[j] - m_z;
      const Acc du = ds * inv_t;
      const Acc e_z = fast_exp(dz);
      e_u = fast_exp(du);
      l_z.v[k] += e_z;
      l_u.v[k] += e_u;
      sum_ex.v[k] += Div::fast_element(e_z, dz, du);
      if constexpr (kKeep) {
        z[j] = e_z;
        u[j] = e_u;
      }
    }
    if constexpr (kHard) {
      Acc e_s;
      if constexpr (kSoft && kPow > 0) {
        e_s = e_u;
        if constexpr (kPow >= 2) e_s *= e_s;
        if constexpr (kPow >= 4) e_s *= e_s;
        if constexpr (kPow >= 8) e_s *= e_s;
        e_s = ds < Acc(kExpFlushBelow) ? Acc(0) : e_s;  // flush where fast_exp would
      } else {
        e_s = fast_exp(ds);
      }
      l_s.v[k] += e_s;
      if constexpr (kKeep) s[j] = e_s;
    }
  }, next);
  RowSums<Acc> r;
  if (kSoft) r.l_z = lane_sum(l_z.v), r.l_u = lane_sum(l_u.v), r.sum_ex = lane_sum(sum_ex.v);
  if (kHard) r.l_s = lane_sum(l_s.v);
  return r;
}

// Integer powers of two up to 8 as T take the squaring path (float accumulation only).
template <typename Acc>
int temperature_power(double t) {
  if (!std::is_same_v<Acc, float>) return 0;
  return (t == 1.0 || t == 2.0 || t == 4.0 || t == 8.0) ? static_cast<int>(t) : 0;
}

template <bool kSoft, bool kHard, bool kKeep, typename Div, typename Acc>
RowSums<Acc> exp_pass(int power, const RowBuffers<Acc>& b, const NextRow& next, int64_t C,
                      Acc m_z, Acc m_s, Acc inv_t) {
  switch (power) {
    case 1: return exp_pass<kSoft, kHard, kKeep, Div, 1>(b, next, C, m_z, m_s, inv_t);
    case 2: return exp_pass<kSoft, kHard, kKeep, Div, 2>(b, next, C, m_z, m_s, inv_t);
    case 4: return exp_pass<kSoft, kHard, kKeep, Div, 4>(b, next, C, m_z, m_s, inv_t);
    case 8: return exp_pass<kSoft, kHard, kKeep, Div, 8>(b, next, C, m_z, m_s, inv_t);
    default: return exp_pass<kSoft, kHard, kKeep, Div, 0>(b, next, C, m_z, m_s, inv_t);
  }
}

template <bool kSoft, bool kHard, typename Acc>
RowSums<Acc> exp_pass(const KDArgs& a, bool keep, const RowBuffers<Acc>& b, const NextRow& next,
                      Acc m_z, Acc m_s, Acc inv_t) {
  const int64_t C = padded_classes(a.num_classes);  // the rows' -inf padding adds nothing
  // Only a row with both terms has an exp(ds / T) to square.
  const int power = kSoft && kHard ? temperature_power<Acc>(a.temperature) : 0;
  return visit_divergence(divergence_of(a), [&](auto divergence) {
    using Div = std::conditional_t<decltype(divergence)::row_sum_gradient, NoOnePassSum,
                                   decltype(divergence)>;
    return keep ? exp_pass<kSoft, kHard, true, Div>(power, b, next, C, m_z, m_s, inv_t)
                : exp_pass<kSoft, kHard, false, Div>(power, b, next, C, m_z, m_s, inv_t);
  });
}

// Whether the gradient is written with streaming stores: only where it cannot stay in cache for
// whoever reads it next (the backward of the layer below) and rows span whole lines.
inline bool stream_gradient(const KDArgs& a, int64_t elem_bytes) {
  constexpr int64_t kCacheBytes = int64_t(16) << 20;
  return a.num_classes * elem_bytes >= 256 && a.num_rows * a.num_classes * elem_bytes >= kCacheBytes;
}

// Writes grad[j] = g(j) - [j == hot] minus for j in [0, C), each rounded once to S. With
// `stream`, whole 64-byte lines go out as streaming stores, which skip reading each line for
// ownership first: half the gradient's memory traffic, the largest stream of a long-row call
// (N=2048 C=32000 float32 forward+backward into a reused buffer took 0.82-0.89 of the time with
// them; into fresh pages, which the OS zeroes first, they are neutral). Each thread fences
// before the kernel returns.
template <typename S, typename Acc, typename G>
void write_gradient_row(S* __restrict__ grad, int64_t C, bool stream, int64_t hot, Acc minus,
                        G&& g) {
  int64_t j = 0;
#if defined(__SSE2__)
  constexpr int64_t kLine = 64 / sizeof(S);
  for (; stream && j < C && reinterpret_cast<uintptr_t>(grad + j) % 64 != 0; ++j)
    grad[j] = from_acc<S>(j == hot ? g(j) - minus : g(j));
  for (; stream && j + kLine <= C; j += kLine) {
    alignas(64) S line[kLine];
#pragma omp simd
    for (int64_t k = 0; k < kLine; ++k) line[k] = from_acc<S>(g(j + k));
    if (hot >= j && hot < j + kLine) line[hot - j] = from_acc<S>(g(hot) - minus);
    auto* dst = reinterpret_cast<char*>(grad + j);
    const auto* src = reinterpret_cast<const char*>(line);
#if defined(__AVX512F__)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), _mm512_load_si512(src));
#elif defined(__AVX__)
    for (int h = 0; h < 64; h += 32)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + h),
                          _mm256_load_si256(reinterpret_cast<const __m256i*>(src + h)));
#else
    for (int h = 0; h < 64; h += 16)
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + h),
                       _mm_load_si128(reinterpret_cast<const __m128i*>(src + h)));
#endif
  }
#endif
#pragma omp simd
  for (int64_t k = j; k < C; ++k) grad[k] = from_acc<S>(g(k));
  if (hot >= j) grad[hot] = from_acc<S>(g(hot) - minus);
}

// Streaming stores are weakly ordered: each thread fences once, after its last row.
inline void fence_streaming_stores() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Pass 3: g_j = q_scale e_u - p_scale e_z + r_scale e_s - [j == y] ch, stored in the student's
// dtype (hot = y for a labelled row, else -1).
template <bool kSoft, bool kHard, typename S, typename Acc>
void grad_pass(const RowBuffers<Acc>& b, int64_t C, Acc q_scale, Acc p_scale, Acc r_scale,
               bool stream, int64_t hot, Acc ch, S* __restrict__ grad) {
  const Acc* __restrict__ s = b.s;
  const Acc* __restrict__ z = b.z;
  const Acc* __restrict__ u = b.u;
  write_gradient_row(grad, C, stream, hot, ch, [&](int64_t j) __attribute__((always_inline)) {
    Acc g = 0;
    if constexpr (kSoft) g = q_scale * u[j] - p_scale * z[j];
    if constexpr (kHard) g += r_scale * s[j];
    return g;
  });
}

// Pass 3 of a row_sum_gradient divergence: g_j = q_scale e_u (a_j - A) + r_scale e_s - [j == y]
// ch, with a = Div::a_of(d) from the d that soft_terms left in the teacher buffer (storing d,
// not a, keeps soft_terms' loop small enough for GCC to vectorise with JSD); q = 0 contributes 0
// even where a is infinite.
template <typename Div, typename S, typename Acc>
void row_sum_grad_pass(const RowBuffers<Acc>& b, int64_t C, Acc q_scale, Acc row_sum, Acc r_scale,
                       Acc beta, bool stream, int64_t hot, Acc ch, S* __restrict__ grad) {
  const Acc* __restrict__ s = b.s;
  const Acc* __restrict__ d = b.z;
  const Acc* __restrict__ u = b.u;
  write_gradient_row(grad, C, stream, hot, ch, [&](int64_t j) __attribute__((always_inline)) {
    Acc g = weighted_or_zero(q_scale * u[j], Div::a_of(d[j], beta) - row_sum);
    if (r_scale != Acc(0)) g += r_scale * s[j];
    return g;
  });
}

template <typename Acc>
struct SoftSums {
  Acc term = 0, qa = 0;  // the row's divergence; A = sum_j qa_j (row_sum_gradient divergences)
};

// The soft term of row i as a sum of per-class terms (Div::element, each >= 0): for the
// divergences without a one-pass form (reverse KL, JSD), and for the KL rows whose one-pass
// closing formula cancels (A / l_z - log l_z + log l_u subtracts terms of size log C, so for a
// student close to its teachers, the KL near 0, it loses every digit and can read negative).
// It re-reads the row's inputs (still in cache) and forms d = log p - log q where it keeps its
// digits: for the geometric mean from D = sum_m w_m (t_m - s), exact where the student is near
// its teachers (the Triton and CUDA kernels do the same in every row). m_s, log_lu, m_z,
// log_lz: the exponential pass's row statistics; scratch: C values; d_out (or null): each
// class's d = log p - log q for the gradient pass of a row_sum_gradient divergence.
template <typename Div, typename S, typename Tt, typename Acc>
[[gnu::noinline]] SoftSums<Acc> soft_terms(const KDArgs& a, int64_t i, Acc m_s, Acc log_lu,
                                           Acc m_z, Acc log_lz, Acc* __restrict__ scratch,
                                           Acc* __restrict__ d_out) {
  const int64_t C = a.num_classes;
  const Acc inv_t = Acc(1) / static_cast<Acc>(a.temperature), beta = static_cast<Acc>(a.beta);
  const S* __restrict__ s = static_cast<const S*>(a.student) + i * a.student_row_stride;
  auto teacher = [&](int32_t m) {
    return static_cast<const Tt*>(a.teachers[m]) + i * a.teacher_row_strides[m];
  };
  auto in = [](auto x) { return static_cast<Acc>(to_float(x)); };
  auto finite = [](Acc x) { return x - x == Acc(0); };
  const bool geometric = combines_logits(a);
  Acc ref_sum = 0, diff_max = 0;  // geometric: sum_m w_m ref_m, max finite |D|
  std::fill(scratch, scratch + C, Acc(0));
  if (geometric) {
    const Acc s_first = in(s[0]);
    const Acc s_ref = finite(s_first) ? s_first : Acc(0);
    for (int32_t m = 0; m < a.num_teachers; ++m) {
      const Acc w = static_cast<Acc>(a.teacher_weights[m]);
      if (w == Acc(0)) continue;
      const Tt* __restrict__ t = teacher(m);
      ref_sum += w * row_reference<Acc>(t);
#pragma omp simd
      for (int64_t j = 0; j < C; ++j) {
        const Acc sj = in(s[j]);
        scratch[j] += w * (in(t[j]) - (finite(sj) ? sj : s_ref));
      }
    }
    Lanes<Acc> top(0);
    for_lanes(C, [&](int64_t j, int64_t k) {
      const Acc v = finite(scratch[j]) ? std::fabs(scratch[j]) : Acc(0);
      top.v[k] = v > top.v[k] ? v : top.v[k];
    });
    diff_max = lane_max(top.v);
  } else {  // arithmetic: p_j = sum_m w_m softmax(t_m / T)_j, each member from its own max
    Acc member_max[kMaxTeachers], log_scale[kMaxTeachers];
    for (int32_t m = 0; m < a.num_teachers; ++m) {
      const Acc w = static_cast<Acc>(a.teacher_weights[m]);
      member_max[m] = 0;
      log_scale[m] = -std::numeric_limits<Acc>::infinity();
      if (w == Acc(0)) continue;
      const Tt* __restrict__ t = teacher(m);
      Lanes<Acc> top(-std::numeric_limits<Acc>::infinity()), sum(0);
      for_lanes(C, [&](int64_t j, int64_t k) {
        const Acc v = in(t[j]);
        top.v[k] = v > top.v[k] ? v : top.v[k];
      });
      const Acc mt = lane_max(top.v);
      for_lanes(C, [&](int64_t j, int64_t k) { sum.v[k] += fast_exp((in(t[j]) - mt) * inv_t); });
      const Acc c = w / lane_sum(sum.v);
      member_max[m] = mt;
      log_scale[m] = std::log(c);
#pragma omp simd
      for (int64_t j = 0; j < C; ++j) scratch[j] += c * fast_exp((in(t[j]) - mt) * inv_t);
    }
    bool underflow = false;  // found in the vector loop; the scalar fix-up runs only then
#pragma omp simd reduction(| : underflow)
    for (int64_t j = 0; j < C; ++j) {
      scratch[j] = fast_log(scratch[j]);
      underflow |= scratch[j] == -std::numeric_limits<Acc>::infinity();
    }
    for (int64_t j = 0; underflow && j < C; ++j) {
      // Every member's share underflowed (below e^-86.5): log p in log space, where reverse KL
      // needs it (q log p); -inf only where every member's logit is -inf.
      if (scratch[j] == -std::numeric_limits<Acc>::infinity()) {
        Acc top = -std::numeric_limits<Acc>::infinity(), sum = 0;
        for (int32_t m = 0; m < a.num_teachers; ++m) {
          const Acc lp = (in(teacher(m)[j]) - member_max[m]) * inv_t + log_scale[m];
          if (lp > top) sum = sum * std::exp(top - lp) + Acc(1), top = lp;
          else if (lp > -std::numeric_limits<Acc>::infinity()) sum += std::exp(lp - top);
        }
        if (top > -std::numeric_limits<Acc>::infinity()) scratch[j] = top + std::log(sum);
      }
    }
  }
  const Acc d_const = (m_s - ref_sum) * inv_t - m_z - log_lz + log_lu;
  const bool use_diff = diff_max * inv_t <= Acc(64);
  // Lane accumulators, as in exp_pass: a plain vector loop with no reduction across lanes, one
  // loop per ensemble kind and per output, so that each stays branch-free.
  Lanes<Acc> term(0), qa(0);
  const Acc* __restrict__ buf = scratch;
  // (log p, log q, d) of class j, d = log p - log q where it keeps its digits.
  auto log_ratio = [&](int64_t j, auto geometric_kind) __attribute__((always_inline)) {
    const Acc sj = in(s[j]);
    const Acc log_q = (sj - m_s) * inv_t - log_lu;
    if constexpr (decltype(geometric_kind)::value) {
      const bool sf = finite(sj);
      const Acc log_p = (buf[j] + ((sf ? sj : ref_sum) - ref_sum)) * inv_t - m_z - log_lz;
      return std::array<Acc, 3>{log_p, log_q, use_diff & sf ? buf[j] * inv_t + d_const : log_p - log_q};
    } else {
      return std::array<Acc, 3>{buf[j], log_q, buf[j] - log_q};
    }
  };
  auto sum_terms = [&](auto geometric_kind) {
    for_lanes(C, [&](int64_t j, int64_t k) __attribute__((always_inline)) {
      const auto [log_p, log_q, d] = log_ratio(j, geometric_kind);
      const SoftElement<Acc> e =
          Div::element(fast_exp(log_p), log_p, d, fast_exp(log_q), log_q, beta);
      term.v[k] += e.term;
      if constexpr (Div::row_sum_gradient) qa.v[k] += e.qa;
    });
    // d for the gradient pass in a loop of its own: stored from the loop above, GCC left that
    // loop scalar with JSD's element (16x slower).
    if (Div::row_sum_gradient && d_out != nullptr) {
      Acc* __restrict__ out = d_out;
#pragma omp simd
      for (int64_t j = 0; j < C; ++j) out[j] = log_ratio(j, geometric_kind)[2];
    }
  };
  if (geometric) {
    sum_terms(std::true_type{});
  } else {
    sum_terms(std::false_type{});
  }
  return {lane_sum(term.v), lane_sum(qa.v)};
}

// Whether the float32 closing formula may have lost more than 1e-4 of its value: its error is a
// few float32 ulps of its largest term (and of fast_exp's relative error).
template <typename Acc>
bool fast_close_cancelled(Acc kl, Acc mean_log_ratio, Acc log_lz, Acc log_lu) {
  if (!std::is_same_v<Acc, float>) return false;  // float64 accumulation is exact enough
  using std::fabs;
  const Acc largest = fabs(mean_log_ratio) + fabs(log_lz) + fabs(log_lu) + Acc(1);
  return !(kl > Acc(kAccurateBelow) * largest);  // NaN too: the accurate pass keeps it NaN
}

template <typename S, typename Tt, typename Acc>
void kd_row(const KDArgs& a, int64_t i, const TermScales& scales, const RowBuffers<Acc>& b) {
  using Loss = std::conditional_t<std::is_same_v<Acc, double>, double, float>;
  const int64_t C = a.num_classes;
  const int64_t label = a.labels ? a.labels[i] : 0;
  const RowRole role = row_role(a, label);
  Loss* loss = static_cast<Loss*>(a.row_loss) + i;
  S* grad = a.grad ? static_cast<S*>(a.grad) + i * C : nullptr;
  if (role.bad || (!role.soft && !role.hard)) {
    const Acc v = role.bad ? std::numeric_limits<Acc>::quiet_NaN() : Acc(0);
    *loss = static_cast<Loss>(v);
    if (grad) fill_row(grad, C, v);
    return;
  }

  const S* s = static_cast<const S*>(a.student) + i * a.student_row_stride;
  const Acc inv_t = Acc(1) / static_cast<Acc>(a.temperature);
  const Acc m_s = load_scaled_max(s, b.s, C, Acc(0), Acc(1));
  pad_row(b.s, C);
  const Acc s_y = role.hard ? b.s[label] : Acc(0);
  const bool keep = grad != nullptr;
  NextRow next;
  if (i + 1 < a.num_rows) {
    next.rows[next.count] = reinterpret_cast<const char*>(s + a.student_row_stride);
    next.elem_bytes[next.count++] = sizeof(S);
    for (int32_t m = 0; m < a.num_teachers; ++m) {
      const Tt* t = static_cast<const Tt*>(a.teachers[m]) + (i + 1) * a.teacher_row_strides[m];
      next.rows[next.count] = reinterpret_cast<const char*>(t);
      next.elem_bytes[next.count++] = sizeof(Tt);
    }
  }

  RowSums<Acc> r;
  Acc m_z = 0;
  if (role.soft) {
    m_z = combines_logits(a) ? combine_geometric<Tt>(a, i, inv_t, b)
                             : combine_arithmetic<Tt>(a, i, inv_t, b);
    pad_row(b.z, C);
    r = role.hard ? exp_pass<true, true>(a, keep, b, next, m_z, m_s, inv_t)
                  : exp_pass<true, false>(a, keep, b, next, m_z, m_s, inv_t);
  } else {
    r = exp_pass<false, true>(a, keep, b, next, Acc(0), m_s, inv_t);
  }

  Acc value = 0;
  SoftSums<Acc> sums;  // from soft_terms: the row's divergence and A
  const bool row_sum = visit_divergence(divergence_of(a), [](auto divergence) {
    return decltype(divergence)::row_sum_gradient;
  });
  if (role.soft) {
    const Acc soft = visit_divergence(divergence_of(a), [&](auto divergence) {
      using Div = decltype(divergence);
      using std::log;
      if constexpr (Div::row_sum_gradient) {  // no one-pass form: always the sum of terms
        sums = soft_terms<Div, S, Tt>(a, i, m_s, Acc(log(r.l_u)), m_z, Acc(log(r.l_z)), b.t,
                                      keep ? b.z : nullptr);
        return sums.term;
      } else {
        Acc v = Div::fast_close(r.sum_ex, r.l_z, r.l_u);
        if constexpr (Div::may_cancel) {
          if (fast_close_cancelled(v, r.sum_ex / r.l_z, log(r.l_z), log(r.l_u))) {
            v = soft_terms<Div, S, Tt>(a, i, m_s, Acc(log(r.l_u)), m_z, Acc(log(r.l_z)), b.t,
                                       static_cast<Acc*>(nullptr)).term;
          } else if (v < Acc(0)) {
            v = 0;  // float64 accumulation: rounding below 0
          }
        }
        return v;
      }
    });
    value += static_cast<Acc>(scales.soft_loss) * soft;
  }
  if (role.hard) value += static_cast<Acc>(scales.hard_loss) * hard_term(m_s, r.l_s, s_y);
  *loss = static_cast<Loss>(value);
  if (!grad) return;

  const Acc cs = static_cast<Acc>(scales.soft_grad), ch = static_cast<Acc>(scales.hard_grad);
  const Acc q_scale = cs / r.l_u, p_scale = cs / r.l_z, r_scale = ch / r.l_s;
  const int64_t hot = role.hard ? label : -1;  // the one-hot of the hard term, subtracted once
  const bool stream = stream_gradient(a, sizeof(S));
  if (role.soft && row_sum) {
    visit_divergence(divergence_of(a), [&](auto divergence) {
      using Div = decltype(divergence);
      if constexpr (Div::row_sum_gradient)
        row_sum_grad_pass<Div>(b, C, q_scale, sums.qa, role.hard ? r_scale : Acc(0),
                               static_cast<Acc>(a.beta), stream, hot, ch, grad);
    });
  } else if (role.soft && role.hard) {
    grad_pass<true, true>(b, C, q_scale, p_scale, r_scale, stream, hot, ch, grad);
  } else if (role.soft) {
    grad_pass<true, false>(b, C, q_scale, p_scale, r_scale, stream, hot, ch, grad);
  } else {
    grad_pass<false, true>(b, C, q_scale, p_scale, r_scale, stream, hot, ch, grad);
  }
}

template <typename S, typename Tt, typename Acc>
void run(const KDArgs& a) {
  const int64_t N = a.num_rows, C = a.num_classes;
  int64_t soft_rows = 0, hard_rows = 0;
  for (int64_t i = 0; i < N; ++i) {
    const RowRole role = row_role(a, a.labels ? a.labels[i] : 0);
    soft_rows += role.soft;
    hard_rows += role.hard;
  }
  if (a.row_counts) soft_rows = a.row_counts[0], hard_rows = a.row_counts[1];  // num_items_in_batch
  const TermScales scales = term_scales(a, soft_rows, hard_rows);
  // Waking a thread costs a few microseconds, and a short row about 0.1 us (C = 10), so a thread
  // gets at least 2048 elements: N=256 C=10 runs on two (28 -> 14 us a call, 128 -> 113 us a
  // training step on the development machine; the threshold was 32768 before), N=64 C=10 on one.
  constexpr int64_t kMinElementsPerThread = int64_t(1) << 11;
  const int64_t work = N * C * (1 + a.num_teachers);
  const int64_t useful = std::max<int64_t>(1, std::min<int64_t>(N, work / kMinElementsPerThread));
  const int threads = static_cast<int>(std::min<int64_t>(std::max(a.num_threads, 1), useful));
  const int64_t Cp = padded_classes(C);
  std::vector<Acc> workspace(static_cast<size_t>(threads) * 4 * static_cast<size_t>(Cp));

#pragma omp parallel num_threads(threads)
  {
#ifdef _OPENMP
    const int64_t tid = omp_get_thread_num();
#else
    const int64_t tid = 0;
#endif
    Acc* w = workspace.data() + tid * 4 * Cp;
    const RowBuffers<Acc> b{w, w + Cp, w + 2 * Cp, w + 3 * Cp};
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < N; ++i) kd_row<S, Tt, Acc>(a, i, scales, b);
    fence_streaming_stores();
  }
}

template <typename S>
void dispatch_teacher(const KDArgs& a) {
  switch (a.teacher_dtype) {
    case DType::kFloat32: return run<S, float, float>(a);
    case DType::kFloat16: return run<S, Half, float>(a);
    case DType::kBFloat16: return run<S, BFloat16, float>(a);
    case DType::kFloat64: break;  // rejected by check_args
  }
}

}  // namespace

void forward(const KDArgs& a) {
  if (a.num_rows == 0) return;
  switch (a.student_dtype) {
    case DType::kFloat32: return dispatch_teacher<float>(a);
    case DType::kFloat16: return dispatch_teacher<Half>(a);
    case DType::kBFloat16: return dispatch_teacher<BFloat16>(a);
    case DType::kFloat64: return run<double, double, double>(a);
  }
}

}  // namespace KD_CPU_ISA
}  // namespace kd
