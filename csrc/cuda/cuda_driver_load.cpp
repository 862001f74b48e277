// Loads the CUDA driver API table of cuda_driver.h from libcuda.so.1 (by soname: the machine's
// driver, the copy torch already uses). Nothing here is linked against CUDA.
#include <dlfcn.h>

#include "cuda_driver.h"

namespace hardneg {
namespace {

#define HARDNEG_STR_(x) #x
#define HARDNEG_STR(x) HARDNEG_STR_(x)  // expands cuda.h's versioning macros first

template <class Fn>
void resolve(void* lib, const char* name, Fn& fn) {
  void* sym = dlsym(lib, name);
  if (sym == nullptr) {
    throw std::runtime_error(std::string("hardneg CUDA error: libcuda.so.1 has no symbol ") + name +
                             " (NVIDIA driver too old?)");
  }
  fn = reinterpret_cast<Fn>(sym);
}

CudaDriver load_driver() {
  void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    const char* err = dlerror();
    throw std::runtime_error(
        std::string("hardneg CUDA error: cannot load the NVIDIA driver library libcuda.so.1 (is an "
                    "NVIDIA driver installed?): ") +
        (err ? err : "unknown error"));
  }
  CudaDriver cu{};
#define HARDNEG_RESOLVE(field, fn) resolve(lib, HARDNEG_STR(fn), cu.field)
  HARDNEG_RESOLVE(init, cuInit);
  HARDNEG_RESOLVE(driver_get_version, cuDriverGetVersion);
  HARDNEG_RESOLVE(get_error_name, cuGetErrorName);
  HARDNEG_RESOLVE(get_error_string, cuGetErrorString);
  HARDNEG_RESOLVE(device_get, cuDeviceGet);
  HARDNEG_RESOLVE(device_get_attribute, cuDeviceGetAttribute);
  HARDNEG_RESOLVE(primary_ctx_retain, cuDevicePrimaryCtxRetain);
  HARDNEG_RESOLVE(ctx_get_current, cuCtxGetCurrent);
  HARDNEG_RESOLVE(ctx_push_current, cuCtxPushCurrent);
  HARDNEG_RESOLVE(ctx_pop_current, cuCtxPopCurrent);
  HARDNEG_RESOLVE(pointer_get_attribute, cuPointerGetAttribute);
  HARDNEG_RESOLVE(module_load_data, cuModuleLoadData);
  HARDNEG_RESOLVE(module_get_function, cuModuleGetFunction);
  HARDNEG_RESOLVE(launch_kernel, cuLaunchKernel);
  HARDNEG_RESOLVE(stream_create, cuStreamCreate);
  HARDNEG_RESOLVE(stream_destroy, cuStreamDestroy);
  HARDNEG_RESOLVE(stream_synchronize, cuStreamSynchronize);
  HARDNEG_RESOLVE(stream_wait_event, cuStreamWaitEvent);
  HARDNEG_RESOLVE(event_create, cuEventCreate);
  HARDNEG_RESOLVE(event_destroy, cuEventDestroy);
  HARDNEG_RESOLVE(event_record, cuEventRecord);
  HARDNEG_RESOLVE(event_query, cuEventQuery);
#undef HARDNEG_RESOLVE
  const CUresult err = cu.init(0);
  if (err != CUDA_SUCCESS) {
    const char* name = nullptr;
    cu.get_error_name(err, &name);
    throw std::runtime_error(
        std::string("hardneg CUDA error: the NVIDIA driver failed to initialise (cuInit: ") +
        (name ? name : "unknown error") + ")");
  }
  return cu;  // the library stays loaded for the life of the process
}

}  // namespace

const CudaDriver& cuda_driver() {
  static const CudaDriver table = load_driver();  // thread-safe one-time init
  return table;
}

}  // namespace hardneg
