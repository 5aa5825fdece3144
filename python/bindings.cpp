// pybind11 layer of kdkernels._C: turns Python ints (data pointers, strides) and floats into a
// kd::KDArgs, checks it again at the boundary, releases the GIL and runs the kernel. Tensor
// handling and user-facing validation live in Python (kdkernels/_validate.py); this layer only
// refuses what would make the kernel read or write out of bounds.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <optional>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <stdexcept>
#include <string>

#include "args.h"
#include "kd_args.h"
#include "kd_cpu.h"
#ifdef KDKERNELS_WITH_CUDA
#include "kd_cuda.h"
#endif

namespace py = pybind11;

namespace {

// A fresh gradient buffer (the first call of a size: kdkernels/_gradient_buffers.py reuses large
// ones after that) is faulted in 4 KiB pages at a cost like the kernel's own at LLM sizes. Asking
// for transparent huge pages on its 2 MiB aligned interior (a hint: refused or unsupported is
// harmless) about halves it (N=2048 C=32000 bfloat16, a fresh buffer every call: 40-48 ms a
// call against 71-91), though a process's first such call pays for compacting memory.
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

// The kernel on arguments check_args accepted.
void run_checked(const kd::KDArgs& a) {
  // Other Python threads run while the kernel does, unless it is too short for releasing and
  // taking back the GIL to pay (N=1 C=10 takes about 0.1 us).
  constexpr uint64_t kReleaseFrom = uint64_t(1) << 14;  // elements read
  const uint64_t elements = static_cast<uint64_t>(a.num_rows) *
                            static_cast<uint64_t>(a.num_classes) *
                            static_cast<uint64_t>(a.num_teachers + 1);
  std::optional<py::gil_scoped_release> release;
  if (elements >= kReleaseFrom) release.emplace();
  if (a.grad != nullptr) {
    advise_huge_pages(a.grad, static_cast<uint64_t>(a.num_rows) * static_cast<uint64_t>(a.num_classes) *
                                  dtype_size(a.student_dtype));
  }
  kd::kd_forward_cpu(a);
}

// A KDArgs from Python is checked again: a kernel_options object is one too, without a call's
// pointers (the kernel would skip it as a call of no rows, but it trusts no struct unchecked).
void forward_cpu(const kd::KDArgs& a) {
  if (const char* problem = kd::check_args(a)) throw std::invalid_argument(problem);
  run_checked(a);
}

// forward_cpu(with_call(options, ...)): what the eager path of a small batch calls, with its
// options converted once (kernel_options) and no KDArgs Python object per call.
template <typename... Args>
auto forward_cpu_with(kd::KDArgs (*with_call)(const kd::KDArgs&, Args...)) {
  return [with_call](const kd::KDArgs& options, Args... args) { run_checked(with_call(options, args...)); };
}

#ifdef KDKERNELS_WITH_CUDA
void forward_cuda(const kd::KDArgs& a, uintptr_t stream, int device, uintptr_t workspace) {
  if (const char* problem = kd::check_args(a)) throw std::invalid_argument(problem);
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

// Whether each of the n int64 labels at `data` is a class in [0, num_classes): the common case
// of the CPU label check, in one call instead of torch's aminmax and two .item() (about 2 us of
// a small batch's step). The caller passes a contiguous int64 CPU tensor's pointer and size.
bool labels_in_range(uintptr_t data, int64_t n, int64_t num_classes) {
  if (n < 0) throw std::invalid_argument("labels_in_range: n must be >= 0");
  if (num_classes < 0) throw std::invalid_argument("labels_in_range: num_classes must be >= 0");
  if (n > 0 && data == 0) throw std::invalid_argument("labels_in_range: null labels pointer");
  const int64_t* labels = reinterpret_cast<const int64_t*>(data);
  // As unsigned, a negative label is above every class: one comparison per label, no branch.
  const uint64_t limit = static_cast<uint64_t>(num_classes);
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok &= static_cast<uint64_t>(labels[i]) < limit;
  return ok;
}

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
  kd_python::bind_args(m);
  m.def("forward_cpu", &forward_cpu, py::arg("args"),
        "Run the fused CPU kernel: per-row losses and, if grad is set, the gradient.");
  m.def("run_cpu", forward_cpu_with(&kd_python::with_call),
        "Run the fused CPU kernel on kernel_options(...) with one call's pointers, strides and "
        "sizes (make_args' first 14 arguments, positionally).");
  // The enum codes of kd_args.h by name: the Python side passes these, never positions in a tuple.
  using namespace pybind11::literals;
  m.attr("DTYPE_CODES") = py::dict("float32"_a = int(kd::DType::kFloat32), "float16"_a = int(kd::DType::kFloat16),
                                   "bfloat16"_a = int(kd::DType::kBFloat16), "float64"_a = int(kd::DType::kFloat64));
  m.attr("ENSEMBLE_CODES") =
      py::dict("geometric"_a = int(kd::Ensemble::kGeometric), "arithmetic"_a = int(kd::Ensemble::kArithmetic));
  py::dict soft_losses;
  for (int32_t code = 0; code < kd::kNumSoftLosses; ++code) soft_losses[kd::kSoftLossNames[code]] = code;
  m.attr("SOFT_LOSS_CODES") = soft_losses;
  m.attr("REDUCTION_CODES") = py::dict("mean"_a = int(kd::Reduction::kMean), "sum"_a = int(kd::Reduction::kSum),
                                       "none"_a = int(kd::Reduction::kNone));
  m.attr("TEMPERATURE_RANGE") = py::make_tuple(kd::kMinTemperature, kd::kMaxTemperature);
  m.def("build_info", &build_info, "How this extension was built.");
  m.def("labels_in_range", &labels_in_range, py::arg("data"), py::arg("n"), py::arg("num_classes"),
        "Whether n contiguous int64 labels at a CPU address are all in [0, num_classes).");
  m.def("cuda_status", &cuda_status, "(usable CUDA devices, why none) as the CUDA runtime says.");
#ifdef KDKERNELS_WITH_CUDA
  m.def("forward_cuda", &forward_cuda, py::arg("args"), py::arg("stream"), py::arg("device"),
        py::arg("workspace"),
        "Launch the fused CUDA kernel on a stream (cudaStream_t as int); never synchronises.");
#endif
}
