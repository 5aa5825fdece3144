// The plain argument struct every kdkernels kernel takes: raw pointers, row strides, sizes and
// options. No torch headers: the Python layer fills it from tensors it has already validated,
// and the binding checks it again (kd::check_args) before any kernel reads a byte.
#pragma once

#include <cstdint>

namespace kd {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };
enum class Ensemble : int32_t { kGeometric = 0, kArithmetic = 1 };
enum class SoftLoss : int32_t { kKL = 0, kCrossEntropy = 1, kReverseKL = 2, kJSD = 3 };
// The soft_loss option's names in code order: the binding's SOFT_LOSS_CODES are built from it.
constexpr const char* kSoftLossNames[] = {"kl", "cross_entropy", "reverse_kl", "jsd"};
constexpr int32_t kNumSoftLosses = sizeof(kSoftLossNames) / sizeof(kSoftLossNames[0]);
enum class Reduction : int32_t { kMean = 0, kSum = 1, kNone = 2 };

// Teachers are passed as pointers, so an ensemble is never stacked; the array is fixed so the
// struct can be copied by value into a CUDA kernel's parameter space.
constexpr int kMaxTeachers = 64;

// The temperatures the kernels accept. Outside this range float32 cannot carry the loss: 1/T
// overflows or T^2 underflows (T = 1e-40 gave 0 * inf = NaN), or the soft targets are uniform
// to the last bit. kdkernels._validate.TEMPERATURE_RANGE says the same (a test checks).
constexpr double kMinTemperature = 1e-4;
constexpr double kMaxTemperature = 1e4;

struct KDArgs {
  // Inputs. Rows are `row_stride` elements apart; elements within a row are contiguous.
  const void* student = nullptr;
  int64_t student_row_stride = 0;
  DType student_dtype = DType::kFloat32;

  const void* teachers[kMaxTeachers] = {};
  int64_t teacher_row_strides[kMaxTeachers] = {};
  double teacher_weights[kMaxTeachers] = {};  // non-negative, sum to 1
  int32_t num_teachers = 0;
  DType teacher_dtype = DType::kFloat32;

  const int64_t* labels = nullptr;  // [N] or null (no labels: every row soft-only)
  int64_t ignore_index = -100;
  int64_t unlabeled_index = 0;
  bool has_unlabeled_index = false;

  // The denominators of "mean" for the soft and hard terms (num_items_in_batch), two int64 in
  // the kernel's device memory; null: each term's own row count in this call.
  const int64_t* row_counts = nullptr;

  int64_t num_rows = 0;     // N
  int64_t num_classes = 0;  // C

  double temperature = 4.0;  // the defaults are kdkernels._validate.Options
  double soft_weight = 0.9;
  double hard_weight = 0.1;
  bool scale_soft_by_t2 = true;
  Ensemble ensemble = Ensemble::kGeometric;
  SoftLoss soft_loss = SoftLoss::kKL;
  double beta = 0.5;  // jsd only: the mixture weight of the teachers, in [0, 1]
  Reduction reduction = Reduction::kMean;

  // Outputs. row_loss: [N], float64 when the inputs are float64, float32 otherwise; already
  // weighted and divided by the valid-row counts, so the loss is its sum (or itself for "none").
  // With sum_rows (the CPU kernel only: the CUDA kernel refuses it) row_loss is one value, that
  // sum, added in float64 in row order: a small batch's call then needs no torch sum.
  // grad: [N, C] contiguous in the student's dtype, the gradient of sum(row_loss); null when the
  // student needs no gradient (forward only).
  void* row_loss = nullptr;
  bool sum_rows = false;
  void* grad = nullptr;

  int32_t num_threads = 1;  // CPU only
};

// Returns nullptr when the struct is safe to run, otherwise a message naming the bad field.
const char* check_args(const KDArgs& a);

void kd_forward_cpu(const KDArgs& a);

}  // namespace kd
