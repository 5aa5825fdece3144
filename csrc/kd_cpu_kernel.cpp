// The fused distillation loss on the CPU: one call computes every row's weighted loss and, when
// asked, the student's gradient. A row is read from memory once: pass 1 converts it into a
// per-thread float buffer (student s, combined teacher z) and takes the maxima (a short row with
// one teacher: the maxima only, pass 2 reading the inputs again; a long one with one teacher or
// a geometric ensemble has no pass 1: one_pass_exp below takes the maxima in pass 2); pass 2
// computes the exponentials per element (teacher, student at T, and student at 1 unless it is a
// power of the one at T) and the sums; pass 3 writes the gradient from the buffered exponentials
// (and that power). The buffers are C floats each (padded to whole vectors) and stay in cache,
// so the only [N, C] memory touched is the inputs and the gradient.
//
// This file is compiled once per instruction set (baseline, AVX2, AVX-512, AVX-512 with BF16 on
// x86-64), each into its own namespace kd::<isa>; kd_cpu.cpp picks one at run time.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__GNUC__) && !defined(__clang__)
// GCC warns that a 64-byte vector (FloatLanes, below) is passed differently without AVX-512;
// that matters only across a library boundary, and every function taking or returning one
// (kd_row_math.h's included) is internal to this file.
#pragma GCC diagnostic ignored "-Wpsabi"
// GCC 12's AVX-512 intrinsics start from a deliberately self-initialised register
// (`__m512i __Y = __Y;` in _mm512_undefined_epi32) and warn about it in every instance of every
// loop that inlines one: thousands of lines about the compiler's own headers.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
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

struct RowStretch;  // below, with the one-pass form

// Buffers of one thread: four rows of padded_classes(C) accumulator values. The student and
// teacher rows are padded with -inf up to a whole number of lane blocks, so the exponential
// pass runs full vector blocks only (exp(-inf) = 0 adds nothing); short rows (C = 10) would
// otherwise run entirely in the scalar tail.
template <typename Acc>
struct RowBuffers {
  Acc* s;  // student logits (not for InputLogits), then exp(s - m_s) or exp(s / T - m_u)
  Acc* z;  // combined teacher logits (or log p; not for InputLogits), then exp(z - m_z)
  Acc* u;  // exp(s / T - m_u) where s holds exp(s - m_s)
  Acc* t;  // scratch for one teacher of an arithmetic ensemble
  RowStretch* stretches;  // padded_classes(C) / kLanes + 1: the one-pass form's stretches

  // Where the exponential pass leaves exp(s / T - m_u): over the student's logits it has just
  // read (their lines in L1 already: a store that fetches nothing), unless exp(s - m_s) is
  // stored there (a hard term whose T is no power kPow). One thread, N=2048 C=32000 bfloat16
  // forward+backward: 0.67-0.71 -> 0.63-0.66 ns an element over four interleaved runs.
  Acc* e_u(bool stores_e_s) const { return stores_e_s ? u : s; }

  // The buffers from class j on.
  RowBuffers from(int64_t j) const { return {s + j, z + j, u + j, t + j, stretches}; }
};

// Pass 2 computes from cache and leaves memory idle; it prefetches the thread's next row of
// every input into L2 meanwhile, so that pass 1 of that row no longer waits on DRAM. Position j
// of a pass prefetches element first + (j >> shift) of each of the next row's inputs.
struct NextRow {
  const char* rows[kMaxTeachers + 1];
  int64_t elem_bytes[kMaxTeachers + 1];
  int count = 0;
  int64_t first = 0;
  int shift = 0;

  // Always inlined: out of line, GCC found it free of side effects (a prefetch has none it
  // counts) and dropped the calls.
  [[gnu::always_inline]] void operator()(int64_t j) const {
    const int64_t e = first + (j >> shift);
    for (int r = 0; r < count; ++r) __builtin_prefetch(rows[r] + e * elem_bytes[r], 0, 2);
  }

  int64_t bytes_per_class() const {
    int64_t total = 0;
    for (int r = 0; r < count; ++r) total += elem_bytes[r];
    return total;
  }
};

// A next row of this many bytes per class or more is more than the exponential pass can
// prefetch while it runs (float32 with four teachers: 20): that pass prefetches its first half
// and the gradient pass the second. N=2048 C=32000 forward+backward, float32 M=4: 62-68 ms ->
// 46-61 over two sets of runs; with fewer bytes the split was slower (bfloat16 M=1 23 -> 28 ms,
// float32 M=1 29 -> 35, bfloat16 M=4 36 -> 39). Nothing between 10 and 20 bytes a class was
// measured.
constexpr int64_t kSplitPrefetchBytes = 16;

// Row loops run in blocks of kLanes elements with one accumulator per lane: the inner loop is a
// plain vector loop (no reduction across lanes), so it vectorises at any width without letting
// the compiler reassociate floating-point sums; the lanes are combined once per row.
constexpr int64_t kLanes = 16;

// The float32 KL is recomputed accurately when it is below this fraction of its largest term
// (3e-3: a fuzz over T in [0.5, 100], C up to 8000, students near and far from their teachers
// kept every row within 1e-4 relative or 1e-9 absolute of float64, the worst at 0.43 of that).
constexpr double kAccurateBelow = 3e-3;

// body(j, lane) for j in [0, n).
template <typename Body>
inline void for_lanes(int64_t n, Body&& body) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
#pragma omp simd
    for (int64_t k = 0; k < kLanes; ++k) body(j + k, k);
  }
  for (int64_t k = 0; j < n; ++j, ++k) body(j, k);
}

// Passes 1 and 2 run on whole vectors of kLanes floats (GCC vector extensions: one zmm register
// with AVX-512, two ymm with AVX2, four xmm otherwise; pass 2's rows are padded to whole
// vectors). Written per element, GCC compiled pass 1's loops to half-width vectors.
using FloatLanes = float __attribute__((vector_size(kLanes * sizeof(float))));
using UintLanes = uint32_t __attribute__((vector_size(kLanes * sizeof(uint32_t))));
using Bits16Lanes = uint16_t __attribute__((vector_size(kLanes * sizeof(uint16_t))));

// The type pass 2 computes in: kLanes floats at once, or one double.
template <typename Acc>
using PassVector = std::conditional_t<std::is_same_v<Acc, float>, FloatLanes, double>;

template <typename V, typename Acc>
V load_vector(const Acc* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));  // an unaligned vector load
  return v;
}

template <typename V, typename Acc>
void store_vector(Acc* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// The sum and the max over kLanes lanes: of an array of kLanes accumulators (the scalar paths)
// or of a FloatLanes (below).
template <typename L>
auto lane_sum(const L& lanes) {
  std::remove_cv_t<std::remove_reference_t<decltype(lanes[0])>> total = 0;
  for (int64_t k = 0; k < kLanes; ++k) total += lanes[k];
  return total;
}
inline double lane_sum(double v) { return v; }  // pass 2's one double

template <typename L>
auto lane_max(const L& lanes) {
  auto m = lanes[0];
  for (int64_t k = 1; k < kLanes; ++k) m = lanes[k] > m ? lanes[k] : m;
  return m;
}

// op over a FloatLanes' lanes in halves (lane k with k + 8, then k + 4, k + 2, k + 1): four
// dependent steps rather than fifteen, in one fixed order. A short row (C = 10) pays for several
// of these per row; lane by lane they were a large part of its cost. Out of line: inlined, the
// long rows' kernel was 3% slower (bfloat16 N=2048 C=32000: 22.9 -> 23.5 ms, the short rows no
// faster), from how GCC then compiled the loops around it. Halves taken by memcpy instead of
// __builtin_shufflevector made short rows 25% slower, so compilers without that builtin (GCC
// before 12) add the lanes one by one instead.
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define KD_HAS_SHUFFLEVECTOR 1
#endif
#endif
template <typename Op>
[[gnu::noinline]] float lane_reduce(FloatLanes v, Op op) {
  static_assert(kLanes == 16);
#if defined(KD_HAS_SHUFFLEVECTOR)
  using Float8 = float __attribute__((vector_size(8 * sizeof(float))));
  using Float4 = float __attribute__((vector_size(4 * sizeof(float))));
  const Float8 h = op(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7),
                      __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
  const Float4 q =
      op(__builtin_shufflevector(h, h, 0, 1, 2, 3), __builtin_shufflevector(h, h, 4, 5, 6, 7));
  const Float4 e = op(q, __builtin_shufflevector(q, q, 2, 3, 0, 1));
  return op(e, __builtin_shufflevector(e, e, 1, 0, 3, 2))[0];
#else
  float total = v[0];
  for (int64_t k = 1; k < kLanes; ++k) total = op(total, v[k]);
  return total;
#endif
}
inline float lane_sum(FloatLanes v) {
  return lane_reduce(v, [](auto x, auto y) { return x + y; });
}
// The lanes hold maxima, which never took a NaN (a comparison with NaN is false).
inline float lane_max(FloatLanes v) {
  return lane_reduce(v, [](auto x, auto y) { return y > x ? y : x; });
}

// kLanes input values from p, as floats.
inline FloatLanes load_lanes(const float* p) { return load_vector<FloatLanes>(p); }

#if defined(__AVX512BW__)
// 16 bfloat16 values as floats: each moved into the upper half of its 32-bit lane by one word
// permutation that zeroes the lower halves. A widening move and a shift took two operations,
// the shift on the adder pipes that the exponential pass's additions, maxima, vreduceps and
// vscalefps already saturate (AMD Zen 4: two 512-bit adder-pipe operations a cycle against a
// word permutation on the shuffle pipes).
alignas(64) constexpr uint16_t kBFloat16Words[32] = {0, 0, 0, 1, 0, 2,  0, 3,  0, 4,  0,
                                                     5, 0, 6, 0, 7, 0, 8,  0, 9,  0, 10,
                                                     0, 11, 0, 12, 0, 13, 0, 14, 0, 15};
inline __m512 widen_bfloat16(__m256i bits) {
  return _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(
      0xAAAAAAAAu, _mm512_load_si512(kBFloat16Words), _mm512_castsi256_si512(bits)));
}
#endif

