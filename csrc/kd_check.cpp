// Boundary checks on a KDArgs before any kernel runs: the kernels trust nothing else.
#include <cmath>
#include <limits>

#include "kd_args.h"

namespace kd {

namespace {
bool is_half_or_float(DType d) {
  return d == DType::kFloat32 || d == DType::kFloat16 || d == DType::kBFloat16;
}
bool finite_non_negative(double v) { return std::isfinite(v) && v >= 0.0; }
}  // namespace

const char* check_args(const KDArgs& a) {
  if (a.num_rows < 0) return "num_rows must be >= 0";
  if (a.num_classes < 1) return "num_classes must be >= 1";
  if (a.num_teachers < 1 || a.num_teachers > kMaxTeachers)
    return "num_teachers must be in [1, 64]";
  const bool f64 = a.student_dtype == DType::kFloat64;
  if (f64 ? a.teacher_dtype != DType::kFloat64
          : !(is_half_or_float(a.student_dtype) && is_half_or_float(a.teacher_dtype)))
    return "dtypes must be float32/float16/bfloat16 (mixed freely) or all float64";
  if (!(std::isfinite(a.temperature) && a.temperature > 0.0))
    return "temperature must be finite and > 0";
  if (a.temperature < kMinTemperature || a.temperature > kMaxTemperature)
    return "temperature must be in [1e-4, 1e4]";
  if (!finite_non_negative(a.soft_weight) || !finite_non_negative(a.hard_weight))
    return "soft_weight and hard_weight must be finite and >= 0";
  double weight_sum = 0.0;
  for (int32_t m = 0; m < a.num_teachers; ++m) {
    if (!finite_non_negative(a.teacher_weights[m])) return "teacher weights must be finite and >= 0";
    weight_sum += a.teacher_weights[m];
  }
  if (std::fabs(weight_sum - 1.0) > 1e-4) return "teacher weights must sum to 1";
  if (static_cast<uint32_t>(a.ensemble) > 1u) return "ensemble code out of range";
  if (static_cast<uint32_t>(a.soft_loss) >= static_cast<uint32_t>(kNumSoftLosses))
    return "soft_loss code out of range";
  if (!(a.beta >= 0.0 && a.beta <= 1.0)) return "beta must be in [0, 1]";
  if (static_cast<uint32_t>(a.reduction) > 2u) return "reduction code out of range";
  if (a.num_threads < 1) return "num_threads must be >= 1";
  // Written for every row, and with sum_rows even for no rows (their sum, 0).
  if (a.row_loss == nullptr && (a.num_rows > 0 || a.sum_rows)) return "row_loss pointer is null";
  if (a.num_rows == 0) return nullptr;

  // Every row must be addressable with 64-bit offsets: (N - 1) * stride + C fits in int64.
  const int64_t max_offset = std::numeric_limits<int64_t>::max() - a.num_classes;
  auto bad_stride = [&](int64_t stride) {
    return stride < 0 || (stride > 0 && a.num_rows - 1 > max_offset / stride);
  };
  if (a.student == nullptr) return "student pointer is null";
  if (bad_stride(a.student_row_stride)) return "student row stride is negative or overflows";
  for (int32_t m = 0; m < a.num_teachers; ++m) {
    if (a.teachers[m] == nullptr) return "teacher pointer is null";
    if (bad_stride(a.teacher_row_strides[m])) return "teacher row stride is negative or overflows";
  }
  if (bad_stride(a.num_classes)) return "num_rows * num_classes overflows";
  return nullptr;
}

}  // namespace kd
