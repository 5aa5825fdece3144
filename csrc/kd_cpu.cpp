// The fused distillation loss on the CPU: one call computes every row's weighted loss and, when
// asked, the student's gradient. A row is read from memory once: pass 1 converts it into a
// per-thread float buffer (student s, combined teacher z) and takes the maxima; pass 2 computes
// the three exponentials per element (teacher, student at T, student at 1) and the sums; pass 3
// writes the gradient from the buffered exponentials. The buffers are C floats each and stay in
// cache, so the only [N, C] memory touched is the inputs and the gradient.
#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kd_args.h"
#include "kd_dtype.h"
#include "kd_row_math.h"

namespace kd {
namespace {

// Buffers of one thread: four rows of C accumulator values.
template <typename Acc>
struct RowBuffers {
  Acc* s;  // student logits, then exp(s - m_s)
  Acc* z;  // combined teacher logits (or log p), then exp(z - m_z)
  Acc* u;  // exp(s / T - m_u)
  Acc* t;  // scratch for one teacher of an arithmetic ensemble
};

template <typename Acc, typename In>
Acc load_scaled_max(const In* src, Acc* dst, int64_t n, Acc scale) {
  Acc m = -std::numeric_limits<Acc>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    const Acc v = static_cast<Acc>(to_float(src[j])) * scale;
    dst[j] = v;
    m = v > m ? v : m;  // a NaN never becomes the max; it still reaches the sums through exp
  }
  return m;
}

template <typename Acc>
Acc row_max(const Acc* x, int64_t n) {
  Acc m = -std::numeric_limits<Acc>::infinity();
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

// Geometric ensemble: z_j = sum_m (w_m / T) t_mj. Returns max_j z_j.
template <typename Tt, typename Acc>
Acc combine_geometric(const KDArgs& a, int64_t row, Acc inv_t, const RowBuffers<Acc>& b) {
  const int64_t C = a.num_classes;
  bool first = true;
  for (int32_t m = 0; m < a.num_teachers; ++m) {
    const Acc c = static_cast<Acc>(a.teacher_weights[m]) * inv_t;
    if (c == Acc(0)) continue;  // a zero-weight member is not part of the ensemble
    const Tt* t = static_cast<const Tt*>(a.teachers[m]) + row * a.teacher_row_strides[m];
    if (first) {
      for (int64_t j = 0; j < C; ++j) b.z[j] = c * static_cast<Acc>(to_float(t[j]));
      first = false;
    } else {
      for (int64_t j = 0; j < C; ++j) b.z[j] += c * static_cast<Acc>(to_float(t[j]));
    }
  }
  return row_max(b.z, C);
}

// Arithmetic ensemble: z_j = log sum_m w_m softmax(t_m / T)_j. Returns max_j z_j.
template <typename Tt, typename Acc>
Acc combine_arithmetic(const KDArgs& a, int64_t row, Acc inv_t, const RowBuffers<Acc>& b) {
  const int64_t C = a.num_classes;
  bool first = true;
  for (int32_t m = 0; m < a.num_teachers; ++m) {
    const Acc w = static_cast<Acc>(a.teacher_weights[m]);
    if (w == Acc(0)) continue;
    const Tt* t = static_cast<const Tt*>(a.teachers[m]) + row * a.teacher_row_strides[m];
    const Acc mt = load_scaled_max(t, b.t, C, inv_t);
    Acc l = 0;
    for (int64_t j = 0; j < C; ++j) {
      b.t[j] = fast_exp(b.t[j] - mt);
      l += b.t[j];
    }
    const Acc c = w / l;
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
  const Acc m_s = load_scaled_max(s, b.s, C, Acc(1));
  const Acc m_u = m_s * inv_t;
  const Acc s_y = role.hard ? b.s[label] : Acc(0);
  const bool keep = grad != nullptr;
  const bool kl = a.soft_loss == SoftLoss::kKL;

  Acc l_z = 1, l_u = 1, l_s = 1, sum_ex = 0;
  if (role.soft) {
    const Acc m_z = a.ensemble == Ensemble::kGeometric ? combine_geometric<Tt>(a, i, inv_t, b)
                                                       : combine_arithmetic<Tt>(a, i, inv_t, b);
    l_z = 0;
    l_u = 0;
    l_s = 0;
    for (int64_t j = 0; j < C; ++j) {
      const Acc dz = b.z[j] - m_z;
      const Acc du = b.s[j] * inv_t - m_u;
      const Acc e_z = fast_exp(dz);
      const Acc e_u = fast_exp(du);
      l_z += e_z;
      l_u += e_u;
      sum_ex += weighted_or_zero(e_z, kl ? dz - du : du);
      if (role.hard) {
        const Acc e_s = fast_exp(b.s[j] - m_s);
        l_s += e_s;
        if (keep) b.s[j] = e_s;
      }
      if (keep) {
        b.z[j] = e_z;
        b.u[j] = e_u;
      }
    }
  } else {
    l_s = 0;
    for (int64_t j = 0; j < C; ++j) {
      const Acc e_s = fast_exp(b.s[j] - m_s);
      l_s += e_s;
      b.s[j] = e_s;
    }
  }

  Acc value = 0;
  if (role.soft) value += static_cast<Acc>(scales.soft_loss) * soft_term(a, sum_ex, l_z, l_u);
  if (role.hard) value += static_cast<Acc>(scales.hard_loss) * hard_term(m_s, l_s, s_y);
  *loss = static_cast<Loss>(value);
  if (!grad) return;

  // g_j = cs (q_j - p_j) + ch (r_j - [j == y])
  const Acc cs = role.soft ? static_cast<Acc>(scales.soft_grad) : Acc(0);
  const Acc ch = role.hard ? static_cast<Acc>(scales.hard_grad) : Acc(0);
  const Acc q_scale = cs / l_u, p_scale = cs / l_z, r_scale = ch / l_s;
  const int64_t y = role.hard ? label : -1;
  if (role.soft && role.hard) {
    for (int64_t j = 0; j < C; ++j) {
      const Acc g = q_scale * b.u[j] - p_scale * b.z[j] + r_scale * b.s[j];
      grad[j] = from_acc<S>(j == y ? g - ch : g);
    }
  } else if (role.soft) {
    for (int64_t j = 0; j < C; ++j) grad[j] = from_acc<S>(q_scale * b.u[j] - p_scale * b.z[j]);
  } else {
    for (int64_t j = 0; j < C; ++j) {
      const Acc g = r_scale * b.s[j];
      grad[j] = from_acc<S>(j == y ? g - ch : g);
    }
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
  const TermScales scales = term_scales(a, soft_rows, hard_rows);
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(a.num_threads, N)));
  std::vector<Acc> workspace(static_cast<size_t>(threads) * 4 * static_cast<size_t>(C));

#pragma omp parallel num_threads(threads)
  {
#ifdef _OPENMP
    const int64_t tid = omp_get_thread_num();
#else
    const int64_t tid = 0;
#endif
    Acc* w = workspace.data() + tid * 4 * C;
    const RowBuffers<Acc> b{w, w + C, w + 2 * C, w + 3 * C};
#pragma omp for schedule(static)
    for (int64_t i = 0; i < N; ++i) kd_row<S, Tt, Acc>(a, i, scales, b);
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

void kd_forward_cpu(const KDArgs& a) {
  if (a.num_rows == 0) return;
  switch (a.student_dtype) {
    case DType::kFloat32: return dispatch_teacher<float>(a);
    case DType::kFloat16: return dispatch_teacher<Half>(a);
    case DType::kBFloat16: return dispatch_teacher<BFloat16>(a);
    case DType::kFloat64: return run<double, double, double>(a);
  }
}

}  // namespace kd
