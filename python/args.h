// The kernel argument struct as every kdkernels binding module builds it from Python: raw
// pointers and options in, a checked kd::KDArgs out (kd::check_args, before any kernel reads a
// byte). Header-only so the product module (_C) and the test-only emulator module (_emulator)
// each register their own module-local KDArgs type.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "kd_args.h"

namespace kd_python {
namespace py = pybind11;

template <typename T>
inline T* as_pointer(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

inline kd::DType dtype_from_code(int code, const char* name) {
  if (code < 0 || code > 3) throw std::invalid_argument(std::string(name) + ": unknown dtype code");
  return static_cast<kd::DType>(code);
}

// The options of a call, everything but its pointers, strides and sizes: what a training loop
// passes unchanged every step, so the Python layer converts them once (a KDArgs object it keeps)
// and with_call adds each call's fields. Checked with those, by kd::check_args.
inline kd::KDArgs kernel_options(const std::vector<double>& teacher_weights, int64_t ignore_index,
                                 std::optional<int64_t> unlabeled_index, double temperature,
                                 double soft_weight, double hard_weight, bool scale_soft_by_t2,
                                 int ensemble, int soft_loss, double beta, int reduction) {
  if (teacher_weights.empty() || teacher_weights.size() > static_cast<size_t>(kd::kMaxTeachers))
    throw std::invalid_argument("the number of teachers must be in [1, 64]");
  kd::KDArgs a;
  a.num_teachers = static_cast<int32_t>(teacher_weights.size());
  for (size_t m = 0; m < teacher_weights.size(); ++m) a.teacher_weights[m] = teacher_weights[m];
  a.ignore_index = ignore_index;
  a.has_unlabeled_index = unlabeled_index.has_value();
  a.unlabeled_index = unlabeled_index.value_or(0);
  a.temperature = temperature;
  a.soft_weight = soft_weight;
  a.hard_weight = hard_weight;
  a.scale_soft_by_t2 = scale_soft_by_t2;
  a.ensemble = static_cast<kd::Ensemble>(ensemble);
  a.soft_loss = static_cast<kd::SoftLoss>(soft_loss);
  a.beta = beta;
  a.reduction = static_cast<kd::Reduction>(reduction);
  return a;
}

// kernel_options' struct with one call's pointers, strides and sizes added, checked.
inline kd::KDArgs with_call(const kd::KDArgs& options, uintptr_t student,
                            int64_t student_row_stride, int student_dtype,
                            const std::vector<uintptr_t>& teachers,
                            const std::vector<int64_t>& teacher_row_strides, int teacher_dtype,
                            uintptr_t labels, uintptr_t row_counts, int64_t num_rows,
                            int64_t num_classes, uintptr_t row_loss, bool sum_rows,
                            uintptr_t grad, int num_threads) {
  if (teachers.size() != teacher_row_strides.size() ||
      teachers.size() != static_cast<size_t>(options.num_teachers))
    throw std::invalid_argument("teachers, teacher_row_strides and teacher_weights differ in length");
  kd::KDArgs a = options;
  a.student = as_pointer<const void>(student);
  a.student_row_stride = student_row_stride;
  a.student_dtype = dtype_from_code(student_dtype, "student_dtype");
  for (size_t m = 0; m < teachers.size(); ++m) {
    a.teachers[m] = as_pointer<const void>(teachers[m]);
    a.teacher_row_strides[m] = teacher_row_strides[m];
  }
  a.teacher_dtype = dtype_from_code(teacher_dtype, "teacher_dtype");
  a.labels = as_pointer<const int64_t>(labels);
  a.num_rows = num_rows;
  a.num_classes = num_classes;
  a.row_counts = as_pointer<const int64_t>(row_counts);
  a.row_loss = as_pointer<void>(row_loss);
  a.sum_rows = sum_rows;
  a.grad = as_pointer<void>(grad);
  a.num_threads = num_threads;
  if (const char* problem = kd::check_args(a)) throw std::invalid_argument(problem);
  return a;
}

// Everything in one call, per-call fields first (the tests of the boundary checks, and any
// caller without a kept kernel_options object).
inline kd::KDArgs make_args(uintptr_t student, int64_t student_row_stride, int student_dtype,
                            const std::vector<uintptr_t>& teachers,
                            const std::vector<int64_t>& teacher_row_strides, int teacher_dtype,
                            uintptr_t labels, uintptr_t row_counts, int64_t num_rows,
                            int64_t num_classes, uintptr_t row_loss, bool sum_rows,
                            uintptr_t grad, int num_threads,
                            const std::vector<double>& teacher_weights, int64_t ignore_index,
                            std::optional<int64_t> unlabeled_index,
                            double temperature, double soft_weight, double hard_weight,
                            bool scale_soft_by_t2, int ensemble, int soft_loss, double beta,
                            int reduction) {
  const kd::KDArgs options =
      kernel_options(teacher_weights, ignore_index, unlabeled_index, temperature, soft_weight,
                     hard_weight, scale_soft_by_t2, ensemble, soft_loss, beta, reduction);
  return with_call(options, student, student_row_stride, student_dtype, teachers,
                   teacher_row_strides, teacher_dtype, labels, row_counts, num_rows, num_classes,
                   row_loss, sum_rows, grad, num_threads);
}

// Registers KDArgs (module-local: never clashes with another build loaded beside it) and make_args.
inline void bind_args(py::module_& m) {
  py::class_<kd::KDArgs>(m, "KDArgs", py::module_local());
  m.def("make_args", &make_args, py::arg("student"), py::arg("student_row_stride"),
        py::arg("student_dtype"), py::arg("teachers"), py::arg("teacher_row_strides"),
        py::arg("teacher_dtype"), py::arg("labels"), py::arg("row_counts"), py::arg("num_rows"),
        py::arg("num_classes"), py::arg("row_loss"), py::arg("sum_rows"), py::arg("grad"),
        py::arg("num_threads"), py::arg("teacher_weights"), py::arg("ignore_index"),
        py::arg("unlabeled_index"), py::arg("temperature"), py::arg("soft_weight"),
        py::arg("hard_weight"), py::arg("scale_soft_by_t2"), py::arg("ensemble"),
        py::arg("soft_loss"), py::arg("beta"), py::arg("reduction"),
        "Build and check the kernel argument struct from raw pointers and options.");
  m.def("kernel_options", &kernel_options, py::arg("teacher_weights"), py::arg("ignore_index"),
        py::arg("unlabeled_index"), py::arg("temperature"), py::arg("soft_weight"),
        py::arg("hard_weight"), py::arg("scale_soft_by_t2"), py::arg("ensemble"),
        py::arg("soft_loss"), py::arg("beta"), py::arg("reduction"),
        "make_args' options alone, kept by the caller and completed by each call (run_cpu).");
}

}  // namespace kd_python