// A bfloat16 is a float's upper 16 bits (GCC compiled the generic form below to two 256-bit
// halves and an insert).
inline FloatLanes load_lanes(const BFloat16* p) {
#if defined(__AVX512BW__)
  return (FloatLanes)widen_bfloat16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#else
  return (FloatLanes)(__builtin_convertvector(load_vector<Bits16Lanes>(p), UintLanes) << 16);
#endif
}

inline FloatLanes load_lanes(const Half* p) {
#if defined(__AVX512F__)
  // Exact, as to_float.
  return (FloatLanes)_mm512_maskz_cvtph_ps(0xffff, load_vector<__m256i>(p));
#else
  float v[kLanes];
  for (int64_t k = 0; k < kLanes; ++k) v[k] = to_float(p[k]);
  return load_vector<FloatLanes>(v);
#endif
}

// The first n (< kLanes) input values from p as floats and `fill` in the other lanes: a short
// row's last block as one vector. AVX-512 reads only those n (a masked load; lanes past them
// are not read, so they cannot fault).
template <typename In>
[[gnu::always_inline]] inline FloatLanes load_partial_lanes(const In* p, int64_t n, float fill) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1);
  if constexpr (std::is_same_v<In, float>) {
    return (FloatLanes)_mm512_mask_loadu_ps(_mm512_set1_ps(fill), mask, p);
  } else {  // bfloat16 as load_lanes converts it; half exactly
    const __m256i bits = _mm256_maskz_loadu_epi16(mask, p);
    const __m512 x = std::is_same_v<In, BFloat16>
                         ? widen_bfloat16(bits)
                         : _mm512_maskz_cvtph_ps(0xffff, bits);
    return (FloatLanes)_mm512_mask_blend_ps(mask, _mm512_set1_ps(fill), x);
  }
#else
  alignas(64) float v[kLanes];
  for (int64_t k = 0; k < kLanes; ++k) v[k] = k < n ? to_float(p[k]) : fill;
  return load_vector<FloatLanes>(v);
#endif
}

inline int64_t padded_classes(int64_t C) { return (C + kLanes - 1) / kLanes * kLanes; }

template <typename Acc>
void pad_row(Acc* row, int64_t C) {
  std::fill(row + C, row + padded_classes(C), -std::numeric_limits<Acc>::infinity());
}

template <typename Acc>
struct Lanes {
  Acc v[kLanes];
  explicit Lanes(Acc init) {
    for (Acc& x : v) x = init;
  }
};

// body(j, load) for each vector of kLanes classes from j = 0 while j < n: load(p) is the
// vector at p + j as floats, the last, partial one padded with -inf (a masked load: nothing
// past n is read).
template <typename Body>
[[gnu::always_inline]] inline void for_vectors(int64_t n, Body&& body) {
  constexpr float kMinusInf = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) body(j, [j](const auto* p) { return load_lanes(p + j); });
  if (j < n)
    body(j, [j, n](const auto* p) { return load_partial_lanes(p + j, n - j, kMinusInf); });
}

// The rows pass 1 writes into one buffer, each with its reference and scale (a geometric
// ensemble's members; or one row with reference 0 and scale 1: the row itself as Acc values).
template <typename In, typename Acc>
struct ScaledRows {
  const In* rows[kMaxTeachers];
  Acc refs[kMaxTeachers], scales[kMaxTeachers];
  int count = 0;
  void add(const In* row, Acc ref, Acc scale) {
    rows[count] = row;
    refs[count] = ref;
    scales[count++] = scale;
  }
};

template <typename Acc, typename In>
ScaledRows<In, Acc> one_row(const In* row) {
  ScaledRows<In, Acc> x;
  x.add(row, Acc(0), Acc(1));
  return x;
}

