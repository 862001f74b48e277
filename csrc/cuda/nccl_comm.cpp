// hardneg's NCCL communicator: the RAII comm (non-blocking ncclComm_t + comm stream + events), the
// grouped send/recv of the ring, bounded waits on NCCL. Host code only; every driver call goes
// through HARDNEG_CU_CHECK and every NCCL call through HARDNEG_NCCL_CHECK (one check-macro family).
#include "nccl_comm.h"

#include <chrono>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>

#include "cuda_driver.h"

namespace hardneg {

[[noreturn]] inline void nccl_fail(ncclResult_t err, const char* what, const char* file, int line) {
  throw std::runtime_error(std::string("hardneg NCCL error: ") + what + " failed with " +
                           nccl_api().get_error_string(err) + " (" + std::to_string(err) + ") at " +
                           file + ":" + std::to_string(line));
}

}  // namespace hardneg

// Wraps an NCCL call returning ncclResult_t (the NCCL member of HARDNEG_CU_CHECK's family). On a
// non-blocking comm, ncclInProgress means "enqueued, still running": not a failure.
#define HARDNEG_NCCL_CHECK(call)                                         \
  do {                                                                   \
    const ncclResult_t hardneg_err_ = (call);                            \
    if (hardneg_err_ != ncclSuccess && hardneg_err_ != ncclInProgress) { \
      ::hardneg::nccl_fail(hardneg_err_, #call, __FILE__, __LINE__);     \
    }                                                                    \
  } while (0)

namespace hardneg {
namespace {

using Clock = std::chrono::steady_clock;

// ncclGroupStart ... ncclGroupEnd as a scope: NCCL's group state is per host thread and shared with
// every other NCCL user of the process (torch's process groups load the same libnccl), so a group
// left open by a failed ncclSend would hang the thread's next NCCL call. end() closes it on the
// normal path; the destructor closes it when an exception leaves the scope.
class NcclGroup {
 public:
  explicit NcclGroup(const NcclApi& nccl) : nccl_(nccl) { HARDNEG_NCCL_CHECK(nccl_.group_start()); }
  ncclResult_t end() {
    open_ = false;
    return nccl_.group_end();
  }
  ~NcclGroup() {
    if (open_) nccl_.group_end();
  }
  NcclGroup(const NcclGroup&) = delete;
  NcclGroup& operator=(const NcclGroup&) = delete;

 private:
  const NcclApi& nccl_;
  bool open_ = true;
};

// Sleeps between polls: a few microseconds first (an exchange's group usually completes at once),
// then up to a millisecond (init takes seconds).
void backoff(int iteration) {
  if (iteration < 64) {
    std::this_thread::yield();
  } else {
    std::this_thread::sleep_for(std::chrono::microseconds(iteration < 1024 ? 50 : 1000));
  }
}

Clock::time_point deadline_after(double seconds) {
  return Clock::now() +
         std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

}  // namespace

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

NcclComm::NcclComm(const std::string& unique_id, int nranks, int rank, int device, double timeout_s)
    : nranks_(nranks), rank_(rank), device_(device), timeout_s_(timeout_s) {
  if (unique_id.size() != sizeof(ncclUniqueId::internal)) {
    throw std::invalid_argument("unique_id must be " +
                                std::to_string(sizeof(ncclUniqueId::internal)) + " bytes, got " +
                                std::to_string(unique_id.size()));
  }
  if (nranks < 1 || rank < 0 || rank >= nranks) {
    throw std::invalid_argument("rank " + std::to_string(rank) +
                                " is not in [0, nranks = " + std::to_string(nranks) + ")");
  }
  if (!(timeout_s > 0.0) || !std::isfinite(timeout_s)) {
    throw std::invalid_argument("timeout must be a positive number of seconds, got " +
                                std::to_string(timeout_s));
  }
  ncclUniqueId id;
  std::memcpy(id.internal, unique_id.data(), sizeof(id.internal));
  const ContextGuard guard(device_);  // NCCL binds the comm to the current device
  const CudaDriver& cu = cuda_driver();
  try {
    // Non-blocking: the comm stream must never serialise with the legacy default stream.
    HARDNEG_CU_CHECK(cu.stream_create(&comm_stream_, CU_STREAM_NON_BLOCKING));
    HARDNEG_CU_CHECK(cu.event_create(&block_ready_, CU_EVENT_DISABLE_TIMING));
    for (auto& e : transfer_done_) HARDNEG_CU_CHECK(cu.event_create(&e, CU_EVENT_DISABLE_TIMING));
    // blocking = 0: init returns at once and is polled below, so a rank that never joins costs
    // timeout_s and a clear error instead of a hang.
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    const ncclResult_t started =
        nccl_api().comm_init_rank_config(&comm_, nranks_, id, rank_, &config);
    await(started, "ncclCommInitRankConfig (every rank of the group must create the comm)");
  } catch (...) {
    release_cuda();  // await() has aborted the comm itself
    throw;
  }
}

NcclComm::~NcclComm() {
  // Never throws and never waits: at interpreter exit the peers may be gone. A comm with an error
  // or with transfers still queued is aborted; an idle healthy one is destroyed.
  if (comm_ == nullptr) return;
  try {
    const ContextGuard guard(device_);  // restores the caller's device on exit
    const NcclApi& nccl = nccl_api();
    ncclResult_t state = ncclSuccess;
    nccl.comm_get_async_error(comm_, &state);
    bool idle = state == ncclSuccess;
    if (idle && cuda_driver().event_record(block_ready_, comm_stream_) == CUDA_SUCCESS) {
      idle = cuda_driver().event_query(block_ready_) == CUDA_SUCCESS;
    }
    idle ? nccl.comm_destroy(comm_) : nccl.comm_abort(comm_);
    comm_ = nullptr;
    release_cuda();
  } catch (...) {
    comm_ = nullptr;  // the driver or NCCL could not even be reached: nothing more to free
  }
}

void NcclComm::release_cuda() {
  if (comm_stream_ == nullptr && block_ready_ == nullptr) return;
  const CudaDriver& cu = cuda_driver();
  for (auto& e : transfer_done_) {
    if (e != nullptr) cu.event_destroy(e);
    e = nullptr;
  }
  if (block_ready_ != nullptr) cu.event_destroy(block_ready_);
  if (comm_stream_ != nullptr) cu.stream_destroy(comm_stream_);
  block_ready_ = nullptr;
  comm_stream_ = nullptr;
}

void NcclComm::check_alive(const char* what) const {
  if (comm_ == nullptr) {
    throw std::runtime_error(std::string("hardneg NCCL error: ") + what +
                             " on a communicator that was destroyed or aborted");
  }
}

void NcclComm::await(ncclResult_t started, const char* what) {
  const NcclApi& nccl = nccl_api();
  ncclResult_t state = started;
  if (state == ncclSuccess && comm_ != nullptr) nccl.comm_get_async_error(comm_, &state);
  const auto deadline = deadline_after(timeout_s_);
  for (int i = 0; state == ncclInProgress; ++i) {
    if (Clock::now() > deadline) {
      if (comm_ != nullptr) nccl.comm_abort(comm_);
      comm_ = nullptr;
      throw std::runtime_error(std::string("hardneg NCCL error: ") + what +
                               " did not complete within " + std::to_string(timeout_s_) +
                               " s on rank " + std::to_string(rank_) + " of " +
                               std::to_string(nranks_) + "; the communicator was aborted");
    }
    backoff(i);
    nccl.comm_get_async_error(comm_, &state);
  }
  if (state != ncclSuccess) {
    if (comm_ != nullptr) nccl.comm_abort(comm_);
    comm_ = nullptr;
    throw std::runtime_error(std::string("hardneg NCCL error: ") + what + " failed with " +
                             nccl.get_error_string(state) + " (" + std::to_string(state) +
                             ") on rank " + std::to_string(rank_) + " of " +
                             std::to_string(nranks_) + "; the communicator was aborted");
  }
}

int NcclComm::exchange(const std::vector<NcclBuffer>& sends, int dst,
                       const std::vector<NcclBuffer>& recvs, int src, uintptr_t compute_stream) {
  check_alive("exchange");
  if (dst < 0 || dst >= nranks_ || src < 0 || src >= nranks_) {
    throw std::invalid_argument("peers must be ranks in [0, " + std::to_string(nranks_) +
                                "), got dst " + std::to_string(dst) + " and src " +
                                std::to_string(src));
  }
  const CudaDriver& cu = cuda_driver();
  const NcclApi& nccl = nccl_api();
  auto compute = reinterpret_cast<CUstream>(compute_stream);
  const ContextGuard guard(device_);
  const int slot = next_slot_;
  next_slot_ = (next_slot_ + 1) % kSlots;
  // The buffers to send were written on the compute stream: the comm stream starts after them.
  HARDNEG_CU_CHECK(cu.event_record(block_ready_, compute));
  HARDNEG_CU_CHECK(cu.stream_wait_event(comm_stream_, block_ready_, 0));
  const auto posted = [](ncclResult_t r) { return r == ncclSuccess || r == ncclInProgress; };
  ncclResult_t result = ncclSuccess;
  const char* call = "ncclGroupEnd (the ring's exchange)";
  {
    // On any early exit (a failed post, an exception) NcclGroup's destructor closes the group.
    NcclGroup group(nccl);
    for (size_t k = 0; k < sends.size() && posted(result); ++k) {
      result = nccl.send(reinterpret_cast<const void*>(sends[k].ptr), sends[k].bytes, ncclUint8,
                         dst, comm_, comm_stream_);
      if (!posted(result)) call = "ncclSend (the ring's exchange)";
    }
    for (size_t k = 0; k < recvs.size() && posted(result); ++k) {
      result = nccl.recv(reinterpret_cast<void*>(recvs[k].ptr), recvs[k].bytes, ncclUint8, src,
                         comm_, comm_stream_);
      if (!posted(result)) call = "ncclRecv (the ring's exchange)";
    }
    if (posted(result)) result = group.end();
  }
  if (!posted(result)) {
    // A bad argument leaves the comm usable; anything else means it is broken: abort, not reuse.
    if (result != ncclInvalidArgument && result != ncclInvalidUsage) abort();
    nccl_fail(result, call, __FILE__, __LINE__);
  }
  await(result, "ncclGroupEnd (the ring's exchange)");
  HARDNEG_CU_CHECK(cu.event_record(transfer_done_[slot], comm_stream_));
  return slot;
}

void NcclComm::wait(int slot, uintptr_t compute_stream) {
  if (slot < 0 || slot >= kSlots) {
    throw std::invalid_argument("slot must be in [0, " + std::to_string(kSlots) + "), got " +
                                std::to_string(slot));
  }
  check_alive("wait");
  await(ncclSuccess, "the ring's exchange (asynchronous NCCL error)");
  const ContextGuard guard(device_);
  HARDNEG_CU_CHECK(cuda_driver().stream_wait_event(reinterpret_cast<CUstream>(compute_stream),
                                                   transfer_done_[slot], 0));
}

void NcclComm::destroy() {
  if (comm_ == nullptr) return;
  const CudaDriver& cu = cuda_driver();
  const NcclApi& nccl = nccl_api();
  const ContextGuard guard(device_);
  // Wait for the comm stream (every queued transfer), at most timeout_s, watching NCCL's errors.
  HARDNEG_CU_CHECK(cu.event_record(block_ready_, comm_stream_));
  const auto deadline = deadline_after(timeout_s_);
  for (int i = 0;; ++i) {
    const CUresult done = cu.event_query(block_ready_);
    if (done == CUDA_SUCCESS) break;
    ncclResult_t state = ncclSuccess;
    nccl.comm_get_async_error(comm_, &state);
    if (done != CUDA_ERROR_NOT_READY || (state != ncclSuccess && state != ncclInProgress) ||
        Clock::now() > deadline) {
      abort();
      throw std::runtime_error(
          "hardneg NCCL error: destroy: the comm stream did not drain within " +
          std::to_string(timeout_s_) + " s (NCCL state " + std::to_string(state) +
          ", event query " + std::to_string(static_cast<int>(done)) +
          "); the communicator was aborted instead");
    }
    backoff(i);
  }
  nccl.comm_destroy(comm_);
  comm_ = nullptr;
  release_cuda();
}

void NcclComm::abort() {
  if (comm_ != nullptr) {
    const ContextGuard guard(device_);
    nccl_api().comm_abort(comm_);
    comm_ = nullptr;
  }
  release_cuda();
}

}  // namespace hardneg
