// Driver-API helpers over the table of cuda_driver.h: error reporting, primary contexts, the device
// of a pointer. The table itself is loaded in cuda_driver_load.cpp (dlopen of libcuda.so.1); the
// host emulation in tests/cuda_emu links these helpers against its own table.
#include "cuda_driver.h"

#include <array>
#include <mutex>

namespace hardneg {

[[noreturn]] void cuda_fail(CUresult err, const char* what, const char* file, int line) {
  const char* name = nullptr;
  const char* text = nullptr;
  cuda_driver().get_error_name(err, &name);
  cuda_driver().get_error_string(err, &text);
  throw std::runtime_error(std::string("hardneg CUDA error: ") + what + " failed with " +
                           (name ? name : "unknown error") + " (" + (text ? text : "no message") +
                           ", code " + std::to_string(static_cast<int>(err)) + ") at " + file +
                           ":" + std::to_string(line));
}

int cuda_driver_version() {
  int version = 0;
  HARDNEG_CU_CHECK(cuda_driver().driver_get_version(&version));
  return version;
}

CUcontext primary_context(int device) {
  constexpr int kMaxDevices = 64;
  static std::array<CUcontext, kMaxDevices> contexts{};
  static std::mutex mutex;
  if (device < 0 || device >= kMaxDevices) {
    throw std::invalid_argument("device must be in [0, " + std::to_string(kMaxDevices) + "), got " +
                                std::to_string(device));
  }
  const std::lock_guard<std::mutex> lock(mutex);
  if (contexts[device] == nullptr) {
    const CudaDriver& cu = cuda_driver();
    CUdevice handle = 0;
    HARDNEG_CU_CHECK(cu.device_get(&handle, device));
    HARDNEG_CU_CHECK(cu.primary_ctx_retain(&contexts[device], handle));
  }
  return contexts[device];
}

int device_of_pointer(const void* ptr) {
  int ordinal = -1;
  const CUresult err = cuda_driver().pointer_get_attribute(
      &ordinal, CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, reinterpret_cast<CUdeviceptr>(ptr));
  if (err != CUDA_SUCCESS || ordinal < 0) {
    throw std::invalid_argument(
        "hardneg CUDA kernels need device memory, and the driver does not know the pointer " +
        std::to_string(reinterpret_cast<uintptr_t>(ptr)) + " (error code " +
        std::to_string(static_cast<int>(err)) + ")");
  }
  return ordinal;
}

}  // namespace hardneg
