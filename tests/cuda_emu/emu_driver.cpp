// The emulated CUDA driver (emu_driver.h): cuda_driver()'s table and kernel_images() for the host
// build of csrc/cuda, with the kernels of hardneg_loss_kernels.cu run by cuda_emu::launch.
#include "emu_driver.h"

#include <cuda.h>

#include <cstdint>
#include <cstring>
#include <mutex>
#include <stdexcept>

#include "cuda_driver.h"
#include "cuda_emu.h"
#include "hardneg/hardneg_loss.h"
#include "hardneg_loss_kernels.h"
#include "kernel_image.h"

// The host-compiled entry points (hardneg_loss_kernels.cu built with cuda_emu.h).
#define EMU_DECLARE(kernel, mode, mode_name, mask, mask_name, threads, width_name)  \
  extern "C" void hardneg_loss_##kernel##_##mode_name##_##mask_name##_##width_name( \
      hardneg::HardnegLossParams);
HARDNEG_KERNEL_INSTANCES(EMU_DECLARE)
#undef EMU_DECLARE

namespace emu {
namespace {

struct Entry {
  const char* name;
  void (*fn)(hardneg::HardnegLossParams);
};
#define EMU_ENTRY(kernel, mode, mode_name, mask, mask_name, threads, width_name) \
  Entry{"hardneg_loss_" #kernel "_" #mode_name "_" #mask_name "_" #width_name,   \
        &hardneg_loss_##kernel##_##mode_name##_##mask_name##_##width_name},
const Entry kEntries[] = {HARDNEG_KERNEL_INSTANCES(EMU_ENTRY)};
#undef EMU_ENTRY

Counters g_counters;
Knobs g_knobs;
std::mutex g_mutex;
struct Range {
  uintptr_t begin, end;
  int device;
};
std::vector<Range> g_memory;
int g_events_created = 0;

// Primary contexts are the addresses of these tokens; the device is the index.
char g_contexts[8];
thread_local std::vector<CUcontext> t_stack;
char g_module;  // every module is this token
char g_token;   // streams and events

int device_of_context(CUcontext ctx) {
  const char* p = reinterpret_cast<const char*>(ctx);
  return p >= g_contexts && p < g_contexts + 8 ? static_cast<int>(p - g_contexts) : -1;
}

CUresult init(unsigned) { return CUDA_SUCCESS; }
CUresult driver_get_version(int* v) {
  *v = 12020;
  return CUDA_SUCCESS;
}
CUresult error_name(CUresult err, const char** s) {
  switch (err) {
    case CUDA_SUCCESS:
      *s = "CUDA_SUCCESS";
      break;
    case CUDA_ERROR_INVALID_VALUE:
      *s = "CUDA_ERROR_INVALID_VALUE";
      break;
    case CUDA_ERROR_INVALID_IMAGE:
      *s = "CUDA_ERROR_INVALID_IMAGE";
      break;
    case CUDA_ERROR_NOT_READY:
      *s = "CUDA_ERROR_NOT_READY";
      break;
    default:
      *s = "CUDA_ERROR_EMULATED";
      break;
  }
  return CUDA_SUCCESS;
}
CUresult error_string(CUresult, const char** s) {
  *s = "emulated driver error";
  return CUDA_SUCCESS;
}
CUresult device_get(CUdevice* d, int ordinal) {
  if (ordinal < 0 || ordinal >= g_knobs.device_count) return CUDA_ERROR_INVALID_VALUE;
  *d = ordinal;
  return CUDA_SUCCESS;
}
CUresult device_get_attribute(int* v, CUdevice_attribute a, CUdevice) {
  *v = a == CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR ? g_knobs.compute_capability / 10
                                                         : g_knobs.compute_capability % 10;
  return CUDA_SUCCESS;
}
CUresult primary_ctx_retain(CUcontext* ctx, CUdevice d) {
  *ctx = reinterpret_cast<CUcontext>(&g_contexts[d]);
  return CUDA_SUCCESS;
}
CUresult ctx_get_current(CUcontext* ctx) {
  *ctx = t_stack.empty() ? nullptr : t_stack.back();
  return CUDA_SUCCESS;
}
CUresult ctx_push(CUcontext ctx) {
  t_stack.push_back(ctx);
  std::lock_guard<std::mutex> lock(g_mutex);
  ++g_counters.context_pushes;
  return CUDA_SUCCESS;
}
CUresult ctx_pop(CUcontext* ctx) {
  if (t_stack.empty()) return CUDA_ERROR_INVALID_CONTEXT;
  if (ctx) *ctx = t_stack.back();
  t_stack.pop_back();
  std::lock_guard<std::mutex> lock(g_mutex);
  ++g_counters.context_pops;
  return CUDA_SUCCESS;
}
CUresult pointer_get_attribute(void* data, CUpointer_attribute, CUdeviceptr ptr) {
  std::lock_guard<std::mutex> lock(g_mutex);
  for (const Range& r : g_memory) {
    if (ptr >= r.begin && ptr < r.end) {
      *static_cast<int*>(data) = r.device;
      return CUDA_SUCCESS;
    }
  }
  return CUDA_ERROR_INVALID_VALUE;
}
CUresult module_load_data(CUmodule* m, const void* image) {
  const bool cubin = std::strncmp(static_cast<const char*>(image), "cubin", 5) == 0;
  if (cubin && g_knobs.reject_cubins) return CUDA_ERROR_INVALID_IMAGE;
  *m = reinterpret_cast<CUmodule>(&g_module);
  std::lock_guard<std::mutex> lock(g_mutex);
  ++g_counters.module_loads;
  return CUDA_SUCCESS;
}
CUresult module_get_function(CUfunction* f, CUmodule, const char* name) {
  for (const Entry& e : kEntries) {
    if (std::strcmp(e.name, name) == 0) {
      *f = reinterpret_cast<CUfunction>(const_cast<Entry*>(&e));
      return CUDA_SUCCESS;
    }
  }
  return CUDA_ERROR_NOT_FOUND;
}
CUresult launch_kernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                       unsigned by, unsigned bz, unsigned shared, CUstream, void** args,
                       void** extra) {
  if (shared != 0 || extra != nullptr || args == nullptr) return CUDA_ERROR_INVALID_VALUE;
  const Entry* e = reinterpret_cast<const Entry*>(f);
  const hardneg::HardnegLossParams p = *static_cast<hardneg::HardnegLossParams*>(args[0]);
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    ++g_counters.launches[e->name];
    g_counters.last_kernel = e->name;
    g_counters.last_grid = gx;
    g_counters.last_block = bx;
    g_counters.last_launch_device = t_stack.empty() ? -1 : device_of_context(t_stack.back());
  }
  cuda_emu::launch(dim3(gx, gy, gz), dim3(bx, by, bz), [&] { e->fn(p); });
  return CUDA_SUCCESS;
}
CUresult stream_create(CUstream* s, unsigned) {
  *s = reinterpret_cast<CUstream>(&g_token);
  ++g_counters.live_streams;
  return CUDA_SUCCESS;
}
CUresult stream_destroy(CUstream) {
  --g_counters.live_streams;
  return CUDA_SUCCESS;
}
CUresult stream_synchronize(CUstream) { return CUDA_SUCCESS; }
CUresult stream_wait_event(CUstream, CUevent, unsigned) { return CUDA_SUCCESS; }
CUresult event_create(CUevent* e, unsigned) {
  if (g_knobs.fail_event_create_after >= 0 &&
      g_events_created++ >= g_knobs.fail_event_create_after) {
    return CUDA_ERROR_INVALID_VALUE;
  }
  *e = reinterpret_cast<CUevent>(&g_token);
  ++g_counters.live_events;
  return CUDA_SUCCESS;
}
CUresult event_destroy(CUevent) {
  --g_counters.live_events;
  return CUDA_SUCCESS;
}
CUresult event_record(CUevent, CUstream) { return CUDA_SUCCESS; }
CUresult event_query(CUevent) { return g_knobs.streams_busy ? CUDA_ERROR_NOT_READY : CUDA_SUCCESS; }

// Two fake images: an sm_80 "cubin" and a compute_80 "PTX" (module_load_data tells them apart).
const unsigned char kCubin[] = "cubin (emulated)";
const unsigned char kPtx[] = "ptx (emulated)";

}  // namespace