// dst_j = sum_m c_m (x_mj - ref_m) over x's rows (at least one), added in order, in one pass
// (an ensemble's z written once, not once per member and read back by the next: the kernel
// alone, N=2048 C=32000 float32 with four teachers, 5% less with the gradient and 11% without;
// N=256 C=10 with five, 70 -> 59 ns a row). Returns max_j dst_j (a NaN never becomes the max;
// it reaches the sums through exp). For float on whole vectors, the last partial one padded
// with -inf: every c > 0, so the padding stays -inf (or NaN where a c underflowed to 0), never a
// max; dst is padded to whole vectors too, and pad_row rewrites its padding after pass 1.
template <typename In, typename Acc>
Acc scaled_into(const ScaledRows<In, Acc>& x, Acc* __restrict__ dst, int64_t n) {
  constexpr Acc kMinusInf = -std::numeric_limits<Acc>::infinity();
  if constexpr (std::is_same_v<Acc, float>) {
    FloatLanes top = FloatLanes{} + kMinusInf;
    for_vectors(n, [&](int64_t j, auto load) __attribute__((always_inline)) {
      FloatLanes v = x.scales[0] * (load(x.rows[0]) - x.refs[0]);
      for (int m = 1; m < x.count; ++m) v += x.scales[m] * (load(x.rows[m]) - x.refs[m]);
      store_vector(dst + j, v);
      top = v > top ? v : top;
    });
    return lane_max(top);
  } else {
    auto in = [&](int m, int64_t j) { return static_cast<Acc>(to_float(x.rows[m][j])); };
    Lanes<Acc> top(kMinusInf);
    for_lanes(n, [&](int64_t j, int64_t k) {
      Acc v = x.scales[0] * (in(0, j) - x.refs[0]);
      for (int m = 1; m < x.count; ++m) v += x.scales[m] * (in(m, j) - x.refs[m]);
      dst[j] = v;
      top.v[k] = v > top.v[k] ? v : top.v[k];
    });
    return lane_max(top.v);
  }
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

// The members of a geometric ensemble's row, z_j = sum_m (w_m / T) (t_mj - ref_m).
template <typename Tt, typename Acc>
ScaledRows<Tt, Acc> geometric_members(const KDArgs& a, int64_t row, Acc inv_t) {
  ScaledRows<Tt, Acc> members;
  for (int32_t m = 0; m < a.num_teachers; ++m) {
    if (!(a.teacher_weights[m] > 0.0)) continue;  // a zero-weight member is not in the ensemble
    const Tt* t = static_cast<const Tt*>(a.teachers[m]) + row * a.teacher_row_strides[m];
    members.add(t, row_reference<Acc>(t), static_cast<Acc>(a.teacher_weights[m]) * inv_t);
  }
  return members;
}

// Geometric ensemble: z into b.z. Returns max_j z_j.
template <typename Tt, typename Acc>
Acc combine_geometric(const KDArgs& a, int64_t row, Acc inv_t, const RowBuffers<Acc>& b) {
  return scaled_into(geometric_members<Tt>(a, row, inv_t), b.z, a.num_classes);
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
    const Acc mt = scaled_into(one_row<Acc>(t), b.t, C);  // raw: x - max is exact
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
  template <typename V>
  static V fast_weight(V, V) {
    return V{};
  }
};

template <typename Acc>
struct RowSums {
  Acc l_z = 1, l_u = 1, l_s = 1, sum_ex = 0;
};

// 2^r for r in [-1/2, 1/2]: the degree-6 polynomial of least maximum relative error (1.9e-9;
// with float32 evaluation 8.0e-8 over every float in [-126, 0], against float64's exp2). Degree
// 5 (2.1e-7) lost digits in gradients that cancel, such as q - p with C = 2.
inline FloatLanes exp2_polynomial(FloatLanes r) {
  FloatLanes p = r * 1.534581097e-04f + 1.339993090e-03f;
  p = p * r + 9.618489072e-03f;
  p = p * r + 5.550328642e-02f;
  p = p * r + 2.402264625e-01f;
  p = p * r + 6.931471825e-01f;
  return p * r + 1.0f;
}

#if defined(__AVX512F__) && defined(__AVX512DQ__)
// 2^(k/16) for k in [0, 16), rounded to float: one zmm register, indexed by vpermps.
alignas(64) constexpr float kExp2Sixteenths[16] = {
    1.0f,        1.04427373f, 1.09050775f, 1.13878858f, 1.18920708f, 1.24185777f,
    1.29683959f, 1.35425556f, 1.41421354f, 1.47682619f, 1.54221082f, 1.61049032f,
    1.68179286f, 1.75625217f, 1.8340081f,  1.91520655f};
#endif

// 2^x in each lane, for x <= 8 or NaN (the kernel's offsets from a row's max, or from a
// reference at most 8 below it: kRebaseAbove); exactly 0 at -inf, NaN at NaN.
inline FloatLanes exp2_lanes(FloatLanes x) {
#if defined(__AVX512F__) && defined(__AVX512DQ__)
  // x = n + r with n = x rounded down to sixteenths and 0 <= r < 1/16:
  // 2^x = 2^floor(x) 2^frac(n) 2^r, 2^frac(n) from a 16-entry table (vpermps) and
  // 2^r = 1 + r P(r), P of degree 2 fitted for least relative error over [0, 1/16) (1.3e-9).
  // Adding 1.5 * 2^19 rounding down rounds x down to sixteenths (the sum's last mantissa bit is
  // 1/16) and leaves 16 n mod 16 in its low four bits, the table index; vreduceps gives r = x - n
  // exactly, and scalef scales by 2^floor(x) = 2^floor(n): eight operations an exponential.
  // Over every float in [-125, 8] the relative error is at most 1.06e-7 (one float32 ulp), from
  // the table's rounding plus the last one; below, scalef's results are denormal down to 2^-149
  // and 0 beyond (Zen 4 computes with denormals at full speed). At -inf, vreduceps gives 0 and
  // the index 0, so 2^x = 1 scaled by 2^-inf = 0; a NaN x stays NaN.
  const __m512 shifted = _mm512_add_round_ps((__m512)x, _mm512_set1_ps(786432.0f),
                                             _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const FloatLanes r = (FloatLanes)_mm512_reduce_ps(
      (__m512)x, (4 << 4) | _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const FloatLanes t =
      (FloatLanes)_mm512_permutexvar_ps((__m512i)shifted, _mm512_load_ps(kExp2Sixteenths));
  const FloatLanes p = ((r * 5.666982755e-02f + 2.401842475e-01f) * r + 6.931475997e-01f) * r;
  return (FloatLanes)_mm512_scalef_ps((__m512)(t * p + t), (__m512)x);
#else
  // fast_exp's construction (kd_row_math.h): n from adding and removing 1.5 * 2^23, 2^n added
  // to the exponent field, which needs results of 2^-125 or more (below: 0); x - x keeps a NaN.
  const float shifter = 12582912.0f;
  const FloatLanes kf = x + shifter;
  const FloatLanes n = kf - shifter;
  const FloatLanes y = (FloatLanes)((UintLanes)exp2_polynomial(x - n) + ((UintLanes)kf << 23));
  return x < -125.0f ? FloatLanes{} : y + (x - x);
#endif
}

inline double exp2_lanes(double x) { return std::exp2(x); }

// sum + e w, with e = exp2_lanes(x), adding nothing where e is 0 (there w may be
// infinite: a class of teacher logit -inf). With AVX-512 one masked multiply-add under the mask
// of x >= -125 (or NaN; below, e < 2^-125 adds nothing a float sum keeps), where the generic
// form takes a compare, a masked multiply and an add.
inline FloatLanes add_weighted_exp(FloatLanes sum, FloatLanes x, FloatLanes e, FloatLanes w) {
#if defined(__AVX512F__)
  const __mmask16 nonzero = _mm512_cmp_ps_mask((__m512)x, _mm512_set1_ps(-125.0f), _CMP_NLT_UQ);
  return (FloatLanes)_mm512_mask3_fmadd_ps((__m512)e, (__m512)w, (__m512)sum, nonzero);
#else
  return sum + weighted_or_zero(e, w);
#endif
}

inline double add_weighted_exp(double sum, double, double e, double w) {
  return sum + weighted_or_zero(e, w);
}

// exp(ds) = exp(ds / T)^T for T = kPow in {1, 2, 4, 8}: log2(kPow) squarings (relative error
// kPow times that of one exp); the exponential and the gradient pass both take it this way.
template <int kPow, typename V>
inline V power_of_temperature(V e_u) {
  if constexpr (kPow >= 2) e_u *= e_u;
  if constexpr (kPow >= 4) e_u *= e_u;
  if constexpr (kPow >= 8) e_u *= e_u;
  return e_u;
}

// Where the exponential pass reads the student's logits s and the combined teacher's z: the
// row buffers of pass 1 (any ensemble, any dtype), or the inputs themselves (InputLogits: one
// teacher, float accumulation, float32 or bfloat16 for both).
template <typename Acc>
struct BufferedLogits {
  const Acc* s;
  const Acc* z;
  template <typename V>
  V student(int64_t j) const {
    return load_vector<V>(s + j);
  }
  template <typename V>
  V teacher(int64_t j) const {
    return load_vector<V>(z + j);
  }
};

// One teacher's row and the student's, read where they are, z = c (t - ref) formed again in
// registers (c (t - ref) - m_z may then be one fused multiply-add: z - m_z at the max is a
// rounding error rather than 0, which the exponential takes as it is). Pass 1 then only takes
// the two maxima and writes no buffer or padding. For short rows, whose cost is per row rather
// than per byte (one teacher, N=256: C = 10 84 -> 70 ns a row, C = 100 135 -> 126; C = 1000
// the same either way); long rows keep the buffers (bfloat16 N=2048 C=32000: 22 -> 29 ms this
// way, widening each vector in the exponential pass costing more than the buffers' cache
// traffic it saves). The last, partial vector is padded with -inf, as pad_row pads the buffers.
constexpr int64_t kInputLogitsMaxClasses = 1024;

template <typename In>
struct InputLogits {
  const In* s;
  const In* t;
  int64_t C;
  float ref, c;
  static FloatLanes load(const In* p, int64_t j, int64_t C) {
    constexpr float kMinusInf = -std::numeric_limits<float>::infinity();
    return j + kLanes <= C ? load_lanes(p + j) : load_partial_lanes(p + j, C - j, kMinusInf);
  }
  template <typename V>
  V student(int64_t j) const {
    return load(s, j, C);
  }
  template <typename V>
  V teacher(int64_t j) const {
    return c * (load(t, j, C) - ref);
  }
};

// max_j p[j] for j in [0, n), as floats (NaNs never the max).
template <typename In>
float input_max(const In* __restrict__ p, int64_t n) {
  FloatLanes top = FloatLanes{} - std::numeric_limits<float>::infinity();
  for_vectors(n, [&](int64_t, auto load) __attribute__((always_inline)) {
    const FloatLanes x = load(p);
    top = x > top ? x : top;
  });
  return lane_max(top);
}

// Pass 2 over the row (its buffers, or its inputs: Logits): the exponentials and their sums.
// kHard adds the hard term, kKeep stores the exponentials for the gradient pass, and kPow > 0
// says T == kPow: the hard term's exp(ds) is then a power of exp(ds / T) instead of a third
// exponential, and is not stored (the gradient pass squares again rather than reading a third
// buffer back). Each combination is its own branch-free loop. The differences dz, du are in
// log2 units (the one-pass sum too, scaled back by ln 2 once). Kept out of line (as is the
// accurate pass): each instance's loop is compiled on its own.
template <bool kHard, bool kKeep, typename Div, int kPow, typename Logits, typename Acc>
[[gnu::noinline]] RowSums<Acc> exp_pass(const Logits& in, const RowBuffers<Acc>& b,
                                        const NextRow& next, int64_t C, Acc m_z, Acc m_s,
                                        Acc inv_t) {
  using V = PassVector<Acc>;
  constexpr int64_t kWidth = sizeof(V) / sizeof(Acc);
  constexpr Acc kLog2e = Acc(1.4426950408889634), kLn2 = Acc(0.6931471805599453);
  const Acc u_scale = inv_t * kLog2e;
  V l_z{}, l_u{}, l_s{}, sum_ex{};
  for (int64_t j = 0; j < C; j += kWidth) {
    if (j % kLanes == 0) next(j);
    const V ds = in.template student<V>(j) - m_s;
    const V dz = (in.template teacher<V>(j) - m_z) * kLog2e;  // rounds |z - m_z|, not |z|
    const V du = ds * u_scale;
    const V e_z = exp2_lanes(dz);
    const V e_u = exp2_lanes(du);
    l_z += e_z;
    l_u += e_u;
    sum_ex = add_weighted_exp(sum_ex, dz, e_z, Div::fast_weight(dz, du));
    if constexpr (kKeep) {
      store_vector(b.z + j, e_z);
      store_vector(b.e_u(kHard && kPow == 0) + j, e_u);
    }
    if constexpr (kHard && kPow > 0) {
      l_s += power_of_temperature<kPow>(e_u);
    } else if constexpr (kHard) {
      const V e_s = exp2_lanes(ds * kLog2e);
      l_s += e_s;
      if constexpr (kKeep) store_vector(b.s + j, e_s);
    }
  }
  RowSums<Acc> r;
  r.l_z = lane_sum(l_z), r.l_u = lane_sum(l_u), r.sum_ex = lane_sum(sum_ex) * kLn2;
  if constexpr (kHard) r.l_s = lane_sum(l_s);
  return r;
}

// The T of a row with both terms as kPow for the squaring path: 1, 2, 4 or 8 (float
// accumulation only), else 0.
template <typename Acc>
int temperature_power(const KDArgs& a, bool hard) {
  const double t = a.temperature;
  if (!hard || !std::is_same_v<Acc, float>) return 0;
  return (t == 1.0 || t == 2.0 || t == 4.0 || t == 8.0) ? static_cast<int>(t) : 0;
}

// f(std::integral_constant<int, power>{}) for power in {0, 1, 2, 4, 8}; only 0 is compiled
// where there is no power (kMayPower false: no hard term, or float64).
template <bool kMayPower, typename F>
auto with_power(int power, F&& f) {
  if constexpr (!kMayPower) return f(std::integral_constant<int, 0>{});
  switch (power) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 8: return f(std::integral_constant<int, 8>{});
    default: return f(std::integral_constant<int, 0>{});
  }
}

template <bool kHard, typename Logits, typename Acc>
RowSums<Acc> exp_pass(const KDArgs& a, bool keep, int power, const Logits& in,
                      const RowBuffers<Acc>& b, const NextRow& next, Acc m_z, Acc m_s,
                      Acc inv_t) {
  const int64_t C = padded_classes(a.num_classes);  // the rows' -inf padding adds nothing
  return visit_divergence(divergence_of(a), [&](auto divergence) {
    using Div = std::conditional_t<decltype(divergence)::row_sum_gradient, NoOnePassSum,
                                   decltype(divergence)>;
    return with_power<kHard && std::is_same_v<Acc, float>>(power, [&](auto t_power) {
      constexpr int kPow = decltype(t_power)::value;
      return keep ? exp_pass<kHard, true, Div, kPow>(in, b, next, C, m_z, m_s, inv_t)
                  : exp_pass<kHard, false, Div, kPow>(in, b, next, C, m_z, m_s, inv_t);
    });
  });
}

// The one-pass form of a long row with one teacher or a geometric ensemble of the student's
// dtype (float accumulation, C > 1024): the exponential pass reads the inputs themselves (an
// ensemble's members combined in registers) and takes the row's maxima as it goes, with no
// pass 1 before it and no logits buffered. Its offsets are taken from references r that only
// need r <= max (so that no term overflows and the largest does not underflow) and every offset
// at most kRebaseAbove (8, in log2 units; with fused offsets 1/4 more, Offsets) above r: the
// first vector's maxima, moved up to the maxima so far when a block of the row exceeds them
// (then the block runs again from the sums before it, multiplied by 2^-(the move), as the
// online softmax rescales; Milakov and Gimelshein 2018), which random or model logits do at
// most a few times a row. Each stretch of the row between moves (a RowStretch) keeps its
// references, and the gradient pass scales its stored exponentials by its own factors. N=2048
// C=32000 forward+backward, two threads, against pass 1 and the exponential pass
// (bench/compare_builds.py): M=1 float32 0.80-0.89 of the time, bfloat16 0.94-0.96 (its
// widening loads then cost the pass what pass 1 cost); M=4 float32 0.84-0.87.
constexpr float kRebaseAbove = 8.0f;

// A stretch of the row from class `start` on whose stored exponentials were taken from these
// references of the student's and the teacher's logits.
struct RowStretch {
  int64_t start;
  float r_s, r_t;
};

// The offsets of logits x from a reference r at a scale a (log2 units per logit), x a - c. With
// AVX-512 one fused multiply-add from c = fl(r a), the offsets exact up to their own rounding
// (two operations, a subtraction and a multiply, took the adder pipes the pass is bound by);
// c's rounding, a constant of the stretch, is carried exactly in the origins its sums are moved
// from (a form that left it out, the offsets off by up to half an ulp of r a, put that error in
// l_u: with one class taking nearly all of q the reverse KL's gradient q_j (a_j - A), a
// cancellation, was off by 1e-5 of the row's gradient instead of 1e-8). That rounding also
// shifts every offset of the stretch, by at most 1/4 while |c| < 2^22 (kFusedBelow); a row
// whose references go beyond (logits of millions: one_pass_exp gives it up) takes the two-pass
// form. The other instruction sets keep (x - r) a, c = r a exactly (the adder-pipe argument
// was measured with Zen 4's AVX-512 only).
#if defined(__AVX512F__)
constexpr bool kFusedOffsets = true;
#else
constexpr bool kFusedOffsets = false;
#endif
constexpr float kFusedBelow = 4194304.0f;  // 2^22
constexpr float kFarReference = 1.329228e36f;  // 2^120: first_reference's, in log2 units

struct Offsets {
  float r, a, c;
  Offsets(float r, float a) : r(r), a(a), c(r * a) {}
  FloatLanes operator()(FloatLanes x) const {
#if defined(__AVX512F__)
    return (FloatLanes)_mm512_fmsub_ps((__m512)x, _mm512_set1_ps(a), _mm512_set1_ps(c));
#else
    return (x - r) * a;
#endif
  }
  // The offsets' origin in log2 units, exactly: x a - origin is what they approximate.
  static double origin(float r, float a) {
    return kFusedOffsets ? double(r * a) : double(r) * a;
  }
  // Whether the offsets from r at scales up to a shift by at most 1/4 (always without fused
  // offsets): |r a| < kFusedBelow, or r is far_reference(a), which only -inf logits and blocks
  // run again see.
  static bool fit(float r, float a);
};

// Where a stretch's offsets start, in log2 units: the student at T and at 1, the teacher.
struct Origins {
  double u, s, z;
};

// The logits' scales of the one-pass form's offsets, log2 units per logit: the student at T and
// at 1, the teacher (z = c t).
struct OnePassScales {
  float u, s, z;
  // The origins of the offsets the pass takes from stretch st's references.
  Origins of(const RowStretch& st) const {
    return {Offsets::origin(st.r_s, u), Offsets::origin(st.r_s, s), Offsets::origin(st.r_t, z)};
  }
  // The origins of the two-pass form, the row's maxima m times the scales exactly: the sums
  // returned are taken from these.
  Origins at_maxima(const RowStretch& m) const {
    return {double(m.r_s) * u, double(m.r_s) * s, double(m.r_t) * z};
  }
};

// max_j x_j over the lanes, NaNs never the max (-inf where every lane is -inf or NaN).
inline float lanes_max(FloatLanes x) {
  constexpr float kMinusInf = -std::numeric_limits<float>::infinity();
  return lane_max(x > kMinusInf ? x : FloatLanes{} + kMinusInf);
}

// Whether any lane of x is above `limit` (NaN is not).
inline bool any_above(FloatLanes x, float limit) {
#if defined(__AVX512F__)
  return _mm512_cmp_ps_mask((__m512)x, _mm512_set1_ps(limit), _CMP_GT_OQ) != 0;
#else
  const auto above = x > limit;
  int any = 0;
  for (int k = 0; k < kLanes; ++k) any |= above[k];
  return any != 0;
#endif
}

// The reference of a row whose first vector has maximum m at the largest of the scales a: m,
// or where that is -inf (every logit so far -inf or NaN), one so far below any finite logit
// (2^120 in log2 units) that the first finite one moves it, while -inf still gives -inf.
inline float far_reference(float a) { return -kFarReference / std::max(a, 1.0f); }
inline float first_reference(float m, float a) {
  return m > -std::numeric_limits<float>::infinity() ? m : far_reference(a);
}

inline bool Offsets::fit(float r, float a) {
  return !kFusedOffsets || std::fabs(r * a) < kFusedBelow || r == far_reference(a);
}

struct OnePassLanes {
  FloatLanes l_z{}, l_u{}, l_s{}, sum_ex{};
};

// The sums l taken from origins `from`, taken from `to` instead: each multiplied by 2 to the
// minus the move, and A shifted as e_z w(dz, du) is, w being linear: after the move
// e_z 2^-move_z (w(dz, du) - w(move_z, move_u)). Lanes that have summed nothing yet (l_z = 0)
// stay 0 whatever the move (the first finite logit after first_reference's far one).
template <bool kHard, typename Div, int kPow>
OnePassLanes moved(OnePassLanes l, const Origins& from, const Origins& to) {
  const double move_u = to.u - from.u, move_z = to.z - from.z;
  const double move_s = kPow > 0 ? kPow * move_u : to.s - from.s;
  const float w = Div::fast_weight(static_cast<float>(move_z), static_cast<float>(move_u));
  const FloatLanes shifted = l.sum_ex - (l.l_z > 0.0f ? l.l_z * w : FloatLanes{});
  l.sum_ex = static_cast<float>(std::exp2(-move_z)) * shifted;
  l.l_z *= static_cast<float>(std::exp2(-move_z));
  l.l_u *= static_cast<float>(std::exp2(-move_u));
  if (kHard) l.l_s *= static_cast<float>(std::exp2(-move_s));
  return l;
}

// The exponential pass of the one-pass form: exp_pass's arithmetic on offsets from references
// found on the way, and the row's maxima. The row runs in blocks of kCheckEvery classes, each
// followed by one test of the maxima so far against the references (per vector, the test cost
// as much as taking the maxima); a block that exceeded them runs again from the sums before it,
// moved to references at the maxima so far, as a new stretch. At the end the sums are moved to
// the row's maxima, so the closing formula and soft_terms see what the two-pass form computes.
// b.stretches[0] holds the first references on entry; on return b.stretches[0, count) hold each
// stretch and b.stretches[count] the row's maxima, the references of the sums returned (where a
// row's logits are all -inf, the last stretch's); count = 0: the row's references are too far
// from 0 for fused offsets (Offsets::fit), nothing returned. kHard, kKeep, kPow as in exp_pass.
constexpr int64_t kCheckEvery = 512;

// The teacher side of the one-pass form: one teacher's logits t as they are (its scale c is in
// OnePassScales::z), or a geometric ensemble's z = sum_m c_m (t_m - ref_m) (`combined`), formed
// in registers as pass 1's scaled_into forms it. One type for both, the member count a branch
// the predictor takes every time: a type each doubled the pass's instances.
template <typename Tt>
struct TeacherLogits {
  ScaledRows<Tt, float> rows;
  bool combined;
  template <typename Load>
  [[gnu::always_inline]] FloatLanes combine(Load&& load) const {
    if (!combined) return load(rows.rows[0]);
    FloatLanes z = rows.scales[0] * (load(rows.rows[0]) - rows.refs[0]);
    for (int m = 1; m < rows.count; ++m)
      z += rows.scales[m] * (load(rows.rows[m]) - rows.refs[m]);
    return z;
  }
  // Classes [j, j + kLanes), or the n < kLanes from j on and -inf beyond (set again after the
  // sum: a c_m that underflowed to 0 makes its padding NaN).
  [[gnu::always_inline]] FloatLanes at(int64_t j) const {
    return combine([j](const Tt* row) { return load_lanes(row + j); });
  }
  [[gnu::always_inline]] FloatLanes at(int64_t j, int64_t n) const {
    constexpr float kMinusInf = -std::numeric_limits<float>::infinity();
    const FloatLanes z =
        combine([j, n](const Tt* row) { return load_partial_lanes(row + j, n, kMinusInf); });
    alignas(64) float lanes[kLanes];
    store_vector(lanes, z);
    for (int64_t k = n; k < kLanes; ++k) lanes[k] = kMinusInf;
    return load_vector<FloatLanes>(lanes);
  }
};

template <bool kHard, bool kKeep, typename Div, int kPow, typename Ts, typename Tt>
[[gnu::noinline]] RowSums<float> one_pass_exp(const Ts* s, const TeacherLogits<Tt>& t, int64_t C,
                                              const OnePassScales& a, const RowBuffers<float>& b,
                                              int64_t& count, const NextRow& next) {
  constexpr float kLn2 = 0.6931471805599453f;
  RowStretch* const stretches = b.stretches;
  constexpr float kMinusInf = -std::numeric_limits<float>::infinity();
  OnePassLanes l;
  FloatLanes top_s = FloatLanes{} + kMinusInf, top_t = top_s;
  RowStretch here = stretches[0];
  const float a_u = a.u, a_s = a.s, a_z = a.z;
  Offsets off_u(here.r_s, a_u), off_s(here.r_s, a_s), off_z(here.r_t, a_z);
  // The student's largest scale: its offsets bound both e_u and e_s.
  const float a_student = kHard && kPow == 0 ? std::max(a_u, a_s) : a_u;
  auto step = [&](int64_t j, FloatLanes x_s, FloatLanes x_t) __attribute__((always_inline)) {
    top_s = x_s > top_s ? x_s : top_s;  // a NaN never the max
    top_t = x_t > top_t ? x_t : top_t;
    const FloatLanes dz = off_z(x_t), du = off_u(x_s);
    const FloatLanes e_z = exp2_lanes(dz);
    const FloatLanes e_u = exp2_lanes(du);
    l.l_z += e_z;
    l.l_u += e_u;
    l.sum_ex = add_weighted_exp(l.sum_ex, dz, e_z, Div::fast_weight(dz, du));
    if constexpr (kKeep) {
      store_vector(b.z + j, e_z);
      store_vector(b.e_u(kHard && kPow == 0) + j, e_u);
    }
    if constexpr (kHard && kPow > 0) {
      l.l_s += power_of_temperature<kPow>(e_u);
    } else if constexpr (kHard) {
      const FloatLanes e_s = exp2_lanes(off_s(x_s));
      l.l_s += e_s;
      if constexpr (kKeep) store_vector(b.s + j, e_s);
    }
  };
  // The next row's inputs are of the same dtype: one prefetch a 64-byte line of them (bfloat16:
  // every other vector; half as many where this pass prefetches half the row) is every line once.
  const int64_t prefetch_every = (64 / int64_t(sizeof(Ts))) << next.shift;
  auto block = [&](int64_t j0, int64_t j1) __attribute__((always_inline)) {
    int64_t j = j0;
    for (; j + kLanes <= j1; j += kLanes) {
      if ((j & (prefetch_every - 1)) == 0) next(j);  // a power of two: no division
      step(j, load_lanes(s + j), t.at(j));
    }
    if (j < j1) step(j, load_partial_lanes(s + j, j1 - j, kMinusInf), t.at(j, j1 - j));
  };
  // References whose fused offsets would shift by more than 1/4: the row takes the two-pass form.
  const float a_max_s = std::max(a_u, a_s);
  auto fit = [&](const RowStretch& st) {
    return Offsets::fit(st.r_s, a_max_s) && Offsets::fit(st.r_t, a_z);
  };
  count = 0;
  if (!fit(here)) return {};
  count = 1;
  for (int64_t j0 = 0; j0 < C; j0 += kCheckEvery) {
    const int64_t j1 = std::min(C, j0 + kCheckEvery);
    const OnePassLanes before = l;
    block(j0, j1);
    const bool student_above = any_above((top_s - here.r_s) * a_student, kRebaseAbove);
    const bool teacher_above = any_above((top_t - here.r_t) * a_z, kRebaseAbove);
    if (__builtin_expect(student_above || teacher_above, false)) {
      RowStretch now{j0, here.r_s, here.r_t};
      if (student_above) now.r_s = lanes_max(top_s);
      if (teacher_above) now.r_t = lanes_max(top_t);
      if (!fit(now)) {
        count = 0;
        return {};
      }
      l = moved<kHard, Div, kPow>(before, a.of(here), a.of(now));
      if (here.start == j0) {
        stretches[count - 1] = now;
      } else {
        stretches[count++] = now;
      }
      here = now;
      off_u = Offsets(here.r_s, a_u), off_s = Offsets(here.r_s, a_s);
      off_z = Offsets(here.r_t, a_z);
      block(j0, j1);
    }
  }
  // To the row's maxima (where the row has a finite one).
  const float max_s = lanes_max(top_s), max_t = lanes_max(top_t);
  const RowStretch last{C, max_s > kMinusInf ? max_s : here.r_s,
                        max_t > kMinusInf ? max_t : here.r_t};
  stretches[count] = last;
  l = moved<kHard, Div, kPow>(l, a.of(here), a.at_maxima(last));
  RowSums<float> r;
  r.l_z = lane_sum(l.l_z), r.l_u = lane_sum(l.l_u), r.sum_ex = lane_sum(l.sum_ex) * kLn2;
  if constexpr (kHard) r.l_s = lane_sum(l.l_s);
  return r;
}

// The row statistics of an exponential pass, in the units soft_terms and the hard term take.
template <typename Acc>
struct RowStatistics {
  RowSums<Acc> sums;
  Acc m_s = 0, m_z = 0;        // the references of s and of z (soft_terms' units)
  int64_t stretches = 0;       // the one-pass form's stretches in RowBuffers; 0: none
};

// Row i in the one-pass form (float accumulation, C >= kLanes): its exponential pass and
// statistics; its stretches are left in b.stretches (none: the row needs the two-pass form).
// Out of line: its forty instances inlined into kd_row made the short rows (which never take
// it) slower.
template <bool kHard, typename Ts, typename Tt>
[[gnu::noinline]] RowStatistics<float> one_pass(const KDArgs& a, bool keep, int power,
                                                const Ts* s, const TeacherLogits<Tt>& t,
                                                const OnePassScales& scales,
                                                const RowBuffers<float>& b, const NextRow& next) {
  const int64_t C = a.num_classes;
  b.stretches[0] = {0, first_reference(lanes_max(load_lanes(s)), std::max(scales.u, scales.s)),
                    first_reference(lanes_max(t.at(0)), scales.z)};
  int64_t count = 1;
  RowStatistics<float> st;
  st.sums = visit_divergence(divergence_of(a), [&](auto divergence) {
    using Div = std::conditional_t<decltype(divergence)::row_sum_gradient, NoOnePassSum,
                                   decltype(divergence)>;
    return with_power<kHard>(power, [&](auto t_power) {
      constexpr int kPow = decltype(t_power)::value;
      return keep ? one_pass_exp<kHard, true, Div, kPow>(s, t, C, scales, b, count, next)
                  : one_pass_exp<kHard, false, Div, kPow>(s, t, C, scales, b, count, next);
    });
  });
  st.stretches = count;
  return st;
}

// Stretch k of `count` of the one-pass form, for the gradient pass: its classes and the factors
// that scale its stored exponentials to the sums' references (the row's maxima).
template <typename Acc>
struct StretchGradient {
  int64_t start, end;
  Acc f_u, f_z, f_s;
};

inline StretchGradient<float> stretch_gradient(const RowBuffers<float>& b, int64_t k,
                                               int64_t count, const OnePassScales& a, int power,
                                               int64_t C) {
  const RowStretch& here = b.stretches[k];
  const RowStretch& last = b.stretches[count];
  auto down = [](double move) { return static_cast<float>(std::exp2(-move)); };
  const Origins from = a.of(here), to = a.at_maxima(last);
  const double move_u = to.u - from.u;
  return {here.start, k + 1 < count ? b.stretches[k + 1].start : C, down(move_u),
          down(to.z - from.z), down(power > 0 ? power * move_u : to.s - from.s)};
}

// Whether the gradient is written with streaming stores: only where it cannot stay in cache for
// whoever reads it next (the backward of the layer below) and rows span whole lines.
inline bool stream_gradient(const KDArgs& a, int64_t elem_bytes) {
  constexpr int64_t kCacheBytes = int64_t(16) << 20;
  return a.num_classes * elem_bytes >= 256 && a.num_rows * a.num_classes * elem_bytes >= kCacheBytes;
}

// line[k] = g(j + k) - [j + k == hot] minus for the kLine values of one 64-byte line, each
// rounded once to S.
template <typename S, typename Acc, typename G>
inline void round_line(S* __restrict__ line, int64_t j, int64_t hot, Acc minus, G& g) {
  constexpr int64_t kLine = 64 / sizeof(S);
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<S, BFloat16> && std::is_same_v<Acc, float>) {
    // One instruction rounds the 32 values to nearest even, as from_acc does (a NaN stays a
    // quiet NaN), except that it reads float32 denormals (|g| < 1.2e-38) as 0.
    alignas(64) float values[kLine];
#pragma omp simd
    for (int64_t k = 0; k < kLine; ++k) values[k] = g(j + k);
    if (hot >= j && hot < j + kLine) values[hot - j] -= minus;
    const __m512bh rounded =
        _mm512_cvtne2ps_pbh(_mm512_load_ps(values + 16), _mm512_load_ps(values));
    _mm512_store_si512(line, (__m512i)rounded);
    return;
  }
#endif
#pragma omp simd
  for (int64_t k = 0; k < kLine; ++k) line[k] = from_acc<S>(g(j + k));
  if (hot >= j && hot < j + kLine) line[hot - j] = from_acc<S>(g(hot) - minus);
}

// Whether a gradient G also computes kLanes classes at once in registers (g.lanes(j)).
template <typename G, typename = void>
struct HasLanes : std::false_type {};
template <typename G>
struct HasLanes<G, std::void_t<decltype(std::declval<const G&>().lanes(int64_t{0}))>>
    : std::true_type {};

#if defined(__AVX512F__)
// The 64-byte line of grad from class j on, as round_line computes it: for a float32 or (with
// AVX-512 BF16) a bfloat16 gradient whose G has lanes, in registers (through round_line's array
// on the stack, its stores and loads took a fifth of the gradient pass: one thread, rows in
// cache, bfloat16 N=2048 C=32000, 10.9 -> 8.9 ms).
template <typename S, typename Acc, typename G>
inline __m512i line_bits(int64_t j, int64_t hot, Acc minus, G& g) {
  constexpr int64_t kLine = 64 / sizeof(S);
  const bool hot_here = hot >= j && hot < j + kLine;
  auto minus_at = [&](FloatLanes v, int64_t k) {  // v with minus taken from lane k
    return (FloatLanes)_mm512_mask_sub_ps((__m512)v, static_cast<__mmask16>(1u << k), (__m512)v,
                                          _mm512_set1_ps(minus));
  };
  if constexpr (std::is_same_v<Acc, float> && HasLanes<G>::value) {
    if constexpr (std::is_same_v<S, float>) {
      FloatLanes v = g.lanes(j);
      if (hot_here) v = minus_at(v, hot - j);
      return (__m512i)v;
    }
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<S, BFloat16>) {
      FloatLanes lo = g.lanes(j), hi = g.lanes(j + kLanes);
      if (hot_here && hot < j + kLanes) lo = minus_at(lo, hot - j);
      if (hot_here && hot >= j + kLanes) hi = minus_at(hi, hot - j - kLanes);
      return (__m512i)_mm512_cvtne2ps_pbh((__m512)hi, (__m512)lo);  // as round_line
    }
#endif
  }
  alignas(64) S line[kLine];
  round_line(line, j, hot, minus, g);
  return _mm512_load_si512(line);
}
#endif

