// An emulated NCCL behind csrc/cuda/nccl_comm.h's table, for the host test of the communicator's
// logic (test_nccl_comm.cpp): a non-blocking comm whose state the test scripts, group depth and
// call counters. No transfer happens.
#include "emu_nccl.h"

#include "nccl_comm.h"

namespace emu_nccl {
namespace {

State g_state;
char g_comm;  // every comm is this token

ncclResult_t get_version(int* v) {
  *v = 23203;
  return ncclSuccess;
}
ncclResult_t get_unique_id(ncclUniqueId* id) {
  for (auto& c : id->internal) c = 1;
  return ncclSuccess;
}
ncclResult_t init(ncclComm_t* comm, int, ncclUniqueId, int, ncclConfig_t* config) {
  ++g_state.inits;
  g_state.last_blocking = config->blocking;
  *comm = reinterpret_cast<ncclComm_t>(&g_comm);
  g_state.pending_polls = g_state.init_polls;
  return ncclInProgress;
}
ncclResult_t destroy(ncclComm_t) {
  ++g_state.destroys;
  return ncclSuccess;
}
ncclResult_t abort_comm(ncclComm_t) {
  ++g_state.aborts;
  return ncclSuccess;
}
ncclResult_t async_error(ncclComm_t, ncclResult_t* state) {
  ++g_state.polls;
  if (g_state.pending_polls < 0) {
    *state = ncclInProgress;  // never completes
  } else if (g_state.pending_polls > 0) {
    --g_state.pending_polls;
    *state = ncclInProgress;
  } else {
    *state = g_state.async_error;
  }
  return ncclSuccess;
}
ncclResult_t group_start() {
  ++g_state.group_depth;
  return ncclSuccess;
}
ncclResult_t group_end() {
  --g_state.group_depth;
  g_state.pending_polls = g_state.group_polls;
  return g_state.group_polls != 0 ? ncclInProgress : ncclSuccess;
}
ncclResult_t send(const void*, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t) {
  ++g_state.sends;
  return ncclSuccess;
}
ncclResult_t recv(void*, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t) {
  ++g_state.recvs;
  return g_state.recv_result;
}
const char* error_string(ncclResult_t r) {
  switch (r) {
    case ncclSuccess:
      return "no error";
    case ncclSystemError:
      return "unhandled system error";
    case ncclRemoteError:
      return "remote process exited or there was a network error";
    case ncclInProgress:
      return "NCCL operation in progress";
    default:
      return "emulated NCCL error";
  }
}

}  // namespace

State& state() { return g_state; }
void reset() { g_state = State{}; }

}  // namespace emu_nccl

namespace hardneg {

const NcclApi& nccl_api() {
  static const NcclApi api = {emu_nccl::get_version, emu_nccl::get_unique_id, emu_nccl::init,
                              emu_nccl::destroy,     emu_nccl::abort_comm,    emu_nccl::async_error,
                              emu_nccl::group_start, emu_nccl::group_end,     emu_nccl::send,
                              emu_nccl::recv,        emu_nccl::error_string};
  return api;
}

}  // namespace hardneg
