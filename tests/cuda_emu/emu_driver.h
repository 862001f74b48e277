// The emulated CUDA driver behind csrc/cuda/cuda_driver.h's table in the host tests: contexts,
// streams and events as counted tokens, modules that map entry-point names to the host-compiled
// kernels, launches run by cuda_emu::launch. Knobs and counters let tests drive the error paths.
#pragma once

#include <map>
#include <string>
#include <vector>

namespace emu {

struct Counters {
  int live_streams = 0;
  int live_events = 0;
  int module_loads = 0;
  int context_pushes = 0;
  int context_pops = 0;
  std::map<std::string, int> launches;  // per entry-point name
  std::string last_kernel;
  unsigned last_grid = 0, last_block = 0;
  int last_launch_device = -1;  // the device whose context was current at the last launch
};
Counters& counters();

// Knobs (reset() restores them).
struct Knobs {
  int device_count = 2;
  int compute_capability = 86;       // the sm_80 cubin serves it (same major)
  bool reject_cubins = false;        // cuModuleLoadData refuses cubins (CUDA_ERROR_INVALID_IMAGE)
  int fail_event_create_after = -1;  // the n-th cuEventCreate fails (0 = the first)
  bool streams_busy = false;         // cuEventQuery says CUDA_ERROR_NOT_READY
};
Knobs& knobs();
void reset();

// Device memory: pointers inside a registered range belong to that device; others are unknown.
void register_device_memory(const void* ptr, size_t bytes, int device);
void clear_device_memory();

// The device of the current context (-1 when none) and the depth of this thread's context stack.
int current_device();
int context_depth();

}  // namespace emu
