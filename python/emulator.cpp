// pybind11 module kdkernels._emulator: the CUDA kernel's source run on the host emulator
// (csrc/kd_cuda_emulator.h) on CPU memory, and the host-side launch decisions, for the tests on
// machines without a GPU. A test build only (CMake option KDKERNELS_EMULATOR); the product
// module _C carries none of it.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "args.h"
#include "kd_args.h"
#include "kd_cuda_emulated.h"
#include "kd_cuda_plan.h"

namespace py = pybind11;

namespace {

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

}  // namespace

PYBIND11_MODULE(_emulator, m) {
  m.doc() = "kdkernels test module: the CUDA kernel on a host emulator (slow; CPU memory)";
  kd_python::bind_args(m);
  m.def("forward", &forward_cuda_emulated, py::arg("args"), py::arg("device"),
        "Run the CUDA kernel's code on the host emulator, on CPU memory.");
  m.def("launch_plan", &cuda_launch_plan, py::arg("args"), py::arg("device"),
        "The launch the CUDA kernel would make for these arguments on such a device.");
  m.def("max_cluster", &kd::max_cluster_size, py::arg("device_major"), py::arg("code_arch"),
        "Largest thread block cluster the CUDA launch uses on a device of this compute "
        "capability running kernels compiled for code_arch (e.g. 80, 90).");
}
