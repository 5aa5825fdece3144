// pybind11 layer of kdkernels._C: turns Python ints (data pointers, strides) and floats into a
// kd::KDArgs, checks it again at the boundary, releases the GIL and runs the kernel. Tensor
// handling and user-facing validation live in Python (kdkernels/_validate.py); this layer only
// refuses what would make the kernel read or write out of bounds.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "kd_args.h"
#include "kd_cpu.h"
#include "kd_cuda_plan.h"
#ifdef KDKERNELS_WITH_EMULATOR
#include "kd_cuda_emulated.h"
#endif
#ifdef KDKERNELS_WITH_CUDA
#include "kd_cuda.h"
#endif

namespace py = pybind11;

namespace {

template <typename T>
T* as_pointer(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

kd::DType dtype_from_code(int code, const char* name) {
  if (code < 0 || code > 3) throw std::invalid_argument(std::string(name) + ": unknown dtype code");
  return static_cast<kd::DType>(code);
}

kd::KDArgs make_args(uintptr_t student, int64_t student_row_stride, int student_dtype,
                     const std::vector<uintptr_t>& teachers,
                     const std::vector<int64_t>& teacher_row_strides, int teacher_dtype,
                     const std::vector<double>& teacher_weights, uintptr_t labels,
                     int64_t ignore_index, std::optional<int64_t> unlabeled_index,
                     int64_t num_rows, int64_t num_classes, double temperature,
                     double soft_weight, double hard_weight, bool scale_soft_by_t2, int ensemble,
                     int soft_loss, int reduction, uintptr_t row_loss, uintptr_t grad,
                     int num_threads) {
  if (teachers.size() != teacher_row_strides.size() || teachers.size() != teacher_weights.size())
    throw std::invalid_argument("teachers, teacher_row_strides and teacher_weights differ in length");
  if (teachers.empty() || teachers.size() > static_cast<size_t>(kd::kMaxTeachers))
    throw std::invalid_argument("the number of teachers must be in [1, 64]");
  kd::KDArgs a;
  a.student = as_pointer<const void>(student);
  a.student_row_stride = student_row_stride;
  a.student_dtype = dtype_from_code(student_dtype, "student_dtype");
  a.num_teachers = static_cast<int32_t>(teachers.size());
  for (size_t m = 0; m < teachers.size(); ++m) {
    a.teachers[m] = as_pointer<const void>(teachers[m]);
    a.teacher_row_strides[m] = teacher_row_strides[m];
    a.teacher_weights[m] = teacher_weights[m];
  }
  a.teacher_dtype = dtype_from_code(teacher_dtype, "teacher_dtype");
  a.labels = as_pointer<const int64_t>(labels);
  a.ignore_index = ignore_index;
  a.has_unlabeled_index = unlabeled_index.has_value();
  a.unlabeled_index = unlabeled_index.value_or(0);
  a.num_rows = num_rows;
  a.num_classes = num_classes;
  a.temperature = temperature;
  a.soft_weight = soft_weight;
  a.hard_weight = hard_weight;
  a.scale_soft_by_t2 = scale_soft_by_t2;
  a.ensemble = static_cast<kd::Ensemble>(ensemble);
  a.soft_loss = static_cast<kd::SoftLoss>(soft_loss);
  a.reduction = static_cast<kd::Reduction>(reduction);
  a.row_loss = as_pointer<void>(row_loss);
  a.grad = as_pointer<void>(grad);
  a.num_threads = num_threads;
  if (const char* problem = kd::check_args(a)) throw std::invalid_argument(problem);
  return a;
}

// The gradient is a fresh [N, C] buffer the kernel writes once; faulting it in 4 KiB pages costs
// as much as the kernel itself at LLM sizes. Asking for transparent huge pages on its 2 MiB
// aligned interior (a hint: refused or unsupported is harmless) cuts that cost several times.
void advise_huge_pages(void* data, uint64_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t start = reinterpret_cast<uintptr_t>(data);
  const uintptr_t begin = (start + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (start + nbytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)nbytes;
#endif
}

uint64_t dtype_size(kd::DType d) {
  return d == kd::DType::kFloat64 ? 8 : d == kd::DType::kFloat32 ? 4 : 2;
}

void forward_cpu(const kd::KDArgs& a) {
  py::gil_scoped_release release;
  if (a.grad != nullptr) {
    advise_huge_pages(a.grad, static_cast<uint64_t>(a.num_rows) * static_cast<uint64_t>(a.num_classes) *
                                  dtype_size(a.student_dtype));
  }
  kd::kd_forward_cpu(a);
}

#ifdef KDKERNELS_WITH_CUDA
void forward_cuda(const kd::KDArgs& a, uintptr_t stream, int device, uintptr_t workspace) {
  if (a.num_rows > 0 && workspace == 0) throw std::invalid_argument("workspace pointer is null");
  const char* error = nullptr;
  {
    py::gil_scoped_release release;
    error = kd::kd_forward_cuda(a, reinterpret_cast<void*>(stream), device,
                                reinterpret_cast<void*>(workspace));
  }
  if (error != nullptr) throw std::runtime_error(std::string("kdkernels CUDA kernel: ") + error);
}
#endif

#ifdef KDKERNELS_WITH_EMULATOR
// The CUDA kernel on the host emulator (CPU tensors): tests the CUDA code without a GPU.
kd::EmulatedDevice emulated_device(const py::dict& spec) {
  kd::EmulatedDevice device;
  for (const auto& [key, value] : spec) {
    const auto name = key.cast<std::string>();
    if (name == "smem_per_block") {
      device.smem_per_block = value.cast<size_t>();
    } else if (name == "max_cluster") {
      device.max_cluster = value.cast<int>();
    } else if (name == "warp_row_max_classes") {
      device.warp_row_max_classes = value.cast<int64_t>();
    } else {
      throw std::invalid_argument("unknown emulated device field: " + name);
    }
  }
  if (device.max_cluster < 1 || device.max_cluster > 16)
    throw std::invalid_argument("max_cluster must be in [1, 16]");
  return device;
}

void forward_cuda_emulated(const kd::KDArgs& a, const py::dict& device_spec) {
  const kd::EmulatedDevice device = emulated_device(device_spec);
  const char* error = nullptr;
  {
    py::gil_scoped_release release;
    error = kd::kd_forward_cuda_emulated(a, device);
  }
  if (error != nullptr) throw std::runtime_error(std::string("kdkernels CUDA emulator: ") + error);
}

py::dict cuda_launch_plan(const kd::KDArgs& a, const py::dict& device_spec) {
  const kd::LaunchPlan plan = kd::kd_cuda_launch_plan(a, emulated_device(device_spec));
  py::dict info;
  info["warp_rows"] = plan.warp_rows;
  info["vectorized"] = plan.vectorized;
  info["cache_row"] = plan.cache_row;
  info["cluster"] = plan.cluster;
  info["smem_bytes"] = plan.smem_bytes;
  info["blocks"] = plan.blocks;
  info["threads"] = plan.threads;
  return info;
}
#endif

// (number of usable CUDA devices, why none) for kdkernels.backends().
py::tuple cuda_status() {
#ifdef KDKERNELS_WITH_CUDA
  const char* why = "";
  const int count = kd::cuda_device_count(&why);
  return py::make_tuple(count, std::string(why));
#else
  return py::make_tuple(0, std::string("not compiled"));
#endif
}

py::dict build_info() {
  py::dict info;
  info["compiler"] = KDKERNELS_COMPILER;
  info["cxx_flags"] = KDKERNELS_CXX_FLAGS;
  info["cpu_isas_built"] = KDKERNELS_CPU_ISAS;
  info["cpu_isa"] = kd::cpu_isa();
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
#ifdef KDKERNELS_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = KDKERNELS_CUDA_VERSION;
  info["cuda_architectures"] = KDKERNELS_CUDA_ARCHS;
#else
  info["cuda"] = false;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "kdkernels compiled kernels (takes raw pointers; use kdkernels.distillation_loss)";
  py::class_<kd::KDArgs>(m, "KDArgs", py::module_local());  // never clashes with another build
  m.def("make_args", &make_args, py::kw_only(), py::arg("student"), py::arg("student_row_stride"),
        py::arg("student_dtype"), py::arg("teachers"), py::arg("teacher_row_strides"),
        py::arg("teacher_dtype"), py::arg("teacher_weights"), py::arg("labels"),
        py::arg("ignore_index"), py::arg("unlabeled_index"), py::arg("num_rows"),
        py::arg("num_classes"), py::arg("temperature"), py::arg("soft_weight"),
        py::arg("hard_weight"), py::arg("scale_soft_by_t2"), py::arg("ensemble"),
        py::arg("soft_loss"), py::arg("reduction"), py::arg("row_loss"), py::arg("grad"),
        py::arg("num_threads"),
        "Build and check the kernel argument struct from raw pointers and options.");
  m.def("forward_cpu", &forward_cpu, py::arg("args"),
        "Run the fused CPU kernel: per-row losses and, if grad is set, the gradient.");
#ifdef KDKERNELS_WITH_EMULATOR
  m.def("forward_cuda_emulated", &forward_cuda_emulated, py::arg("args"), py::arg("device"),
        "Run the CUDA kernel's code on the host emulator, on CPU memory (for tests; slow).");
  m.def("cuda_launch_plan", &cuda_launch_plan, py::arg("args"), py::arg("device"),
        "The launch the CUDA kernel would make for these arguments (for tests).");
#endif
  m.def("cuda_max_cluster", &kd::max_cluster_size, py::arg("device_major"), py::arg("code_arch"),
        "Largest thread block cluster the CUDA launch uses on a device of this compute "
        "capability running kernels compiled for code_arch (e.g. 80, 90); for tests.");
  // The enum codes of kd_args.h by name: the Python side passes these, never positions in a tuple.
  using namespace pybind11::literals;
  m.attr("DTYPE_CODES") = py::dict("float32"_a = int(kd::DType::kFloat32), "float16"_a = int(kd::DType::kFloat16),
                                   "bfloat16"_a = int(kd::DType::kBFloat16), "float64"_a = int(kd::DType::kFloat64));
  m.attr("ENSEMBLE_CODES") =
      py::dict("geometric"_a = int(kd::Ensemble::kGeometric), "arithmetic"_a = int(kd::Ensemble::kArithmetic));
  m.attr("SOFT_LOSS_CODES") =
      py::dict("kl"_a = int(kd::SoftLoss::kKL), "cross_entropy"_a = int(kd::SoftLoss::kCrossEntropy));
  m.attr("REDUCTION_CODES") = py::dict("mean"_a = int(kd::Reduction::kMean), "sum"_a = int(kd::Reduction::kSum),
                                       "none"_a = int(kd::Reduction::kNone));
  m.attr("TEMPERATURE_RANGE") = py::make_tuple(kd::kMinTemperature, kd::kMaxTemperature);
  m.def("build_info", &build_info, "How this extension was built.");
  m.def("cuda_status", &cuda_status, "(usable CUDA devices, why none) as the CUDA runtime says.");
#ifdef KDKERNELS_WITH_CUDA
  m.def("forward_cuda", &forward_cuda, py::arg("args"), py::arg("stream"), py::arg("device"),
        py::arg("workspace"),
        "Launch the fused CUDA kernel on a stream (cudaStream_t as int); never synchronises.");
#endif
}