Counters& counters() { return g_counters; }
Knobs& knobs() { return g_knobs; }
void reset() {
  g_counters = Counters{};
  g_knobs = Knobs{};
  g_events_created = 0;
}
void register_device_memory(const void* ptr, size_t bytes, int device) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const auto begin = reinterpret_cast<uintptr_t>(ptr);
  g_memory.push_back(Range{begin, begin + bytes, device});
}
void clear_device_memory() {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_memory.clear();
}
int current_device() { return t_stack.empty() ? -1 : device_of_context(t_stack.back()); }
int context_depth() { return static_cast<int>(t_stack.size()); }

}  // namespace emu

namespace hardneg {

const CudaDriver& cuda_driver() {
  static const CudaDriver table = {emu::init,
                                   emu::driver_get_version,
                                   emu::error_name,
                                   emu::error_string,
                                   emu::device_get,
                                   emu::device_get_attribute,
                                   emu::primary_ctx_retain,
                                   emu::ctx_get_current,
                                   emu::ctx_push,
                                   emu::ctx_pop,
                                   emu::pointer_get_attribute,
                                   emu::module_load_data,
                                   emu::module_get_function,
                                   emu::launch_kernel,
                                   emu::stream_create,
                                   emu::stream_destroy,
                                   emu::stream_synchronize,
                                   emu::stream_wait_event,
                                   emu::event_create,
                                   emu::event_destroy,
                                   emu::event_record,
                                   emu::event_query};
  return table;
}

const std::vector<KernelImage>& kernel_images() {
  static const std::vector<KernelImage> images = {
      KernelImage{"sm_80 cubin", 80, false, emu::kCubin, sizeof emu::kCubin},
      KernelImage{"compute_80 PTX", 80, true, emu::kPtx, sizeof emu::kPtx},
  };
  return images;
}

}  // namespace hardneg
