// Row math shared by the CPU and CUDA kernels: which terms a row takes part in, the per-row
// scales of the two terms, the closing formulas of the soft and hard terms from a row's
// softmax statistics, and a branch-free exp. Everything here is scalar and header-only so both
// compilers inline it into their own loops.
//
// Notation for one row (see docs/DESIGN.md section 1): z = teacher logits combined at temperature T
// (geometric: sum_m w_m t_m / T), u = s / T, with maxima m_z, m_u and
//   l_z = sum_j exp(z_j - m_z),  l_u = sum_j exp(u_j - m_u),  l_s = sum_j exp(s_j - m_s).
// Then log p_j = (z_j - m_z) - log l_z and log q_j = (u_j - m_u) - log l_u, so with
//   A = sum_j e_j * ((z_j - m_z) - (u_j - m_u)),  B = sum_j e_j * (u_j - m_u),  e_j = exp(z_j - m_z)
// KL(p||q) = A / l_z - log l_z + log l_u  and  H(p, q) = -B / l_z + log l_u.
// For the arithmetic ensemble e_j = p_j and (z_j - m_z) = log p_j, with l_z = sum p_j = 1.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "kd_args.h"

// Always inlined: these run per element inside vector loops, which a call would de-vectorise
// (GCC stopped inlining fast_exp once the accurate KL pass added call sites: 10x slower).
#if defined(__CUDACC__)
#define KD_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define KD_HOST_DEVICE inline __attribute__((always_inline))
#else
#define KD_HOST_DEVICE inline
#endif

