// Fused hard-negative loss on CUDA: logits, false-negative masking, online logsumexp, loss and
// dL/dS of one similarity block S, one thread group per row (a warp for short rows, a block for
// long ones), fp32 throughout. The B x N logits are never materialised: the caller's GEMM hands S
// chunk by chunk (or column block by block) and dS overwrites S in place. Per row: one coalesced
// read of S for the statistics, one read + write for dS; time O(rows * cols), O(1) extra memory.
//
// Kernel math only: the entry points are in hardneg_loss_kernels.cu, the launch configuration and
// the runtime-flag dispatch in hardneg_loss.cpp. Scalar formulas come from hardneg_loss_math.h,
// shared with the CPU kernels. Host-compilable: tests/cuda_emu builds it with a shim header in
// place of cuda_runtime.h (a CPU thread per CUDA thread), so CI runs every kernel's logic.
#pragma once

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#endif

#include <cstdint>

#include "hardneg/hardneg_loss.h"
#include "hardneg/hardneg_loss_math.h"
#include "hardneg_loss_kernels.h"

namespace hardneg {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// The row this thread works on and its rank inside the row's thread group.
template <int kRowThreads>
struct RowSlot {
  static_assert(kRowThreads == kWarpSize || kRowThreads == kBlockThreads,
                "a row is owned by one warp or by the whole block");
  static constexpr int kRowsPerBlock = kBlockThreads / kRowThreads;
  int64_t row;
  int tid;

  __device__ __forceinline__ RowSlot()
      : row(static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kRowThreads),
        tid(static_cast<int>(threadIdx.x % kRowThreads)) {}
};

// Everything a thread needs to read its share of row i.
struct RowRef {
  float* s;                // row i of S
  const int64_t* col_ids;  // (cols), read only when masking
  int64_t row_id;
  int64_t cols;
  int64_t pos;  // positive's column, possibly outside [0, cols)
  float c_neg;  // logit of a negative = c_neg * s

  __device__ __forceinline__ bool masked(int64_t j, bool mask) const {
    return mask && col_ids[j] == row_id;
  }
};

template <LossMode kMode, bool kMask>
__device__ __forceinline__ RowRef make_row(const HardnegLossParams& p, int64_t i) {
  return RowRef{p.s + i * p.ld_s,         p.col_ids,
                kMask ? p.row_ids[i] : 0, p.cols,
                p.pos_offset + i,         hardneg_neg_coefficient(kMode, p.inv_tau, p.alpha)};
}

// Online (max, sum) of the unmasked negatives among this thread's columns tid, tid + kRowThreads,
// ...: consecutive threads read consecutive columns, so every sweep is coalesced.
template <bool kMask, int kRowThreads>
__device__ __forceinline__ void thread_neg_stats(const RowRef& r, int tid, float& m, float& l) {
  m = -INFINITY;
  l = 0.0f;
#pragma unroll 4
  for (int64_t j = tid; j < r.cols; j += kRowThreads) {
    if (j == r.pos || r.masked(j, kMask)) continue;
    hardneg_lse_push(m, l, r.s[j] * r.c_neg);
  }
}

// Butterfly merge of (m, l) across the warp. Merging is commutative in floating point (max, then
// one product-sum), so every lane ends with bitwise the same state and no broadcast is needed.
__device__ __forceinline__ void warp_lse_reduce(float& m, float& l) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const float m2 = __shfl_xor_sync(kFullMask, m, offset);
    const float l2 = __shfl_xor_sync(kFullMask, l, offset);
    hardneg_lse_merge(m, l, m2, l2);
  }
}

// (m, l) of the whole row in every thread of its group. It also orders all reads of the row
// before any in-place write of dS that follows (the barrier or __syncwarp).
template <int kRowThreads>
__device__ __forceinline__ void row_lse_reduce(float& m, float& l) {
  warp_lse_reduce(m, l);
  if constexpr (kRowThreads == kWarpSize) {
    __syncwarp();
  } else {
    constexpr int kWarps = kRowThreads / kWarpSize;
    __shared__ float2 warp_state[kWarps];
    const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
    if (threadIdx.x % kWarpSize == 0) warp_state[warp] = make_float2(m, l);
    __syncthreads();
    // Every thread merges the warps in the same order: identical results, no second barrier
    // (one row per block, so warp_state is never rewritten).
    m = warp_state[0].x;
    l = warp_state[0].y;
#pragma unroll
    for (int w = 1; w < kWarps; ++w) hardneg_lse_merge(m, l, warp_state[w].x, warp_state[w].y);
  }
}