// Writes grad[j] = g(j) - [j == hot] minus for j in [0, C), each rounded once to S. With
// `stream`, whole 64-byte lines go out as streaming stores, which skip reading each line for
// ownership first: half the gradient's memory traffic, the largest stream of a long-row call
// (N=2048 C=32000 float32 forward+backward into a reused buffer took 0.82-0.89 of the time with
// them; into fresh pages, which the OS zeroes first, they are neutral). Each thread fences
// before the kernel returns.
template <typename S, typename Acc, typename G>
void write_gradient_row(S* __restrict__ grad, int64_t C, bool stream, int64_t hot, Acc minus,
                        const NextRow& next, G&& g) {
  constexpr int64_t kLine = 64 / sizeof(S);
  int64_t j = 0;
#if defined(__SSE2__)
  for (; stream && j < C && reinterpret_cast<uintptr_t>(grad + j) % 64 != 0; ++j)
    grad[j] = from_acc<S>(j == hot ? g(j) - minus : g(j));
  for (; stream && j + kLine <= C; j += kLine) {
    next(j);
    auto* dst = reinterpret_cast<char*>(grad + j);
#if defined(__AVX512F__)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), line_bits<S>(j, hot, minus, g));
#else
    alignas(64) S line[kLine];
    round_line(line, j, hot, minus, g);
    const auto* src = reinterpret_cast<const char*>(line);
#if defined(__AVX__)
    for (int h = 0; h < 64; h += 32)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + h),
                          _mm256_load_si256(reinterpret_cast<const __m256i*>(src + h)));