namespace kd {

struct RowRole {
  bool soft;  // row is in S: takes the soft term
  bool hard;  // row is in H: takes the hard term against `label`
  bool bad;   // label neither a class nor a marker: the row's loss is NaN
};

KD_HOST_DEVICE RowRole row_role(const KDArgs& a, int64_t label) {
  if (a.labels == nullptr) return {true, false, false};
  if (label == a.ignore_index) return {false, false, false};
  if (a.has_unlabeled_index && label == a.unlabeled_index) return {true, false, false};
  if (label >= 0 && label < a.num_classes) return {true, true, false};
  return {true, true, true};
}

// Whether a kernel combines the teachers' logits (geometric mean) rather than their softmaxes:
// with one member the two means are the same distribution, and the logit path is the cheaper.
KD_HOST_DEVICE bool combines_logits(const KDArgs& a) {
  return a.ensemble == Ensemble::kGeometric || a.num_teachers == 1;
}

// Loss multipliers of the two terms for one row, and the matching gradient multipliers:
// d(soft_i)/d(s_ij) = (soft gradient of the divergence)_j / T and d(hard_i)/d(s_ij) = r_ij - [j == y_i].
struct TermScales {
  double soft_loss, hard_loss, soft_grad, hard_grad;
};

KD_HOST_DEVICE TermScales term_scales(const KDArgs& a, int64_t soft_rows, int64_t hard_rows) {
  const double t = a.temperature;
  double soft = a.soft_weight * (a.scale_soft_by_t2 ? t * t : 1.0);
  double hard = a.hard_weight;
  if (a.reduction == Reduction::kMean) {  // a count of 0 (no rows, or num_items_in_batch = 0): 0
    soft = soft_rows > 0 ? soft / static_cast<double>(soft_rows) : 0.0;
    hard = hard_rows > 0 ? hard / static_cast<double>(hard_rows) : 0.0;
  }
  return {soft, hard, soft / t, hard};
}

// e * x with 0 * anything = 0: a class the teacher gives probability 0 (a -inf logit)
// contributes nothing even where x is infinite. A NaN e is kept, so NaN inputs stay NaN.
template <typename Acc>
KD_HOST_DEVICE Acc weighted_or_zero(Acc e, Acc x) {
  const Acc product = e * x;  // computed unconditionally: the select stays branch-free
  return e == Acc{} ? Acc{} : product;  // Acc{}: 0, also for a vector of lanes
}

// -log r_y = m_s + log l_s - s_y.
template <typename Acc>
KD_HOST_DEVICE Acc hard_term(Acc m_s, Acc l_s, Acc s_y) {
  using std::log;
  return (m_s - s_y) + log(l_s);
}

template <typename To, typename From>
KD_HOST_DEVICE To bit_cast(From from) {
  To to;
  memcpy(&to, &from, sizeof(To));
  return to;
}

// Arguments below this give fast_exp 0: e^x < 2.8e-38, near the smallest normal float (2^-126).
constexpr float kExpFlushBelow = -86.5f;

// exp(x) for x <= 0 (or NaN), the only arguments the kernels take: x - max over a row (the
// CPU kernel's accurate and ensemble passes; its exponential pass works in base 2 on whole
// vectors, kd_cpu_kernel.cpp). Written so compilers vectorise it into few multiplications:
// x = n ln2 + r with n = round(x / ln2) by adding and removing 1.5 * 2^23 (exact under
// the default rounding mode) and |r| <= ln2 / 2 by a Cody-Waite split of ln2 (both products
// exact, so r keeps its digits at every |x|), e^r by its degree-6 Taylor polynomial (relative
// error < 2.5e-7 in float32), and 2^n e^r by adding n to the exponent field of e^r, with no
// float-to-int conversion: kf = x / ln2 + 1.5 * 2^23 holds n in its low mantissa bits, and the
// rest of kf's bits vanish when shifted up by 23, so kf's bits << 23 are n << 23 (mod 2^32).
// That needs a normal result: x below kExpFlushBelow gives 0, so exp(-inf) = 0 exactly and no
// denormal is made; a NaN stays NaN. Positive x is out of contract.
KD_HOST_DEVICE float fast_exp(float x) {
  const float shifter = 12582912.0f;
  const float kf = x * 1.44269504088896341f + shifter;
  const float n = kf - shifter;
  float r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float y = bit_cast<float>(bit_cast<uint32_t>(p) + (bit_cast<uint32_t>(kf) << 23));
  // x - x is 0, or NaN when x is NaN: a NaN's payload bits can shift into y's exponent above.
  return x < kExpFlushBelow ? 0.0f : y + (x - x);
}

KD_HOST_DEVICE double fast_exp(double x) {
  using std::exp;
  return exp(x);
}

// log(x), written so compilers vectorise it: x = 2^e m with m in [sqrt(1/2), sqrt(2)), and
// log m = 2 atanh(f / (2 + f)) with f = m - 1 by its odd series (|s| <= 0.172: relative error
// < 1e-7). 0 gives -inf, +inf gives +inf, a negative or NaN x gives NaN.
KD_HOST_DEVICE float fast_log(float x) {
  const bool tiny = x < 1.17549435e-38f;  // subnormal: scale into the normal range first
  const float xs = tiny ? x * 8388608.0f : x;
  const int32_t bits = bit_cast<int32_t>(xs);
  float m = bit_cast<float>((bits & 0x007fffff) | 0x3f800000);  // [1, 2)
  const bool high = m > 1.41421356f;
  m = high ? m * 0.5f : m;
  const float e = static_cast<float>(((bits >> 23) & 0xff) - 127 + (high ? 1 : 0) - (tiny ? 23 : 0));
  const float f = m - 1.0f;
  const float s = f / (2.0f + f), s2 = s * s;
  const float series = s2 * (2.0f / 3 + s2 * (2.0f / 5 + s2 * (2.0f / 7 + s2 * (2.0f / 9))));
  const float y = e * 0.693145751953125f + (2.0f * s + (s * series + e * 1.428606765330187e-06f));
  const float inf = bit_cast<float>(0x7f800000), nan = bit_cast<float>(0x7fc00000);
  const float special = x == 0.0f ? -inf : (x == inf ? inf : nan);
  return x > 0.0f && x < inf ? y : special;
}

KD_HOST_DEVICE double fast_log(double x) {
  using std::log;
  return log(x);
}

// exp(x) - 1 for x <= 0 without cancelling near 0: a Taylor series for |x| < 1/4 (float; the
// float64 path takes the library's expm1).
KD_HOST_DEVICE float expm1_nonpositive(float x) {
  const float series =
      x * (1.0f + x * (0.5f + x * (1.0f / 6 + x * (1.0f / 24 + x * (1.0f / 120 + x * (1.0f / 720))))));
  return x > -0.25f ? series : fast_exp(x) - 1.0f;
}

KD_HOST_DEVICE double expm1_nonpositive(double x) {
  using std::expm1;
  return expm1(x);
}

// log(1 + x) for x >= -1 without cancelling near 0: log(u) x / (u - 1) with u = 1 + x, which
// corrects u's rounding (Goldberg), and x itself where u rounds to 1 (float; the float64 path
// takes the library's log1p).
KD_HOST_DEVICE float log1p_fast(float x) {
  const float u = 1.0f + x;
  const float du = u - 1.0f;
  return du == 0.0f ? x : fast_log(u) * (x / (du == 0.0f ? 1.0f : du));
}

KD_HOST_DEVICE double log1p_fast(double x) {
  using std::log1p;
  return log1p(x);
}

// One class's share of KL(p || q) as a term that is never negative: p f(d) with d = log p - log q
// and f(d) = exp(-d) - 1 + d >= 0 (the terms sum to the KL because sum_j (q_j - p_j) = 0), and
// q where p = 0. Summing p d instead cancels near p = q, where float32 reads the KL negative.
// f is a Taylor series where |d| < 1/4 (there exp(-d) - 1 + d would cancel), else
// exp(log p - d) - p + p d, with the q that d implies, so that an error in d's row constant
// cancels to first order (log p - d = log q <= 0, fast_exp's range, up to rounding).
// kdkernels/reference.py (kl_terms) and the Triton kernel (_kl_term) compute the same.
template <typename Acc>
KD_HOST_DEVICE Acc kl_term(Acc p, Acc log_p, Acc d, Acc q) {
  // Both branches are computed and one selected: a loop over classes stays branch-free.
  const Acc series =
      d * d *
      (Acc(0.5) - d * (Acc(1.0 / 6) - d * (Acc(1.0 / 24) - d * (Acc(1.0 / 120) -
                                                               d * (Acc(1.0 / 720) - d * Acc(1.0 / 5040))))));
  const Acc far = fast_exp(log_p - d) - p + p * d;
  const Acc near = p * series;
  const Acc term = (d < Acc(0.25)) & (d > Acc(-0.25)) ? near : far;
  return p == Acc(0) ? q : term;
}

// The divergence axis: one small struct per soft_loss with everything a kernel needs of it.
//   element(p, log_p, d, q, log_q, beta): one class's share of the divergence (`term`, each
//     share >= 0 and the shares summing to the divergence), from both distributions with
//     d = log p - log q computed where it keeps its digits; and, for the divergences whose
//     gradient needs a row sum, `a` and `qa` (below);
//   a_of(d, beta) (row_sum_gradient only): `a` from d alone, for a gradient pass that kept d;
//   row_sum_gradient: false: the gradient with respect to u = s / T is q - p (KL, CE);
//     true: it is q_j (a_j - A) with A = sum_k qa_k, so the kernels sum qa over the row before
//     they write the gradient (a is dD/dq_j up to a constant, qa = q_j a_j in a form that keeps
//     its digits);
//   fast_weight(dz, du) and fast_close(A, l_z, l_u) (KL, CE only): the one-pass form of the
//     CPU kernel, a running sum A = sum_j e_j fast_weight(dz_j, du_j) (e_j = exp(dz_j), and
//     nothing where e_j is 0) and the soft term from it; may_cancel: whether fast_close can lose
//     its digits (then the CPU kernel sums `term` instead). fast_weight must be linear in
//     (dz, du): the CPU kernel passes them in log2 units, on vectors of 16 floats, and scales
//     the sum A back by ln 2 once.
// A new divergence is one more struct here, one more case in visit_divergence, its code in
// kd_args.h, and the same pieces in the Triton kernel (_soft_element) and the reference.
template <typename Acc>
struct SoftElement {
  Acc term, a, qa;
};

struct KLDivergence {  // KL(p || q) = sum_j p_j (log p_j - log q_j)
  static constexpr bool row_sum_gradient = false;
  static constexpr bool may_cancel = true;
  template <typename Acc>
  KD_HOST_DEVICE static Acc fast_weight(Acc dz, Acc du) {
    return dz - du;
  }
  template <typename Acc>
  KD_HOST_DEVICE static Acc fast_close(Acc sum, Acc l_z, Acc l_u) {
    using std::log;
    return sum / l_z - log(l_z) + log(l_u);
  }
  template <typename Acc>
  KD_HOST_DEVICE static SoftElement<Acc> element(Acc p, Acc log_p, Acc d, Acc q, Acc /*log_q*/,
                                                 Acc /*beta*/) {
    return {kl_term(p, log_p, d, q), Acc(0), Acc(0)};
  }
};

struct CrossEntropy {  // H(p, q) = -sum_j p_j log q_j: KL plus the teachers' entropy
  static constexpr bool row_sum_gradient = false;
  static constexpr bool may_cancel = false;
  template <typename Acc>
  KD_HOST_DEVICE static Acc fast_weight(Acc /*dz*/, Acc du) {
    return du;
  }
  template <typename Acc>
  KD_HOST_DEVICE static Acc fast_close(Acc sum, Acc l_z, Acc l_u) {
    using std::log;
    return -sum / l_z + log(l_u);
  }
  template <typename Acc>
  KD_HOST_DEVICE static SoftElement<Acc> element(Acc p, Acc /*log_p*/, Acc /*d*/, Acc /*q*/,
                                                 Acc log_q, Acc /*beta*/) {
    return {weighted_or_zero(p, -log_q), Acc(0), Acc(0)};
  }
};

// KL(q || p) = sum_j q_j (log q_j - log p_j): the KL's terms with the roles of p and q swapped
// (kl_term(q, log q, -d, p) >= 0). +inf where p_j = 0 < q_j; 0 where both are 0. Its gradient
// is q_j (log q_j - log p_j - KL(q || p)): a = -d, and the row sum A is the divergence itself.
struct ReverseKL {
  static constexpr bool row_sum_gradient = true;
  template <typename Acc>
  KD_HOST_DEVICE static SoftElement<Acc> element(Acc p, Acc /*log_p*/, Acc d, Acc q, Acc log_q,
                                                 Acc beta) {
    const Acc term = kl_term(q, log_q, -d, p);
    return {term, a_of(d, beta), term};
  }
  template <typename Acc>
  KD_HOST_DEVICE static Acc a_of(Acc d, Acc /*beta*/) {
    return -d;
  }
};

// e = log q - log m and f = log p - log m with m = beta p + (1 - beta) q, from d = log p - log q
// through expm1/log1p of a non-positive argument (no overflow, no cancellation near p = q).
template <typename Acc>
struct MixtureLogRatios {
  Acc e, f;
};

template <typename Acc>
KD_HOST_DEVICE MixtureLogRatios<Acc> mixture_log_ratios(Acc d, Acc beta) {
  const bool p_smaller = d <= Acc(0);  // NaN d (p = q = 0) takes the other form: NaN, unused
  const Acc x = p_smaller ? d : -d;    // <= 0 (or NaN)
  const Acc l = -log1p_fast((p_smaller ? beta : Acc(1) - beta) * expm1_nonpositive(x));
  return {p_smaller ? l : l - d, p_smaller ? d + l : l};
}

// Generalised Jensen-Shannon divergence with TRL's convention (GKDTrainer.generalized_jsd_loss):
// beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q; the kernels take beta in
// (0, 1) here (divergence_of sends 0 and 1 to KL and reverse KL). e = log q - log m and
// f = log p - log m come from d through expm1/log1p of a non-positive argument (no overflow, no
// cancellation near p = q); each KL is summed as kl_term's non-negative terms. The gradient
// with respect to u is q_j (a_j - A) with a = (1 - beta) e and A = (1 - beta) KL(q || m).
struct JensenShannon {
  static constexpr bool row_sum_gradient = true;
  template <typename Acc>
  KD_HOST_DEVICE static SoftElement<Acc> element(Acc p, Acc log_p, Acc d, Acc q, Acc log_q,
                                                 Acc beta) {
    const MixtureLogRatios<Acc> r = mixture_log_ratios(d, beta);
    const Acc m = beta * p + (Acc(1) - beta) * q;
    const Acc kl_qm = kl_term(q, log_q, r.e, m);
    const Acc term = beta * kl_term(p, log_p, r.f, m) + (Acc(1) - beta) * kl_qm;
    return {term, (Acc(1) - beta) * r.e, (Acc(1) - beta) * kl_qm};
  }
  template <typename Acc>
  KD_HOST_DEVICE static Acc a_of(Acc d, Acc beta) {
    return (Acc(1) - beta) * mixture_log_ratios(d, beta).e;
  }
};

// The divergence a kernel computes: jsd at beta 0 and 1 is TRL's KL(p || q) and KL(q || p).
KD_HOST_DEVICE SoftLoss divergence_of(const KDArgs& a) {
  if (a.soft_loss == SoftLoss::kJSD && a.beta == 0.0) return SoftLoss::kKL;
  if (a.soft_loss == SoftLoss::kJSD && a.beta == 1.0) return SoftLoss::kReverseKL;
  return a.soft_loss;
}

// Calls f(Divergence{}) for the divergence `code` names.
template <typename F>
KD_HOST_DEVICE auto visit_divergence(SoftLoss code, F&& f) {
  switch (code) {
    case SoftLoss::kCrossEntropy: return f(CrossEntropy{});
    case SoftLoss::kReverseKL: return f(ReverseKL{});
    case SoftLoss::kJSD: return f(JensenShannon{});
    case SoftLoss::kKL: break;
  }
  return f(KLDivergence{});
}

}  // namespace kd
