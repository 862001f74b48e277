// The logic of hardneg's NCCL communicator (csrc/cuda/nccl_comm.cpp) on the emulated driver and
// NCCL: the group of an exchange is always closed (a failed ncclRecv included), init is
// non-blocking and bounded by the timeout, a failed constructor frees its stream and events,
// NCCL's asynchronous errors are polled after each exchange and on wait, destroy() waits at most
// the timeout and aborts when the comm stream does not drain, the destructor never waits and
// restores the caller's device.
#include <chrono>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_driver.h"
#include "emu_driver.h"
#include "emu_nccl.h"
#include "nccl_comm.h"

namespace {

int g_passed = 0, g_failed = 0;

void check(bool ok, const std::string& what) {
  (ok ? g_passed : g_failed)++;
  if (!ok) std::printf("FAIL %s\n", what.c_str());
}

template <class Fn>
std::string error_of(Fn fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

bool has(const std::string& text, const char* needle) {
  return text.find(needle) != std::string::npos;
}

const std::string kUid(128, '\1');
const std::vector<hardneg::NcclBuffer> kBufs = {{4096, 64}, {8192, 64}};

void fresh() {
  emu::reset();
  emu_nccl::reset();
}

void init_is_nonblocking_and_bounded() {
  fresh();
  {
    hardneg::NcclComm comm(kUid, 2, 0, 0, 5.0);
    check(emu_nccl::state().last_blocking == 0, "the comm is created non-blocking (blocking = 0)");
    check(comm.alive() && emu_nccl::state().polls >= 4,
          "init is polled until NCCL reports success");
    check(emu::counters().live_streams == 1 && emu::counters().live_events == 1 + 4,
          "one comm stream and five events while alive");
  }
  check(emu::counters().live_streams == 0 && emu::counters().live_events == 0,
        "the destructor frees the stream and events");

  fresh();
  emu_nccl::state().init_polls = -1;  // a peer that never joins
  const auto t0 = std::chrono::steady_clock::now();
  const std::string err = error_of([] { hardneg::NcclComm comm(kUid, 2, 1, 0, 0.05); });
  const double waited =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  check(has(err, "did not complete within") && has(err, "rank 1 of 2") && has(err, "aborted"),
        "an init that never completes fails with a clear error: " + err);
  check(waited < 2.0, "and it gives up after the timeout (" + std::to_string(waited) + " s)");
  check(emu_nccl::state().aborts == 1, "the half-made comm is aborted");
  check(emu::counters().live_streams == 0 && emu::counters().live_events == 0,
        "a failed init frees its stream and events");

  fresh();
  emu::knobs().fail_event_create_after = 2;  // the third event cannot be created
  const std::string err2 = error_of([] { hardneg::NcclComm comm(kUid, 2, 0, 0, 5.0); });
  check(has(err2, "cuEventCreate") || has(err2, "event_create"), "event failure reported: " + err2);
  check(emu::counters().live_streams == 0 && emu::counters().live_events == 0 &&
            emu_nccl::state().inits == 0,
        "a constructor that fails before init frees what it created");
  check(has(error_of([] { hardneg::NcclComm comm(kUid, 2, 0, 0, -1.0); }),
            "timeout must be a positive number of seconds, got -1"),
        "a bad timeout is refused");
}

void exchange_closes_its_group() {
  fresh();
  hardneg::NcclComm comm(kUid, 3, 0, 0, 5.0);
  const int slot0 = comm.exchange(kBufs, 1, kBufs, 2, 0);
  const int slot1 = comm.exchange(kBufs, 1, kBufs, 2, 0);
  check(slot0 == 0 && slot1 == 1 && emu_nccl::state().group_depth == 0,
        "exchanges use successive slots and close their group");
  check(emu_nccl::state().sends == 4 && emu_nccl::state().recvs == 4, "every buffer is posted");

  emu_nccl::state().recv_result = ncclInvalidArgument;  // a bad buffer: the comm itself is fine
  const std::string err = error_of([&] { comm.exchange(kBufs, 1, kBufs, 2, 0); });
  check(has(err, "ncclRecv") && has(err, "failed"), "a failed ncclRecv is reported: " + err);
  check(emu_nccl::state().group_depth == 0, "a failed ncclRecv still closes the NCCL group");
  check(comm.alive(), "an argument error leaves a healthy comm usable");

  emu_nccl::state().recv_result = ncclSystemError;
  emu_nccl::state().async_error = ncclSystemError;
  const std::string err2 = error_of([&] { comm.exchange(kBufs, 1, kBufs, 2, 0); });
  check(emu_nccl::state().group_depth == 0 && !comm.alive() && emu_nccl::state().aborts == 1,
        "a failed ncclRecv on a broken comm closes the group and aborts the comm");
  check(has(error_of([&] { comm.exchange(kBufs, 1, kBufs, 2, 0); }), "destroyed or aborted"),
        "an aborted comm refuses further exchanges");
  check(has(error_of([&] { comm.exchange(kBufs, 3, kBufs, 2, 0); }), "destroyed or aborted"),
        "(checked before the peers)");
}

void async_errors_are_polled() {
  fresh();
  hardneg::NcclComm comm(kUid, 2, 0, 0, 5.0);
  check(has(error_of([&] { comm.exchange(kBufs, 2, kBufs, 0, 0); }), "got dst 2 and src 0"),
        "peers outside the group are refused");
  emu_nccl::state().async_error = ncclRemoteError;  // a peer died after the group was enqueued
  const std::string err = error_of([&] { comm.exchange(kBufs, 1, kBufs, 1, 0); });
  check(has(err, "remote process exited") && has(err, "aborted") && !comm.alive(),
        "an asynchronous error after the exchange is enqueued aborts and names it: " + err);

  fresh();
  hardneg::NcclComm other(kUid, 2, 0, 0, 5.0);
  const int slot = other.exchange(kBufs, 1, kBufs, 1, 0);
  emu_nccl::state().async_error = ncclRemoteError;
  check(has(error_of([&] { other.wait(slot, 0); }), "remote process exited") && !other.alive(),
        "wait() polls the asynchronous error");

  fresh();
  hardneg::NcclComm slow(kUid, 2, 0, 0, 0.05);
  emu_nccl::state().group_polls = -1;  // the group never completes: a peer that stopped posting
  check(has(error_of([&] { slow.exchange(kBufs, 1, kBufs, 1, 0); }), "did not complete within") &&
            !slow.alive(),
        "an exchange that never completes times out and aborts");
}

void destroy_and_abort() {
  fresh();
  {
    hardneg::NcclComm comm(kUid, 2, 0, 0, 5.0);
    comm.destroy();
    check(!comm.alive() && emu_nccl::state().destroys == 1 && emu_nccl::state().aborts == 0,
          "destroy() of an idle comm destroys it");
    check(emu::counters().live_streams == 0 && emu::counters().live_events == 0,
          "destroy() frees the stream and events");
    comm.destroy();
    comm.abort();
  }
  check(emu_nccl::state().destroys == 1 && emu_nccl::state().aborts == 0,
        "destroy, abort and the destructor after destroy() do nothing more");

  fresh();
  hardneg::NcclComm busy(kUid, 2, 0, 0, 0.05);
  emu::knobs().streams_busy = true;  // a transfer whose peer is gone never finishes
  check(has(error_of([&] { busy.destroy(); }), "did not drain") && !busy.alive() &&
            emu_nccl::state().aborts == 1 && emu_nccl::state().destroys == 0,
        "destroy() with a stuck transfer aborts after the timeout");

  fresh();
  hardneg::NcclComm gone(kUid, 2, 0, 0, 5.0);
  gone.abort();
  check(!gone.alive() && emu_nccl::state().aborts == 1 && emu::counters().live_events == 0,
        "abort() aborts at once and frees the events");
}

void destructor_never_waits_and_restores_the_device() {
  const hardneg::CudaDriver& cu = hardneg::cuda_driver();
  fresh();
  cu.ctx_push_current(hardneg::primary_context(1));  // the caller works on device 1
  const int depth = emu::context_depth();
  {
    hardneg::NcclComm comm(kUid, 2, 0, /*device=*/0, 60.0);
    check(emu::current_device() == 1 && emu::context_depth() == depth,
          "the constructor restores the caller's device");
    comm.exchange(kBufs, 1, kBufs, 1, 0);
    emu::knobs().streams_busy = true;  // queued transfers, e.g. peers gone at interpreter exit
  }
  check(emu_nccl::state().aborts == 1 && emu_nccl::state().destroys == 0,
        "the destructor aborts a comm with transfers still queued instead of waiting");
  check(emu::current_device() == 1 && emu::context_depth() == depth,
        "the destructor restores the caller's device");
  emu::knobs().streams_busy = false;
  emu_nccl::reset();
  {
    hardneg::NcclComm comm(kUid, 2, 0, 0, 60.0);
  }
  check(emu_nccl::state().destroys == 1 && emu_nccl::state().aborts == 0,
        "the destructor destroys an idle healthy comm");
  CUcontext popped = nullptr;
  cu.ctx_pop_current(&popped);
}

}  // namespace

int main() {
  init_is_nonblocking_and_bounded();
  exchange_closes_its_group();
  async_errors_are_polled();
  destroy_and_abort();
  destructor_never_waits_and_restores_the_device();
  std::printf("cuda_emu nccl_comm: %d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
