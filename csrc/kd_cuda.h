// The CUDA kernel's host entry points (compiled only where nvcc is found).
#pragma once

#include <cstdint>

#include "kd_args.h"

namespace kd {

// Launches the fused kernel on `stream` (a cudaStream_t) on `device`; `workspace` is 16 bytes of
// device memory for the valid-row counts. Never synchronises. Returns nullptr or the CUDA error.
const char* kd_forward_cuda(const KDArgs& a, void* stream, int device, void* workspace);

// Number of usable CUDA devices; when 0, *why says why (no device, no driver, ...).
int cuda_device_count(const char** why);

}  // namespace kd
