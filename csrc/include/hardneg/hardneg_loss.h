// Parameters of the fused hard-negative loss kernels (CPU and CUDA), torch-free.
//
// One similarity block S (rows x cols, fp32) is the unit of work: rows are queries (or targets in
// the symmetric direction), columns a contiguous range of candidates. The row schedule passes the
// whole candidate row at once; the ring schedule passes column blocks and merges online.
#pragma once

#include <cstdint>

namespace hardneg {

// Codes match hardneg._constants.MODES order.
enum class LossMode : int32_t { kInfoNCE = 0, kLlave = 1, kEga = 2 };

// Element type of a separate dS output. Codes match hardneg._gemm.DS_DTYPE_CODES.
enum class DsDtype : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

constexpr bool ds_dtype_valid(int32_t code) { return code >= 0 && code <= 2; }

struct HardnegLossParams {
  // Similarity block, row-major with row stride ld_s; overwritten with dL/dS by the grad kernels
  // when ds is null.
  float* s = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t ld_s = 0;

  // Separate dL/dS output of the grad kernels (rows x cols, row stride ld_ds elements of
  // ds_dtype); S is then only read. bf16 / fp16 values are rounded to nearest even from the fp32
  // gradient (hardneg_round_bf16 / _fp16, hardneg_loss_math.h): the low-precision operand of the
  // gradient GEMMs, written by the kernel instead of by a cast pass over an fp32 dS.
  void* ds = nullptr;
  int64_t ld_ds = 0;
  DsDtype ds_dtype = DsDtype::kFloat32;

  // Positive of row i is column pos_offset + i of this block (it may lie outside [0, cols)).
  int64_t pos_offset = 0;

  // False-negative masking: column j is masked for row i when col_ids[j] == row_ids[i] and j is
  // not the positive. Either pointer null disables masking.
  const int64_t* row_ids = nullptr;  // (rows)
  const int64_t* col_ids = nullptr;  // (cols)

  // Loss definition (design section 1).
  LossMode mode = LossMode::kLlave;
  float inv_tau = 50.0f;
  float alpha = 9.0f;
  float ega_beta = 0.0f;
  float ega_margin = 0.0f;

  // Per-row statistics (rows each): lse = logsumexp_j z_ij, z_pos / s_pos = logit and similarity
  // of the positive, loss = lse - z_pos computed without cancellation (hardneg_row_loss). The
  // column-block update keeps a running max and sum over the negatives only (run_max, run_sum;
  // the caller combines them with z_pos); the block backward reads loss and s_pos.
  float* lse = nullptr;
  float* loss = nullptr;
  float* z_pos = nullptr;
  float* s_pos = nullptr;
  float* run_max = nullptr;
  float* run_sum = nullptr;

  // EGA only (mode kEga; null otherwise). Its gradient's softmax Pbar_i = softmax_j(z_ij + u_ij),
  // u_ij = beta * max(0, s_ij - s_ip + margin) on negatives (u_ip = 0), has the statistic
  // ega_loss = logsumexp_j (z_ij + u_ij) - z_pos, computed like loss (hardneg_row_loss) so that
  // the positive's gradient expm1(-ega_loss) / tau = (Pbar_ip - 1) / tau keeps its digits on
  // confident rows. The row kernel writes it when non-null; the column-block update keeps the
  // negatives' running (max, sum) of z + u in run_max_u, run_sum_u, and the block backward reads
  // ega_loss in place of loss. u needs s_ip before a block is swept: the block update reads it
  // from the block when the positive lies there, else from s_pos, so the caller sweeps the block
  // holding a row's positive first (the ring: its own block, step 0) or fills s_pos beforehand.
  float* ega_loss = nullptr;
  float* run_max_u = nullptr;
  float* run_sum_u = nullptr;

  // Gradient scale: dS_ij = grad_scale * row_scale[i] * (Pbar_ij - Y_ij) / tau; row_scale may be
  // null (1). need_grad asks the row kernel to write dS (in place, or to ds) after the loss.
  float grad_scale = 1.0f;
  const float* row_scale = nullptr;
  bool need_grad = false;

  // CPU threads (at least 1); CUDA stream handle (cudaStream_t as an integer).
  int32_t num_threads = 1;
  uintptr_t stream = 0;
};

}  // namespace hardneg
