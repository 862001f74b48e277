// hardneg's NCCL communicator for the ring (design section 3): point-to-point exchanges of the
// ring's blocks on a dedicated comm stream, ordered against the caller's compute stream by CUDA
// events, so a transfer runs while the compute stream does the similarity GEMM. Nothing here
// blocks the host on the GPU or touches the default stream.
//
// NCCL itself is resolved at run time: libnccl.so.2 is opened by its soname, so the copy torch
// already loaded (from the nvidia-nccl wheel or the system) is the one used; hardneg never links
// or vendors NCCL, and `import hardneg` works on machines without it. nccl.h is needed only to
// compile (types and signatures). CUDA streams and events go through the driver API table
// (cuda_driver.h), like the rest of the CUDA module.
#pragma once

#include <cuda.h>
#include <nccl.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace hardneg {

// The NCCL entry points hardneg uses, resolved once from libnccl.so.2 (throws when missing).
struct NcclApi {
  decltype(&ncclGetVersion) get_version;
  decltype(&ncclGetUniqueId) get_unique_id;
  decltype(&ncclCommInitRankConfig) comm_init_rank_config;
  decltype(&ncclCommDestroy) comm_destroy;
  decltype(&ncclCommAbort) comm_abort;
  decltype(&ncclCommGetAsyncError) comm_get_async_error;
  decltype(&ncclGroupStart) group_start;
  decltype(&ncclGroupEnd) group_end;
  decltype(&ncclSend) send;
  decltype(&ncclRecv) recv;
  decltype(&ncclGetErrorString) get_error_string;
};
const NcclApi& nccl_api();

// GPU-free bootstrap: the loaded library's version code (e.g. 22703 for 2.27.3) and a fresh
// ncclUniqueId as NCCL_UNIQUE_ID_BYTES raw bytes (rank 0 makes it; the others receive it).
int nccl_version();
std::string nccl_unique_id();

// A contiguous device buffer: address and size in bytes.
struct NcclBuffer {
  uintptr_t ptr;
  size_t bytes;
};

// One non-blocking ncclComm_t with its comm stream and events.
//
// Lifetime: created collectively by every rank of the group (init waits for all of them, at most
// timeout_s, then aborts with a clear error), used from one host thread, and ended by destroy()
// (waits, at most timeout_s, for the comm stream, then ncclCommDestroy) or abort() (ncclCommAbort,
// no waiting: for a peer that is gone). Every NCCL call is followed by polling
// ncclCommGetAsyncError until the operation is enqueued, a failure, or the deadline, so a dead peer
// surfaces as an error naming the call instead of a silent hang; after any such failure the comm
// is aborted. The destructor of a comm never ended explicitly aborts it when NCCL reported an
// error and destroys it otherwise, without synchronising (it may run at interpreter exit, when the
// peers are gone), and restores the caller's current device.
class NcclComm {
 public:
  // Exchanges that may be in flight at once before a handle's event is recycled.
  static constexpr int kSlots = 4;

  NcclComm(const std::string& unique_id, int nranks, int rank, int device, double timeout_s);
  ~NcclComm();
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;

  // Sends `sends` to rank dst and receives `recvs` from rank src in one NCCL group on the comm
  // stream, after the work already queued on compute_stream. Returns the slot whose event marks
  // the end of the transfer; wait(slot, stream) orders later work on `stream` after it.
  int exchange(const std::vector<NcclBuffer>& sends, int dst, const std::vector<NcclBuffer>& recvs,
               int src, uintptr_t compute_stream);
  void wait(int slot, uintptr_t compute_stream);

  void destroy();
  void abort();

  int rank() const { return rank_; }
  int size() const { return nranks_; }
  int device() const { return device_; }
  double timeout() const { return timeout_s_; }
  bool alive() const { return comm_ != nullptr; }

 private:
  void check_alive(const char* what) const;
  // Polls ncclCommGetAsyncError while it says ncclInProgress, up to the deadline; on an error or
  // the deadline, aborts the comm and throws naming `what`.
  void await(ncclResult_t started, const char* what);
  void release_cuda();  // events and stream; best effort, never throws

  ncclComm_t comm_ = nullptr;
  int nranks_;
  int rank_;
  int device_;
  double timeout_s_;
  CUstream comm_stream_ = nullptr;
  CUevent block_ready_ = nullptr;                // compute stream -> comm stream: buffers written
  std::array<CUevent, kSlots> transfer_done_{};  // comm stream -> compute stream
  int next_slot_ = 0;
};

}  // namespace hardneg
