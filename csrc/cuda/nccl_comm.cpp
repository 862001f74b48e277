// hardneg's NCCL communicator: dlopen of libnccl.so.2, the RAII comm (ncclComm_t + comm stream +
// events) and the grouped send/recv of the ring. Host code only; every CUDA call goes through
// HARDNEG_CUDA_CHECK and every NCCL call through HARDNEG_NCCL_CHECK (one check-macro family).
#include "nccl_comm.h"

#include <dlfcn.h>

#include <cstring>
#include <stdexcept>
#include <string>

#include "cuda_check.h"

namespace hardneg {

[[noreturn]] inline void nccl_fail(ncclResult_t err, const char* what, const char* file, int line) {
  throw std::runtime_error(std::string("hardneg NCCL error: ") + what + " failed with " +
                           nccl_api().get_error_string(err) + " (" + std::to_string(err) + ") at " +
                           file + ":" + std::to_string(line));
}

}  // namespace hardneg

// Wraps an NCCL call returning ncclResult_t (the NCCL member of HARDNEG_CUDA_CHECK's family).
#define HARDNEG_NCCL_CHECK(call)                                     \
  do {                                                               \
    const ncclResult_t hardneg_err_ = (call);                        \
    if (hardneg_err_ != ncclSuccess) {                               \
      ::hardneg::nccl_fail(hardneg_err_, #call, __FILE__, __LINE__); \
    }                                                                \
  } while (0)

namespace hardneg {
namespace {

template <class Fn>
void resolve(void* lib, const char* name, Fn& fn) {
  void* sym = dlsym(lib, name);
  if (sym == nullptr) {
    throw std::runtime_error(std::string("hardneg: libnccl.so.2 has no symbol ") + name +
                             " (NCCL too old?)");
  }
  fn = reinterpret_cast<Fn>(sym);
}

NcclApi load_nccl() {
  // By soname: if torch (or anything) already loaded libnccl.so.2, the dynamic loader hands back
  // that copy instead of opening a second one.
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
  resolve(lib, "ncclCommInitRank", api.comm_init_rank);
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

// Makes `device` current for the scope and restores the caller's device after.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    HARDNEG_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) HARDNEG_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace

const NcclApi& nccl_api() {
  static const NcclApi api = load_nccl();  // thread-safe one-time init
  return api;
}

int nccl_version() {
  int version = 0;
  HARDNEG_NCCL_CHECK(nccl_api().get_version(&version));
  return version;
}

std::string nccl_unique_id() {
  ncclUniqueId id;
  HARDNEG_NCCL_CHECK(nccl_api().get_unique_id(&id));
  return std::string(id.internal, sizeof(id.internal));
}

NcclComm::NcclComm(const std::string& unique_id, int nranks, int rank, int device)
    : nranks_(nranks), rank_(rank), device_(device) {
  if (unique_id.size() != sizeof(ncclUniqueId::internal)) {
    throw std::invalid_argument("unique_id must be " +
                                std::to_string(sizeof(ncclUniqueId::internal)) + " bytes, got " +
                                std::to_string(unique_id.size()));
  }
  if (nranks < 1 || rank < 0 || rank >= nranks) {
    throw std::invalid_argument("rank " + std::to_string(rank) +
                                " is not in [0, nranks = " + std::to_string(nranks) + ")");
  }
  ncclUniqueId id;
  std::memcpy(id.internal, unique_id.data(), sizeof(id.internal));
  DeviceGuard guard(device_);
  // Non-blocking: the comm stream must never serialise with the legacy default stream.
  HARDNEG_CUDA_CHECK(cudaStreamCreateWithFlags(&comm_stream_, cudaStreamNonBlocking));
  HARDNEG_CUDA_CHECK(cudaEventCreateWithFlags(&block_ready_, cudaEventDisableTiming));
  for (auto& e : transfer_done_) {
    HARDNEG_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  }
  HARDNEG_NCCL_CHECK(nccl_api().comm_init_rank(&comm_, nranks_, id, rank_));
}

NcclComm::~NcclComm() {
  // No throwing from a destructor: errors at teardown are ignored after a best effort.
  cudaSetDevice(device_);
  if (comm_ != nullptr) {
    ncclResult_t async_err = ncclSuccess;
    nccl_api().comm_get_async_error(comm_, &async_err);
    if (async_err != ncclSuccess) {
      nccl_api().comm_abort(comm_);
    } else {
      cudaStreamSynchronize(comm_stream_);
      nccl_api().comm_destroy(comm_);
    }
  }
  for (auto& e : transfer_done_) {
    if (e != nullptr) cudaEventDestroy(e);
  }
  if (block_ready_ != nullptr) cudaEventDestroy(block_ready_);
  if (comm_stream_ != nullptr) cudaStreamDestroy(comm_stream_);
}

int NcclComm::exchange(const std::vector<NcclBuffer>& sends, int dst,
                       const std::vector<NcclBuffer>& recvs, int src, uintptr_t compute_stream) {
  auto compute = reinterpret_cast<cudaStream_t>(compute_stream);
  DeviceGuard guard(device_);
  const int slot = next_slot_;
  next_slot_ = (next_slot_ + 1) % kSlots;
  // The buffers to send were written on the compute stream: the comm stream starts after them.
  HARDNEG_CUDA_CHECK(cudaEventRecord(block_ready_, compute));
  HARDNEG_CUDA_CHECK(cudaStreamWaitEvent(comm_stream_, block_ready_, 0));
  const NcclApi& nccl = nccl_api();
  HARDNEG_NCCL_CHECK(nccl.group_start());
  for (const auto& b : sends) {
    HARDNEG_NCCL_CHECK(nccl.send(reinterpret_cast<const void*>(b.ptr), b.bytes, ncclUint8, dst,
                                 comm_, comm_stream_));
  }
  for (const auto& b : recvs) {
    HARDNEG_NCCL_CHECK(
        nccl.recv(reinterpret_cast<void*>(b.ptr), b.bytes, ncclUint8, src, comm_, comm_stream_));
  }
  HARDNEG_NCCL_CHECK(nccl.group_end());
  HARDNEG_CUDA_CHECK(cudaEventRecord(transfer_done_[slot], comm_stream_));
  return slot;
}

void NcclComm::wait(int slot, uintptr_t compute_stream) {
  if (slot < 0 || slot >= kSlots) {
    throw std::invalid_argument("slot must be in [0, " + std::to_string(kSlots) + "), got " +
                                std::to_string(slot));
  }
  DeviceGuard guard(device_);
  HARDNEG_CUDA_CHECK(
      cudaStreamWaitEvent(reinterpret_cast<cudaStream_t>(compute_stream), transfer_done_[slot], 0));
}

}  // namespace hardneg