#else
    for (int h = 0; h < 64; h += 16)
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + h),
                       _mm_load_si128(reinterpret_cast<const __m128i*>(src + h)));
#endif
#endif
  }
#endif
  const int64_t rest = j;
  for (; j + kLine <= C; j += kLine) {
    next(j);
#pragma omp simd
    for (int64_t k = j; k < j + kLine; ++k) grad[k] = from_acc<S>(g(k));
  }
#pragma omp simd
  for (int64_t k = j; k < C; ++k) grad[k] = from_acc<S>(g(k));
  if (hot >= rest) grad[hot] = from_acc<S>(g(hot) - minus);
}

// Streaming stores are weakly ordered: each thread fences once, after its last row.
inline void fence_streaming_stores() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// The hard term's exp(ds) at class j (V = Acc), or at the kLanes classes from j on (V =
// FloatLanes), for the gradient pass: what the exponential pass stored, or for T = kPow the same
// power of exp(ds / T) again.
template <int kPow, typename V, typename Acc>
inline V hard_exp(const Acc* __restrict__ s, const Acc* __restrict__ u, int64_t j) {
  if constexpr (kPow > 0) {
    return power_of_temperature<kPow>(load_vector<V>(u + j));
  } else {
    return load_vector<V>(s + j);
  }
}

