// The one check-macro family for CUDA runtime calls in hardneg (TransformerEngine's
// common/util/logging.h style): a failed call throws std::runtime_error naming the call, the CUDA
// error and the source line; pybind11 turns it into a Python RuntimeError. Kernels never check.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace hardneg {

[[noreturn]] inline void cuda_fail(cudaError_t err, const char* what, const char* file, int line) {
  throw std::runtime_error(std::string("hardneg CUDA error: ") + what + " failed with " +
                           cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ") at " + file +
                           ":" + std::to_string(line));
}

}  // namespace hardneg

// Wraps a CUDA runtime call returning cudaError_t.
#define HARDNEG_CUDA_CHECK(call)                                     \
  do {                                                               \
    const cudaError_t hardneg_err_ = (call);                         \
    if (hardneg_err_ != cudaSuccess) {                               \
      ::hardneg::cuda_fail(hardneg_err_, #call, __FILE__, __LINE__); \
    }                                                                \
  } while (0)

// After a <<<...>>> launch: configuration errors surface here, without synchronising the device.
#define HARDNEG_CUDA_CHECK_LAUNCH(kernel_name)                                          \
  do {                                                                                  \
    const cudaError_t hardneg_err_ = cudaGetLastError();                                \
    if (hardneg_err_ != cudaSuccess) {                                                  \
      ::hardneg::cuda_fail(hardneg_err_, "launch of " kernel_name, __FILE__, __LINE__); \
    }                                                                                   \
  } while (0)
