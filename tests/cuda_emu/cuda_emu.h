// Host emulation of the CUDA execution model, enough to compile csrc/cuda's kernels for the CPU:
// one std::thread per CUDA thread, the blocks of a grid run one after another (as on a GPU with one
// SM), barriers for __syncthreads / __syncwarp, warp shuffles through a per-warp exchange with a
// barrier on each side, function-local statics for __shared__ (one block at a time, so they are
// per block). Threads that return early leave their block's and warp's barriers, as on Volta+.
//
// The barriers use a mutex and a condition variable, so ThreadSanitizer sees every happens-before
// edge the real barriers give, and nothing more: a missing barrier in a kernel is a data race.
// CUDA_EMU_DROP_SYNCTHREADS turns __syncthreads into a no-op: the positive control that shows the
// race detector catches the unsynchronised shared-memory read that follows.
#pragma once

#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3() = default;
  dim3(unsigned x_, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline unsigned __float_as_uint(float x) {
  unsigned u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace cuda_emu {

constexpr int kWarpSize = 32;

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda_emu: %s\n", what);
  std::abort();
}

// A reusable barrier over `expected` threads; drop() removes a thread that has exited.
class Barrier {
 public:
  void reset(int expected) {
    std::lock_guard<std::mutex> lock(mutex_);
    expected_ = expected;
    arrived_ = 0;
  }
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t phase = phase_;
    if (++arrived_ == expected_) {
      release();
    } else {
      cv_.wait(lock, [&] { return phase_ != phase; });
    }
  }
  void drop() {
    std::lock_guard<std::mutex> lock(mutex_);
    --expected_;
    if (arrived_ > 0 && arrived_ == expected_) release();
  }
  int expected() {
    std::lock_guard<std::mutex> lock(mutex_);
    return expected_;
  }

 private:
  void release() {
    arrived_ = 0;
    ++phase_;
    cv_.notify_all();
  }
  std::mutex mutex_;
  std::condition_variable cv_;
  int expected_ = 0;
  int arrived_ = 0;
  uint64_t phase_ = 0;
};

// The state of the block being run: its barrier, its warps' barriers and shuffle slots.
struct BlockState {
  Barrier block;
  std::vector<Barrier> warps;
  std::vector<uint64_t> slots;  // kWarpSize per warp
  int threads = 0;
};

inline thread_local BlockState* t_block = nullptr;
inline thread_local int t_tid = 0;

inline int warp_threads(int threads, int warp) {
  const int rest = threads - warp * kWarpSize;
  return rest < kWarpSize ? rest : kWarpSize;
}

// Persistent host threads, one per CUDA thread of the largest block seen so far: creating 256
// threads for every launch would cost more than the kernels themselves.
class Pool {
 public:
  // Runs job(t) on threads t = 0 .. n-1 and returns when all have finished.
  void run(int n, const std::function<void(int)>& job) {
    std::unique_lock<std::mutex> lock(mutex_);
    while (static_cast<int>(threads_.size()) < n) {
      const int t = static_cast<int>(threads_.size());
      threads_.emplace_back([this, t] { serve(t); });
    }
    job_ = &job;
    active_ = n;
    remaining_ = n;
    ++generation_;
    start_.notify_all();
    done_.wait(lock, [&] { return remaining_ == 0; });
    job_ = nullptr;
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
      ++generation_;
    }
    start_.notify_all();
    for (auto& th : threads_) th.join();
  }

 private:
  void serve(int t) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int)>* job = nullptr;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        start_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (stop_) return;
        if (t >= active_) continue;
        job = job_;
      }
      (*job)(t);
      std::lock_guard<std::mutex> lock(mutex_);
      if (--remaining_ == 0) done_.notify_all();
    }
  }
  std::mutex mutex_;
  std::condition_variable start_, done_;
  std::vector<std::thread> threads_;
  const std::function<void(int)>* job_ = nullptr;
  uint64_t generation_ = 0;
  int active_ = 0, remaining_ = 0;
  bool stop_ = false;
};

inline Pool& pool() {
  static Pool instance;
  return instance;
}

// Runs body() as every thread of every block of the grid (1-D grids and blocks), one block after
// another; a launch returns when the grid has finished (the emulated stream is synchronous).
inline void launch(dim3 grid, dim3 block, const std::function<void()>& body) {
  if (grid.y != 1 || grid.z != 1 || block.y != 1 || block.z != 1) fail("only 1-D launches");
  const int threads = static_cast<int>(block.x);
  if (threads < 1 || threads > 1024) fail("block size outside [1, 1024]");
  const int warps = (threads + kWarpSize - 1) / kWarpSize;
  BlockState state;
  state.warps = std::vector<Barrier>(warps);
  state.slots.assign(static_cast<size_t>(warps) * kWarpSize, 0);
  state.threads = threads;
  const auto reset = [&] {
    state.block.reset(threads);
    for (int w = 0; w < warps; ++w) state.warps[w].reset(warp_threads(threads, w));
  };
  reset();
  Barrier grid_barrier;  // every thread has finished the current block
  grid_barrier.reset(threads);
  pool().run(threads, [&](int t) {
    t_block = &state;
    t_tid = t;
    threadIdx = dim3(static_cast<unsigned>(t));
    blockDim = block;
    gridDim = grid;
    for (unsigned b = 0; b < grid.x; ++b) {
      blockIdx = dim3(b);
      body();
      state.block.drop();
      state.warps[t / kWarpSize].drop();
      grid_barrier.arrive_and_wait();
      if (t == 0) reset();  // the others wait below until it is done
      grid_barrier.arrive_and_wait();
    }
    t_block = nullptr;
  });
}

inline Barrier& my_warp() { return t_block->warps[t_tid / kWarpSize]; }

}  // namespace cuda_emu

inline void __syncthreads() {
#ifndef CUDA_EMU_DROP_SYNCTHREADS
  cuda_emu::t_block->block.arrive_and_wait();
#endif
}

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  const int lanes = cuda_emu::my_warp().expected();
  const unsigned all = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
  if (mask != all) cuda_emu::fail("__syncwarp with a mask other than the warp's live lanes");
  cuda_emu::my_warp().arrive_and_wait();
}

// Butterfly shuffle: every live lane of the warp must take part (the kernels pass the full mask).
template <class T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of at most 8 bytes");
  using cuda_emu::kWarpSize;
  cuda_emu::BlockState& s = *cuda_emu::t_block;
  const int warp = cuda_emu::t_tid / kWarpSize;
  const int lane = cuda_emu::t_tid % kWarpSize;
  if (mask != 0xffffffffu || cuda_emu::my_warp().expected() != kWarpSize) {
    cuda_emu::fail("__shfl_xor_sync needs the full mask and 32 live lanes");
  }
  uint64_t* slots = &s.slots[static_cast<size_t>(warp) * kWarpSize];
  std::memcpy(&slots[lane], &value, sizeof(T));
  cuda_emu::my_warp().arrive_and_wait();
  T out;
  std::memcpy(&out, &slots[lane ^ lane_mask], sizeof(T));
  cuda_emu::my_warp().arrive_and_wait();
  return out;
}
