// Scripted state of the emulated NCCL (emu_nccl.cpp).
#pragma once

#include <nccl.h>

namespace emu_nccl {

struct State {
  // Script: polls of ncclCommGetAsyncError that say ncclInProgress after init / a group end
  // (-1: forever), the state reported after them, what ncclRecv returns.
  int init_polls = 3;
  int group_polls = 1;
  ncclResult_t async_error = ncclSuccess;
  ncclResult_t recv_result = ncclSuccess;
  // Observations.
  int pending_polls = 0;
  int inits = 0, destroys = 0, aborts = 0, polls = 0, sends = 0, recvs = 0;
  int group_depth = 0;
  int last_blocking = -99;
};
State& state();
void reset();

}  // namespace emu_nccl