// dS_ij in place over this thread's columns: (P_ij * amp_ij) / tau * row_factor for negatives,
// expm1(-L) / tau * row_factor = (P_ip - 1) / tau for the positive (exact on confident rows), 0
// where masked (the CPU's grad_row, per column).
template <LossMode kMode, bool kMask, int kRowThreads>
__device__ __forceinline__ void thread_grad(const RowRef& r, int tid, const HardnegLossParams& p,
                                            float row_factor, float lse, float s_pos, float loss) {
  const float neg_scale = row_factor * p.inv_tau;
#pragma unroll 4
  for (int64_t j = tid; j < r.cols; j += kRowThreads) {
    const float sj = r.s[j];
    float g;
    if (j == r.pos) {
      g = hardneg_pos_grad(loss, p.inv_tau) * row_factor;
    } else if (r.masked(j, kMask)) {
      g = 0.0f;
    } else {
      g = expf(sj * r.c_neg - lse) * neg_scale;
      if constexpr (kMode == LossMode::kEga)
        g *= hardneg_ega_amp(sj, s_pos, p.ega_beta, p.ega_margin);
    }
    r.s[j] = g;
  }
}

// grad_scale * row_scale[i]: the reduction and the incoming gradient of row i's loss.
__device__ __forceinline__ float row_grad_factor(const HardnegLossParams& p, int64_t i) {
  return p.grad_scale * (p.row_scale ? p.row_scale[i] : 1.0f);
}

// Row schedule: every row holds all its candidates, positive included. Writes lse, z_pos, s_pos,
// loss and, when p.need_grad, dS in place.
template <LossMode kMode, bool kMask, int kRowThreads>
__device__ __forceinline__ void hardneg_loss_rows(HardnegLossParams p) {
  const RowSlot<kRowThreads> slot;
  if (slot.row >= p.rows) return;  // a whole warp at once: rows never split across a return
  const int64_t i = slot.row;
  const RowRef r = make_row<kMode, kMask>(p, i);
  const float s_pos = r.s[r.pos];
  const float z_pos = hardneg_logit(s_pos, true, kMode, p.inv_tau, p.alpha);
  float m, l;
  thread_neg_stats<kMask, kRowThreads>(r, slot.tid, m, l);
  row_lse_reduce<kRowThreads>(m, l);
  const float loss = hardneg_row_loss(z_pos, m, l);
  const float lse = z_pos + loss;
  if (slot.tid == 0) {
    p.lse[i] = lse;
    p.z_pos[i] = z_pos;
    p.s_pos[i] = s_pos;
    p.loss[i] = loss;
  }
  if (p.need_grad) {
    thread_grad<kMode, kMask, kRowThreads>(r, slot.tid, p, row_grad_factor(p, i), lse, s_pos, loss);
  }
}

// Column-block schedule, forward: merges the block's (max, sum) of the negatives into run_max /
// run_sum of each row; rows whose positive lies in the block also record z_pos and s_pos (the
// caller combines them with hardneg_row_loss once every block is in).
template <LossMode kMode, bool kMask, int kRowThreads>
__device__ __forceinline__ void hardneg_loss_block_update(HardnegLossParams p) {
  const RowSlot<kRowThreads> slot;
  if (slot.row >= p.rows) return;
  const int64_t i = slot.row;
  const RowRef r = make_row<kMode, kMask>(p, i);
  if (r.pos >= 0 && r.pos < r.cols && slot.tid == 0) {
    const float s_pos = r.s[r.pos];
    p.s_pos[i] = s_pos;
    p.z_pos[i] = hardneg_logit(s_pos, true, kMode, p.inv_tau, p.alpha);
  }
  float m, l;
  thread_neg_stats<kMask, kRowThreads>(r, slot.tid, m, l);
  row_lse_reduce<kRowThreads>(m, l);
  if (slot.tid == 0) {
    float run_m = p.run_max[i];
    float run_l = p.run_sum[i];
    hardneg_lse_merge(run_m, run_l, m, l);
    p.run_max[i] = run_m;
    p.run_sum[i] = run_l;
  }
}

// Column-block schedule, backward: dS of the block in place from the row's final loss L and s_pos
// (lse = z_pos + L).
template <LossMode kMode, bool kMask, int kRowThreads>
__device__ __forceinline__ void hardneg_loss_block_grad(HardnegLossParams p) {
  const RowSlot<kRowThreads> slot;
  if (slot.row >= p.rows) return;
  const int64_t i = slot.row;
  const RowRef r = make_row<kMode, kMask>(p, i);
  const float s_pos = p.s_pos[i];
  const float loss = p.loss[i];
  const float lse = hardneg_logit(s_pos, true, kMode, p.inv_tau, p.alpha) + loss;
  thread_grad<kMode, kMask, kRowThreads>(r, slot.tid, p, row_grad_factor(p, i), lse, s_pos, loss);
}

}  // namespace cuda
}  // namespace hardneg