// Pass 3: g_j = q_scale e_u - p_scale e_z + r_scale e_s - [j == y] ch, stored in the student's
// dtype (hot = y for a labelled row, else -1); g for one class, or with float accumulation
// kLanes of them at once (lanes). Both gradient passes' g copy what they use: captured by
// reference, GCC reloaded every value from the closure for each line.
template <bool kHard, int kPow, typename Acc>
struct SoftHardGradient {
  const Acc* __restrict__ s;
  const Acc* __restrict__ z;
  const Acc* __restrict__ u;
  Acc q_scale, p_scale, r_scale;
  template <typename V>
  [[gnu::always_inline]] V at(int64_t j) const {
    V g_j = q_scale * load_vector<V>(u + j) - p_scale * load_vector<V>(z + j);
    if constexpr (kHard) g_j += r_scale * hard_exp<kPow, V>(s, u, j);
    return g_j;
  }
  [[gnu::always_inline]] Acc operator()(int64_t j) const { return at<Acc>(j); }
  template <typename A = Acc, typename = std::enable_if_t<std::is_same_v<A, float>>>
  [[gnu::always_inline]] FloatLanes lanes(int64_t j) const {
    return at<FloatLanes>(j);
  }
};

template <bool kHard, int kPow, typename S, typename Acc>
void grad_pass(const RowBuffers<Acc>& b, int64_t C, Acc q_scale, Acc p_scale, Acc r_scale,
               bool stream, int64_t hot, Acc ch, const NextRow& next, S* __restrict__ grad) {
  const SoftHardGradient<kHard, kPow, Acc> g{b.s, b.z, b.e_u(kHard && kPow == 0), q_scale,
                                             p_scale, r_scale};
  write_gradient_row(grad, C, stream, hot, ch, next, g);
}

