// Loads the NCCL entry points of nccl_comm.h from libnccl.so.2 by its soname: if torch (or
// anything) already loaded libnccl.so.2, the dynamic loader hands back that copy instead of opening
// a second one. Nothing is linked against NCCL.
#include <dlfcn.h>

#include <stdexcept>
#include <string>

#include "nccl_comm.h"

namespace hardneg {
namespace {

template <class Fn>
void resolve(void* lib, const char* name, Fn& fn) {
  void* sym = dlsym(lib, name);
  if (sym == nullptr) {
    throw std::runtime_error(std::string("hardneg: libnccl.so.2 has no symbol ") + name +
                             " (NCCL older than 2.14?)");
  }
  fn = reinterpret_cast<Fn>(sym);
}

NcclApi load_nccl() {
  void* lib = dlopen("libnccl.so.2", RTLD_NOW | RTLD_GLOBAL);
  if (lib == nullptr) {
    const char* err = dlerror();
    throw std::runtime_error(
        std::string("hardneg: cannot load libnccl.so.2 (install nvidia-nccl-cu12/-cu13 or put "
                    "NCCL on LD_LIBRARY_PATH): ") +
        (err ? err : "unknown error"));
  }
  NcclApi api{};
  resolve(lib, "ncclGetVersion", api.get_version);
  resolve(lib, "ncclGetUniqueId", api.get_unique_id);
  resolve(lib, "ncclCommInitRankConfig", api.comm_init_rank_config);  // NCCL 2.14+
  resolve(lib, "ncclCommDestroy", api.comm_destroy);
  resolve(lib, "ncclCommAbort", api.comm_abort);
  resolve(lib, "ncclCommGetAsyncError", api.comm_get_async_error);
  resolve(lib, "ncclGroupStart", api.group_start);
  resolve(lib, "ncclGroupEnd", api.group_end);
  resolve(lib, "ncclSend", api.send);
  resolve(lib, "ncclRecv", api.recv);
  resolve(lib, "ncclGetErrorString", api.get_error_string);
  return api;  // the library stays loaded for the life of the process
}

}  // namespace

const NcclApi& nccl_api() {
  static const NcclApi api = load_nccl();  // thread-safe one-time init
  return api;
}

}  // namespace hardneg
