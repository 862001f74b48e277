// Fused hard-negative loss on CUDA: logits, false-negative masking, online logsumexp, loss and
// dL/dS of one similarity block S, one thread group per row (a warp for short rows, a block for
// long ones), fp32 throughout. The B x N logits are never materialised: the caller's GEMM hands S
// chunk by chunk (or column block by block) and dS overwrites S in place, or goes to a separate
// buffer in the gradient GEMMs' operand dtype (bf16 / fp16, rounded to nearest even). Per row: one
// coalesced read of S for the statistics (ega keeps a second online state, of the amplified z + u,
// in the same sweep), one read + a 4- or 2-byte write for dS; time O(rows * cols), O(1) extra
// memory.
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

// A row's online logsumexp states over its unmasked negatives: [0] of the logits z, and for ega
// [1] of the amplified logits z + u of its gradient's softmax.
template <LossMode kMode>
struct NegStats {
  static constexpr int kStates = kMode == LossMode::kEga ? 2 : 1;
  float m[kStates];
  float l[kStates];
};

// NegStats of the unmasked negatives among this thread's columns tid, tid + kRowThreads, ...:
// consecutive threads read consecutive columns, so every sweep is coalesced. s_pos: ega's u.
template <LossMode kMode, bool kMask, int kRowThreads>
__device__ __forceinline__ void thread_neg_stats(const RowRef& r, int tid,
                                                 const HardnegLossParams& p, float s_pos,
                                                 NegStats<kMode>& st) {
#pragma unroll
  for (int k = 0; k < NegStats<kMode>::kStates; ++k) {
    st.m[k] = -INFINITY;
    st.l[k] = 0.0f;
  }
#pragma unroll 4
  for (int64_t j = tid; j < r.cols; j += kRowThreads) {
    if (j == r.pos || r.masked(j, kMask)) continue;
    const float sj = r.s[j];
    hardneg_lse_push(st.m[0], st.l[0], sj * r.c_neg);
    if constexpr (kMode == LossMode::kEga) {
      hardneg_lse_push(st.m[1], st.l[1],
                       hardneg_ega_logit(sj, s_pos, p.inv_tau, p.ega_beta, p.ega_margin));
    }
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

// The kStates states (m[k], l[k]) of the whole row in every thread of its group. It also orders
// all reads of the row before any in-place write of dS that follows (the barrier or __syncwarp).
template <int kRowThreads, int kStates>
__device__ __forceinline__ void row_lse_reduce(float (&m)[kStates], float (&l)[kStates]) {
#pragma unroll
  for (int k = 0; k < kStates; ++k) warp_lse_reduce(m[k], l[k]);
  if constexpr (kRowThreads == kWarpSize) {
    __syncwarp();
  } else {
    constexpr int kWarps = kRowThreads / kWarpSize;
    __shared__ float2 warp_state[kStates][kWarps];
    const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
    if (threadIdx.x % kWarpSize == 0) {
#pragma unroll
      for (int k = 0; k < kStates; ++k) warp_state[k][warp] = make_float2(m[k], l[k]);
    }
    __syncthreads();
    // Every thread merges the warps in the same order: identical results, no second barrier
    // (one row per block, so warp_state is never rewritten).
#pragma unroll
    for (int k = 0; k < kStates; ++k) {
      m[k] = warp_state[k][0].x;
      l[k] = warp_state[k][0].y;
#pragma unroll
      for (int w = 1; w < kWarps; ++w) {
        hardneg_lse_merge(m[k], l[k], warp_state[k][w].x, warp_state[k][w].y);
      }
    }
  }
}

// dS_ij over this thread's columns into out (row i of S itself, or of a separate dS buffer of
// kOut): Pbar_ij / tau * row_factor for negatives, with Pbar_ij = exp(z_ij - lse) (ega:
// exp(z_ij + u_ij - lse_u), lse being lse_u), expm1(-L) / tau * row_factor = (Pbar_ip - 1) / tau
// for the positive (exact on confident rows; L is the gradient softmax's row loss, L_u for ega),
// 0 where masked (the CPU's grad_row, per column), rounded as hardneg_ds_value<kOut> stores it.
template <LossMode kMode, bool kMask, int kRowThreads, DsDtype kOut>
__device__ __forceinline__ void thread_grad_to(const RowRef& r, typename DsElement<kOut>::Type* out,
                                               int tid, const HardnegLossParams& p,
                                               float row_factor, float lse, float s_pos,
                                               float loss) {
  const float neg_scale = row_factor * p.inv_tau;
#pragma unroll 4
  for (int64_t j = tid; j < r.cols; j += kRowThreads) {
    const float sj = r.s[j];
    float g;
    if (j == r.pos) {
      g = hardneg_pos_grad(loss, p.inv_tau) * row_factor;
    } else if (r.masked(j, kMask)) {
      g = 0.0f;
    } else if constexpr (kMode == LossMode::kEga) {
      g = expf(hardneg_ega_logit(sj, s_pos, p.inv_tau, p.ega_beta, p.ega_margin) - lse) * neg_scale;
    } else {
      g = expf(sj * r.c_neg - lse) * neg_scale;
    }
    out[j] = hardneg_ds_value<kOut>(g);
  }
}

// dS of row i in place of S, or into row i of p.ds in p.ds_dtype: the choice is uniform across
// the launch, made once per row outside the loop.
template <LossMode kMode, bool kMask, int kRowThreads>
__device__ __forceinline__ void thread_grad(const RowRef& r, int64_t i, int tid,
                                            const HardnegLossParams& p, float row_factor, float lse,
                                            float s_pos, float loss) {
  if (p.ds == nullptr) {
    thread_grad_to<kMode, kMask, kRowThreads, DsDtype::kFloat32>(r, r.s, tid, p, row_factor, lse,
                                                                 s_pos, loss);
  } else if (p.ds_dtype == DsDtype::kBFloat16) {
    thread_grad_to<kMode, kMask, kRowThreads, DsDtype::kBFloat16>(
        r, static_cast<uint16_t*>(p.ds) + i * p.ld_ds, tid, p, row_factor, lse, s_pos, loss);
  } else if (p.ds_dtype == DsDtype::kFloat16) {
    thread_grad_to<kMode, kMask, kRowThreads, DsDtype::kFloat16>(
        r, static_cast<uint16_t*>(p.ds) + i * p.ld_ds, tid, p, row_factor, lse, s_pos, loss);
  } else {
    thread_grad_to<kMode, kMask, kRowThreads, DsDtype::kFloat32>(
        r, static_cast<float*>(p.ds) + i * p.ld_ds, tid, p, row_factor, lse, s_pos, loss);
  }
}

// grad_scale * row_scale[i]: the reduction and the incoming gradient of row i's loss.
__device__ __forceinline__ float row_grad_factor(const HardnegLossParams& p, int64_t i) {
  return p.grad_scale * (p.row_scale ? p.row_scale[i] : 1.0f);
}

// Row schedule: every row holds all its candidates, positive included. Writes lse, z_pos, s_pos,
// loss and, when p.need_grad, dS (in place, or into p.ds).
template <LossMode kMode, bool kMask, int kRowThreads>
__device__ __forceinline__ void hardneg_loss_rows(HardnegLossParams p) {
  const RowSlot<kRowThreads> slot;
  if (slot.row >= p.rows) return;  // a whole warp at once: rows never split across a return
  const int64_t i = slot.row;
  const RowRef r = make_row<kMode, kMask>(p, i);
  const float s_pos = r.s[r.pos];
  const float z_pos = hardneg_logit(s_pos, true, kMode, p.inv_tau, p.alpha);
  NegStats<kMode> st;
  thread_neg_stats<kMode, kMask, kRowThreads>(r, slot.tid, p, s_pos, st);
  row_lse_reduce<kRowThreads>(st.m, st.l);
  const float loss = hardneg_row_loss(z_pos, st.m[0], st.l[0]);
  float grad_loss = loss;  // the row loss of the gradient's softmax: L, or L_u for ega
  if constexpr (kMode == LossMode::kEga) grad_loss = hardneg_row_loss(z_pos, st.m[1], st.l[1]);
  if (slot.tid == 0) {
    p.lse[i] = z_pos + loss;
    p.z_pos[i] = z_pos;
    p.s_pos[i] = s_pos;
    p.loss[i] = loss;
    if (kMode == LossMode::kEga && p.ega_loss != nullptr) p.ega_loss[i] = grad_loss;
  }
  if (p.need_grad) {
    thread_grad<kMode, kMask, kRowThreads>(r, i, slot.tid, p, row_grad_factor(p, i),
                                           z_pos + grad_loss, s_pos, grad_loss);
  }
}

// Merges (m, l) into the running state (*run_m, *run_l) of a row.
__device__ __forceinline__ void merge_into(float* run_m, float* run_l, float m, float l) {
  float merged_m = *run_m;
  float merged_l = *run_l;
  hardneg_lse_merge(merged_m, merged_l, m, l);
  *run_m = merged_m;
  *run_l = merged_l;
}

// Column-block schedule, forward: merges the block's (max, sum) of the negatives into run_max /
// run_sum of each row (ega: also those of z + u into run_max_u / run_sum_u); rows whose positive
// lies in the block also record z_pos and s_pos (the caller combines them with hardneg_row_loss
// once every block is in). ega's u needs s_ip first: read from this block when the positive lies
// here, else from s_pos, recorded by the block the caller swept first (hardneg_loss.h).
template <LossMode kMode, bool kMask, int kRowThreads>
__device__ __forceinline__ void hardneg_loss_block_update(HardnegLossParams p) {
  const RowSlot<kRowThreads> slot;
  if (slot.row >= p.rows) return;
  const int64_t i = slot.row;
  const RowRef r = make_row<kMode, kMask>(p, i);
  const bool pos_here = r.pos >= 0 && r.pos < r.cols;
  if (pos_here && slot.tid == 0) {
    const float s_pos = r.s[r.pos];
    p.s_pos[i] = s_pos;
    p.z_pos[i] = hardneg_logit(s_pos, true, kMode, p.inv_tau, p.alpha);
  }
  float s_pos = 0.0f;  // read only by ega
  if constexpr (kMode == LossMode::kEga) s_pos = pos_here ? r.s[r.pos] : p.s_pos[i];
  NegStats<kMode> st;
  thread_neg_stats<kMode, kMask, kRowThreads>(r, slot.tid, p, s_pos, st);
  row_lse_reduce<kRowThreads>(st.m, st.l);
  if (slot.tid == 0) {
    merge_into(p.run_max + i, p.run_sum + i, st.m[0], st.l[0]);
    if constexpr (kMode == LossMode::kEga) {
      merge_into(p.run_max_u + i, p.run_sum_u + i, st.m[1], st.l[1]);
    }
  }
}

// Column-block schedule, backward: dS of the block (in place, or into p.ds) from s_pos and the row
// loss of the gradient's softmax, L (lse = z_pos + L) or, for ega, ega_loss L_u (lse_u = z_pos +
// L_u).
template <LossMode kMode, bool kMask, int kRowThreads>
__device__ __forceinline__ void hardneg_loss_block_grad(HardnegLossParams p) {
  const RowSlot<kRowThreads> slot;
  if (slot.row >= p.rows) return;
  const int64_t i = slot.row;
  const RowRef r = make_row<kMode, kMask>(p, i);
  const float s_pos = p.s_pos[i];
  const float loss = kMode == LossMode::kEga ? p.ega_loss[i] : p.loss[i];
  const float lse = hardneg_logit(s_pos, true, kMode, p.inv_tau, p.alpha) + loss;
  thread_grad<kMode, kMask, kRowThreads>(r, i, slot.tid, p, row_grad_factor(p, i), lse, s_pos,
                                         loss);
}

}  // namespace cuda
}  // namespace hardneg