// Pass 3 of a row_sum_gradient divergence: g_j = q_scale e_u (a_j - A) + r_scale e_s - [j == y]
// ch, with a = Div::a_of(d) from the d that soft_terms left in the teacher buffer (storing d,
// not a, keeps soft_terms' loop small enough for GCC to vectorise with JSD); q = 0 contributes 0
// even where a is infinite. r_scale is 0 for a row without the hard term (hard false).
template <typename Div, int kPow, typename S, typename Acc>
void row_sum_grad_pass(const RowBuffers<Acc>& b, int64_t C, Acc q_scale, Acc row_sum, bool hard,
                       Acc r_scale, Acc beta, bool stream, int64_t hot, Acc ch,
                       const NextRow& next, S* __restrict__ grad) {
  const Acc* __restrict__ s = b.s;
  const Acc* __restrict__ d = b.z;
  const Acc* __restrict__ u = b.e_u(hard && kPow == 0);
  auto g = [=](int64_t j) __attribute__((always_inline)) {
    Acc g_j = weighted_or_zero(q_scale * u[j], Div::a_of(d[j], beta) - row_sum);
    if (r_scale != Acc(0)) g_j += r_scale * hard_exp<kPow, Acc>(s, u, j);
    return g_j;
  };
  write_gradient_row(grad, C, stream, hot, ch, next, g);
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

// The row losses' type: float64 with float64 inputs, else float32.
template <typename Acc>
using Loss = std::conditional_t<std::is_same_v<Acc, double>, double, float>;

template <typename S, typename Tt, typename Acc>
void kd_row(const KDArgs& a, int64_t i, const TermScales& scales, const RowBuffers<Acc>& b,
            Loss<Acc>* row_losses) {
  const int64_t C = a.num_classes;
  const int64_t label = a.labels ? a.labels[i] : 0;
  const RowRole role = row_role(a, label);
  Loss<Acc>* loss = row_losses + i;
  S* grad = a.grad ? static_cast<S*>(a.grad) + i * C : nullptr;
  if (role.bad || (!role.soft && !role.hard)) {
    const Acc v = role.bad ? std::numeric_limits<Acc>::quiet_NaN() : Acc(0);
    *loss = static_cast<Loss<Acc>>(v);
    if (grad) fill_row(grad, C, v);
    return;
  }

  const S* s = static_cast<const S*>(a.student) + i * a.student_row_stride;
  const Acc inv_t = Acc(1) / static_cast<Acc>(a.temperature);
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
  const bool split_prefetch = keep && next.bytes_per_class() >= kSplitPrefetchBytes;
  next.shift = split_prefetch ? 1 : 0;

  // Pass 1, then the exponential pass (every row from here takes the soft term: row_role); or
  // both in one (one_pass).
  const int power = temperature_power<Acc>(a, role.hard);
  RowStatistics<Acc> st;
  Acc s_y = 0;
  auto exponentials = [&](const auto& logits, Acc m_s, Acc m_z) {
    st.sums = role.hard ? exp_pass<true>(a, keep, power, logits, b, next, m_z, m_s, inv_t)
                        : exp_pass<false>(a, keep, power, logits, b, next, m_z, m_s, inv_t);
    st.m_s = m_s, st.m_z = m_z;
  };
  OnePassScales one_pass_scales{};
  bool read_inputs = false;
  // One teacher or a geometric ensemble of the student's dtype (mixed dtypes take pass 1: every
  // pair of dtypes would be another hundred-odd instances of the one-pass form in each
  // instruction set's build).
  if constexpr (std::is_same_v<Acc, float> && std::is_same_v<S, Tt>) {
    if (C > kInputLogitsMaxClasses && combines_logits(a)) {
      constexpr float kLog2e = 1.4426950408889634f;
      s_y = role.hard ? to_float(s[label]) : 0.0f;
      // At least one member: check_args holds the weights to a sum of 1.
      const ScaledRows<Tt, float> members = geometric_members<Tt>(a, i, inv_t);
      const TeacherLogits<Tt> teachers{members, members.count > 1};
      const float c = members.scales[0];  // one teacher: z = c (t - ref)
      one_pass_scales = {inv_t * kLog2e, kLog2e, teachers.combined ? kLog2e : c * kLog2e};
      st = role.hard ? one_pass<true>(a, keep, power, s, teachers, one_pass_scales, b, next)
                     : one_pass<false>(a, keep, power, s, teachers, one_pass_scales, b, next);
      const RowStretch& last = b.stretches[st.stretches];  // the row's maxima
      st.m_s = last.r_s;
      // soft_terms' z: the ensemble's as combined, or c (t - ref) (rounding is monotonic, c > 0)
      st.m_z = teachers.combined ? last.r_t : c * (last.r_t - members.refs[0]);
      read_inputs = st.stretches > 0;  // else references too far for the one pass: two passes
    } else if (a.num_teachers == 1) {
      const Tt* t = static_cast<const Tt*>(a.teachers[0]) + i * a.teacher_row_strides[0];
      s_y = role.hard ? to_float(s[label]) : 0.0f;
      read_inputs = true;
      if constexpr (!std::is_same_v<S, Half>) {
        // float32 and bfloat16 rows (half is widened per element without AVX-512: not twice).
        const float ref = row_reference<float>(t);
        const float c = static_cast<float>(a.teacher_weights[0]) * inv_t;
        // max_j c (t_j - ref): rounding is monotonic, c > 0
        exponentials(InputLogits<Tt>{s, t, C, ref, c}, input_max(s, C),
                     c * (input_max(t, C) - ref));
      } else {
        read_inputs = false;
      }
    }
  }
  if (!read_inputs) {
    const Acc m_s = scaled_into(one_row<Acc>(s), b.s, C);
    pad_row(b.s, C);
    s_y = role.hard ? b.s[label] : Acc(0);
    const Acc m_z = combines_logits(a) ? combine_geometric<Tt>(a, i, inv_t, b)
                                       : combine_arithmetic<Tt>(a, i, inv_t, b);
    pad_row(b.z, C);
    exponentials(BufferedLogits<Acc>{b.s, b.z}, m_s, m_z);
  }
  const RowSums<Acc>& r = st.sums;

  SoftSums<Acc> sums;  // from soft_terms: the row's divergence and A
  const bool row_sum = visit_divergence(divergence_of(a), [](auto divergence) {
    return decltype(divergence)::row_sum_gradient;
  });
  const Acc soft = visit_divergence(divergence_of(a), [&](auto divergence) {
    using Div = decltype(divergence);
    using std::log;
    if constexpr (Div::row_sum_gradient) {  // no one-pass form: always the sum of terms
      sums = soft_terms<Div, S, Tt>(a, i, st.m_s, Acc(log(r.l_u)), st.m_z, Acc(log(r.l_z)), b.t,
                                    keep ? b.z : nullptr);
      return sums.term;
    } else {
      Acc v = Div::fast_close(r.sum_ex, r.l_z, r.l_u);
      if constexpr (Div::may_cancel) {
        if (fast_close_cancelled(v, r.sum_ex / r.l_z, log(r.l_z), log(r.l_u))) {
          v = soft_terms<Div, S, Tt>(a, i, st.m_s, Acc(log(r.l_u)), st.m_z, Acc(log(r.l_z)), b.t,
                                     static_cast<Acc*>(nullptr)).term;
        } else if (v < Acc(0)) {
          v = 0;  // float64 accumulation: rounding below 0
        }
      }
      return v;
    }
  });
  Acc value = static_cast<Acc>(scales.soft_loss) * soft;
  if (role.hard) value += static_cast<Acc>(scales.hard_loss) * hard_term(st.m_s, r.l_s, s_y);
  *loss = static_cast<Loss<Acc>>(value);
  if (!grad) return;

  const Acc cs = static_cast<Acc>(scales.soft_grad), ch = static_cast<Acc>(scales.hard_grad);
  const Acc q_scale = cs / r.l_u, p_scale = cs / r.l_z, r_scale = ch / r.l_s;
  const int64_t hot = role.hard ? label : -1;  // the one-hot of the hard term, subtracted once
  const bool stream = stream_gradient(a, sizeof(S));
  // The gradient pass prefetches the second half of a split next row, else nothing.
  if (!split_prefetch) next.count = 0;
  // Classes [start, end) with their exponentials scaled by f_u, f_z, f_s.
  auto gradient = [&](int64_t start, int64_t end, Acc f_u, Acc f_z, Acc f_s) {
    const RowBuffers<Acc> bs = b.from(start);
    const int64_t n = end - start, hot_here = hot >= start && hot < end ? hot - start : -1;
    with_power<std::is_same_v<Acc, float>>(power, [&](auto t_power) {
      constexpr int kPow = decltype(t_power)::value;
      if (row_sum) {
        visit_divergence(divergence_of(a), [&](auto divergence) {
          using Div = decltype(divergence);
          if constexpr (Div::row_sum_gradient)
            row_sum_grad_pass<Div, kPow>(bs, n, f_u * q_scale, sums.qa, role.hard,
                                         role.hard ? f_s * r_scale : Acc(0),
                                         static_cast<Acc>(a.beta), stream, hot_here, ch,
                                         next, grad + start);
        });
      } else if (role.hard) {
        grad_pass<true, kPow>(bs, n, f_u * q_scale, f_z * p_scale, f_s * r_scale, stream,
                              hot_here, ch, next, grad + start);
      } else {
        grad_pass<false, 0>(bs, n, f_u * q_scale, f_z * p_scale, r_scale, stream, hot_here, ch,
                            next, grad + start);
      }
    });
  };
  // The row in one stretch, or the one-pass form's stretches (one call of `gradient`: with two,
  // GCC kept the lambdas out of line, N=65536 C=10 15% slower).
  for (int64_t k = 0; k < std::max<int64_t>(st.stretches, 1); ++k) {
    StretchGradient<Acc> x{0, C, 1, 1, 1};
    if constexpr (std::is_same_v<Acc, float>) {
      if (st.stretches > 0) x = stretch_gradient(b, k, st.stretches, one_pass_scales, power, C);
    }
    next.first = C / 2 + (x.start >> next.shift);  // (a copy of NextRow took 13% at C = 10)
    gradient(x.start, x.end, x.f_u, x.f_z, x.f_s);
  }
}

// The sum of the row losses, added in float64 in row order (deterministic whatever the threads).
template <typename L>
L sum_in_order(const std::vector<L>& rows) {
  double total = 0;
  for (const L v : rows) total += v;
  return static_cast<L>(total);
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
  std::vector<RowStretch> stretches(static_cast<size_t>(threads * (Cp / kLanes + 1)));
  // sum_rows: the rows' losses go here, and row_loss receives their sum.
  std::vector<Loss<Acc>> kept_rows(a.sum_rows ? static_cast<size_t>(N) : 0);
  Loss<Acc>* rows = a.sum_rows ? kept_rows.data() : static_cast<Loss<Acc>*>(a.row_loss);

  // Thread tid of a team of `team` takes a contiguous block of rows (as schedule(static) would),
  // with no worksharing construct: one thread runs them all outside any parallel region
  // (entering one costs more than a short row), and a call from inside a caller's own parallel
  // region still runs every row (an orphaned omp for would share them with the caller's team).
  const auto rows_of_thread = [&](int64_t tid, int64_t team) {
    Acc* w = workspace.data() + tid * 4 * Cp;
    const RowBuffers<Acc> b{w, w + Cp, w + 2 * Cp, w + 3 * Cp,
                            stretches.data() + tid * (Cp / kLanes + 1)};
    const int64_t end = N * (tid + 1) / team;
    for (int64_t i = N * tid / team; i < end; ++i) kd_row<S, Tt, Acc>(a, i, scales, b, rows);
    fence_streaming_stores();
  };
#ifdef _OPENMP
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    rows_of_thread(omp_get_thread_num(), omp_get_num_threads());
  } else {
    rows_of_thread(0, 1);
  }
#else
  rows_of_thread(0, 1);
#endif
  if (a.sum_rows) *static_cast<Loss<Acc>*>(a.row_loss) = sum_in_order(kept_rows);
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
  if (a.num_rows == 0 && !a.sum_rows) return;  // (with sum_rows, run writes the sum of none: 0)
  switch (a.student_dtype) {
    case DType::kFloat32: return dispatch_teacher<float>(a);
    case DType::kFloat16: return dispatch_teacher<Half>(a);
    case DType::kBFloat16: return dispatch_teacher<BFloat16>(a);
    case DType::kFloat64: return run<double, double, double>(a);
  }
}

}  // namespace KD_CPU_ISA
}  // namespace kd
