// hardneg's NCCL communicator for the ring (design section 3): point-to-point exchanges of the
// ring's blocks on a dedicated comm stream, ordered against the caller's compute stream by CUDA
// events, so a transfer runs while the compute stream does the similarity GEMM. Nothing here
// blocks the host or touches the default stream.
//
// NCCL itself is resolved at run time: libnccl.so.2 is opened by its soname, so the copy torch
// already loaded (from the nvidia-nccl wheel or the system) is the one used; hardneg never links
// or vendors NCCL, and `import hardneg` works on machines without it. nccl.h is needed only to
// compile (types and signatures).
#pragma once

#include <cuda_runtime.h>
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
  decltype(&ncclCommInitRank) comm_init_rank;
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

// One ncclComm_t with its comm stream and events. Lifetime: created collectively by every rank
// of the group (ncclCommInitRank blocks until all have joined), used from one host thread, and
// destroyed when the Python object is freed (ncclCommDestroy after the comm stream drained; abort
// instead when NCCL reported an asynchronous error, so a broken peer cannot hang the exit).
class NcclComm {
 public:
  // Exchanges that may be in flight at once before a handle's event is recycled.
  static constexpr int kSlots = 4;

  NcclComm(const std::string& unique_id, int nranks, int rank, int device);
  ~NcclComm();
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;

  // Sends `sends` to rank dst and receives `recvs` from rank src in one NCCL group on the comm
  // stream, after the work already queued on compute_stream. Returns the slot whose event marks
  // the end of the transfer; wait(slot, stream) orders later work on `stream` after it.
  int exchange(const std::vector<NcclBuffer>& sends, int dst, const std::vector<NcclBuffer>& recvs,
               int src, uintptr_t compute_stream);
  void wait(int slot, uintptr_t compute_stream);

  int rank() const { return rank_; }
  int size() const { return nranks_; }
  int device() const { return device_; }

 private:
  ncclComm_t comm_ = nullptr;
  int nranks_;
  int rank_;
  int device_;
  cudaStream_t comm_stream_ = nullptr;
  cudaEvent_t block_ready_ = nullptr;  // compute stream -> comm stream: buffers are written
  std::array<cudaEvent_t, kSlots> transfer_done_{};  // comm stream -> compute stream
  int next_slot_ = 0;
};

}  // namespace hardneg
