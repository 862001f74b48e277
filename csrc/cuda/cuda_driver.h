// The CUDA driver API as hardneg uses it: a table of entry points resolved at run time from
// libcuda.so.1 (dlopen by soname), the check-macro family for driver calls, and a guard that makes
// a device's primary context current (the context torch uses, so torch's streams and memory are
// valid in it).
//
// Why the driver API and no CUDA runtime: a runtime linked into the module (static or dynamic)
// carries its toolkit's minimum driver (CUDA 13: r580+), while torch's CUDA 12 wheels run on r525+
// drivers. The driver API has no such floor: libcuda.so.1 is the machine's driver itself, and every
// entry point below exists since CUDA 11. The kernels come from an embedded image loaded with
// cuModuleLoadData (kernel_image.h), so the module needs no libcudart and no newer driver than the
// kernel image does. Types and signatures come from cuda.h at build time (the toolkit's; the host
// emulation in tests/cuda_emu supplies its own); nothing is linked.
#pragma once

#include <cuda.h>

#include <stdexcept>
#include <string>

namespace hardneg {

// Entry points, named as in cuda.h. cuda.h maps some names to versioned symbols (cuCtxPushCurrent
// is cuCtxPushCurrent_v2): the loader resolves the name each macro expands to, so the signature
// and the symbol always agree.
struct CudaDriver {
  decltype(&::cuInit) init;
  decltype(&::cuDriverGetVersion) driver_get_version;
  decltype(&::cuGetErrorName) get_error_name;
  decltype(&::cuGetErrorString) get_error_string;
  decltype(&::cuDeviceGet) device_get;
  decltype(&::cuDeviceGetAttribute) device_get_attribute;
  decltype(&::cuDevicePrimaryCtxRetain) primary_ctx_retain;
  decltype(&::cuCtxGetCurrent) ctx_get_current;
  decltype(&::cuCtxPushCurrent) ctx_push_current;
  decltype(&::cuCtxPopCurrent) ctx_pop_current;
  decltype(&::cuPointerGetAttribute) pointer_get_attribute;
  decltype(&::cuModuleLoadData) module_load_data;
  decltype(&::cuModuleGetFunction) module_get_function;
  decltype(&::cuLaunchKernel) launch_kernel;
  decltype(&::cuStreamCreate) stream_create;
  decltype(&::cuStreamDestroy) stream_destroy;
  decltype(&::cuStreamSynchronize) stream_synchronize;
  decltype(&::cuStreamWaitEvent) stream_wait_event;
  decltype(&::cuEventCreate) event_create;
  decltype(&::cuEventDestroy) event_destroy;
  decltype(&::cuEventRecord) event_record;
  decltype(&::cuEventQuery) event_query;
};

// The driver's table, loaded and cuInit-ed on first use (thread-safe). Throws a clear error when
// libcuda.so.1 is missing or the driver cannot initialise (no GPU).
const CudaDriver& cuda_driver();

// CUDA version the loaded driver supports (e.g. 12020 for 12.2).
int cuda_driver_version();

[[noreturn]] void cuda_fail(CUresult err, const char* what, const char* file, int line);

// The primary context of `device`, retained once for the life of the process (torch holds it too).
CUcontext primary_context(int device);

// The device that holds device memory `ptr` (a clear error for host memory).
int device_of_pointer(const void* ptr);

}  // namespace hardneg

// Wraps a driver call returning CUresult: a failure throws std::runtime_error naming the call, the
// error and the source line (pybind11 turns it into RuntimeError). Kernels never check.
#define HARDNEG_CU_CHECK(call)                                       \
  do {                                                               \
    const CUresult hardneg_err_ = (call);                            \
    if (hardneg_err_ != CUDA_SUCCESS) {                              \
      ::hardneg::cuda_fail(hardneg_err_, #call, __FILE__, __LINE__); \
    }                                                                \
  } while (0)

namespace hardneg {

// Makes the primary context of `device` current for the scope and restores the caller's context
// after (the CUDA runtime's current device follows the current context, so torch's and NCCL's
// cudaGetDevice see `device` inside the scope, and the caller's device again after it).
class ContextGuard {
 public:
  explicit ContextGuard(int device) {
    const CudaDriver& cu = cuda_driver();
    const CUcontext wanted = primary_context(device);
    CUcontext current = nullptr;
    HARDNEG_CU_CHECK(cu.ctx_get_current(&current));
    if (current != wanted) {
      HARDNEG_CU_CHECK(cu.ctx_push_current(wanted));
      pushed_ = true;
    }
  }
  ~ContextGuard() {
    if (pushed_) {
      CUcontext popped = nullptr;
      cuda_driver().ctx_pop_current(&popped);  // best effort: a destructor must not throw
    }
  }
  ContextGuard(const ContextGuard&) = delete;
  ContextGuard& operator=(const ContextGuard&) = delete;

 private:
  bool pushed_ = false;
};

}  // namespace hardneg
