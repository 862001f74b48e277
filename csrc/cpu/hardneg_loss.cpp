// Fused hard-negative loss on the CPU: logits, masking, logsumexp, loss and dL/dS of one similarity
// block in at most three sweeps of each row, OpenMP over rows, SIMD over columns. The B x N logits
// are never materialised: the caller hands row chunks (or column blocks) of S = Q C^T one at a
// time, and dS overwrites S in place. Time O(rows * cols), extra memory O(1) per row.
//
// Compiled once per ISA variant (cmake/cpu.cmake: HARDNEG_CPU_VARIANT = baseline, avx2, avx512 or
// arch, with that variant's flags); cpu_isa.cpp picks one at run time. Everything here has internal
// linkage or lives in hardneg::cpu_<variant>, so no two variants share a symbol and the linker can
// never hand one variant's code to another (cmake/check_cpu_variant_symbols.cmake checks it).
#include <cmath>
#include <limits>

#include "cpu_isa.h"
#include "hardneg/hardneg_loss_math.h"

#ifndef HARDNEG_CPU_VARIANT
#error "HARDNEG_CPU_VARIANT (baseline, avx2, avx512 or arch) is set by cmake/cpu.cmake"
#endif
#ifndef HARDNEG_CPU_VARIANT_NAME
#error "HARDNEG_CPU_VARIANT_NAME (the variant's name in build_info()) is set by cmake/cpu.cmake"
#endif
#define HARDNEG_CPU_CONCAT(a, b) a##b
#define HARDNEG_CPU_NAMESPACE(v) HARDNEG_CPU_CONCAT(cpu_, v)
#define HARDNEG_CPU_NS HARDNEG_CPU_NAMESPACE(HARDNEG_CPU_VARIANT)  // hardneg::cpu_<variant>

namespace hardneg {
namespace HARDNEG_CPU_NS {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Column range [lo, hi) of a row with the positive excluded: negatives only, so the inner loops
// carry no positive test and vectorise. The positive is handled once per row by the caller.
struct RowView {
  const float* s;
  const int64_t* col_ids;  // null when unmasked
  int64_t row_id;
  float c_neg;  // logit of a negative = c_neg * s (llave adds alpha * sg(s), a linear shift)
};

// The loops read the row through local copies of the RowView fields: through the reference GCC
// reloads r.s every iteration and vectorises the loads as gathers, 5-10x slower than plain loads.
template <bool kMask>
float max_range(const RowView& r, int64_t lo, int64_t hi, float m) {
  const float* s = r.s;
  const int64_t* ids = r.col_ids;
  const int64_t row_id = r.row_id;
  const float c_neg = r.c_neg;
#pragma omp simd reduction(max : m)
  for (int64_t j = lo; j < hi; ++j) {
    const bool masked = kMask && ids[j] == row_id;
    const float z = masked ? kNegInf : s[j] * c_neg;
    m = z > m ? z : m;  // a select, not std::fmax: that one stays a libm call per element
  }
  return m;
}

template <bool kMask>
float sum_exp_range(const RowView& r, int64_t lo, int64_t hi, float m) {
  const float* s = r.s;
  const int64_t* ids = r.col_ids;
  const int64_t row_id = r.row_id;
  const float c_neg = r.c_neg;
  float l = 0.0f;
#pragma omp simd reduction(+ : l)
  for (int64_t j = lo; j < hi; ++j) {
    const float e = hardneg_exp(s[j] * c_neg - m);
    const bool masked = kMask && ids[j] == row_id;
    l += masked ? 0.0f : e;
  }
  return l;
}

// dS_j = scale * P_j * amp_j for the negatives of [lo, hi), in place. scale folds 1/tau.
template <LossMode kMode, bool kMask>
void grad_range(float* s, const RowView& r, int64_t lo, int64_t hi, float lse, float s_pos,
                float scale, float beta, float margin) {
  const int64_t* ids = r.col_ids;
  const int64_t row_id = r.row_id;
  const float c_neg = r.c_neg;
#pragma omp simd
  for (int64_t j = lo; j < hi; ++j) {
    const float sj = s[j];
    float g = hardneg_exp(sj * c_neg - lse) * scale;
    if constexpr (kMode == LossMode::kEga) g *= hardneg_ega_amp(sj, s_pos, beta, margin);
    const bool masked = kMask && ids[j] == row_id;
    s[j] = masked ? 0.0f : g;
  }
}

float neg_coefficient(const HardnegLossParams& p) {
  return p.mode == LossMode::kLlave ? p.inv_tau + p.alpha : p.inv_tau;
}

bool has_mask(const HardnegLossParams& p) { return p.row_ids != nullptr && p.col_ids != nullptr; }

// (max, sum of exp(z - max)) of the unmasked negatives of a row, on both sides of the positive
// (pos may be outside the block). The positive is kept out: hardneg_row_loss combines them.
template <bool kMask>
void neg_stats(const RowView& r, int64_t cols, int64_t pos, float& m, float& l) {
  const int64_t split = pos < 0 ? 0 : (pos > cols ? cols : pos);
  const int64_t after = (pos >= 0 && pos < cols) ? pos + 1 : split;
  m = max_range<kMask>(r, 0, split, kNegInf);
  m = max_range<kMask>(r, after, cols, m);
  // m = -inf: no unmasked negative, or only NaN ones (the max skips NaN); the sum is then 0 or
  // NaN, so a NaN input is never hidden.
  l = sum_exp_range<kMask>(r, 0, split, m) + sum_exp_range<kMask>(r, after, cols, m);
}

// dS of row i in place, from its lse (the negatives' P = exp(z - lse)), s_pos and its loss L (the
// positive's exact expm1(-L) / tau).
template <LossMode kMode, bool kMask>
void grad_row(const HardnegLossParams& p, int64_t i, float lse, float s_pos, float loss) {
  float* s = p.s + i * p.ld_s;
  const RowView r{s, p.col_ids, kMask ? p.row_ids[i] : 0, neg_coefficient(p)};
  const float scale = p.grad_scale * (p.row_scale ? p.row_scale[i] : 1.0f) * p.inv_tau;
  const int64_t pos = p.pos_offset + i;
  const bool pos_here = pos >= 0 && pos < p.cols;
  const int64_t split = pos < 0 ? 0 : (pos > p.cols ? p.cols : pos);
  const int64_t after = pos_here ? pos + 1 : split;
  grad_range<kMode, kMask>(s, r, 0, split, lse, s_pos, scale, p.ega_beta, p.ega_margin);
  grad_range<kMode, kMask>(s, r, after, p.cols, lse, s_pos, scale, p.ega_beta, p.ega_margin);
  if (pos_here) {
    s[pos] =
        hardneg_pos_grad(loss, p.inv_tau) * p.grad_scale * (p.row_scale ? p.row_scale[i] : 1.0f);
  }
}

template <LossMode kMode, bool kMask>
void rows_impl(const HardnegLossParams& p) {
#pragma omp parallel for schedule(static) num_threads(p.num_threads) if (p.num_threads > 1)
  for (int64_t i = 0; i < p.rows; ++i) {
    const float* s = p.s + i * p.ld_s;
    const RowView r{s, p.col_ids, kMask ? p.row_ids[i] : 0, neg_coefficient(p)};
    const int64_t pos = p.pos_offset + i;
    const float s_pos = s[pos];
    const float z_pos = hardneg_logit(s_pos, true, kMode, p.inv_tau, p.alpha);
    float m, l;
    neg_stats<kMask>(r, p.cols, pos, m, l);
    const float loss = hardneg_row_loss(z_pos, m, l);
    const float lse = z_pos + loss;
    p.lse[i] = lse;
    p.z_pos[i] = z_pos;
    p.s_pos[i] = s_pos;
    p.loss[i] = loss;
    if (p.need_grad) grad_row<kMode, kMask>(p, i, lse, s_pos, loss);
  }
}

template <LossMode kMode, bool kMask>
void block_update_impl(const HardnegLossParams& p) {
#pragma omp parallel for schedule(static) num_threads(p.num_threads) if (p.num_threads > 1)
  for (int64_t i = 0; i < p.rows; ++i) {
    const float* s = p.s + i * p.ld_s;
    const RowView r{s, p.col_ids, kMask ? p.row_ids[i] : 0, neg_coefficient(p)};
    const int64_t pos = p.pos_offset + i;
    if (pos >= 0 && pos < p.cols) {
      p.s_pos[i] = s[pos];
      p.z_pos[i] = hardneg_logit(s[pos], true, kMode, p.inv_tau, p.alpha);
    }
    float m, l;
    neg_stats<kMask>(r, p.cols, pos, m, l);  // run_max / run_sum hold negatives only
    hardneg_lse_merge(p.run_max[i], p.run_sum[i], m, l);
  }
}

template <LossMode kMode, bool kMask>
void block_grad_impl(const HardnegLossParams& p) {
#pragma omp parallel for schedule(static) num_threads(p.num_threads) if (p.num_threads > 1)
  for (int64_t i = 0; i < p.rows; ++i) {
    // The saved statistics are the row's loss and s_pos: lse = z_pos + L.
    const float z_pos = hardneg_logit(p.s_pos[i], true, kMode, p.inv_tau, p.alpha);
    grad_row<kMode, kMask>(p, i, z_pos + p.loss[i], p.s_pos[i], p.loss[i]);
  }
}

// Turns the runtime mode and masking flag into template parameters.
template <template <LossMode, bool> class Kernel>
void dispatch(const HardnegLossParams& p) {
  const bool mask = has_mask(p);
  switch (p.mode) {
    case LossMode::kInfoNCE:
      return mask ? Kernel<LossMode::kInfoNCE, true>::run(p)
                  : Kernel<LossMode::kInfoNCE, false>::run(p);
    case LossMode::kLlave:
      return mask ? Kernel<LossMode::kLlave, true>::run(p)
                  : Kernel<LossMode::kLlave, false>::run(p);
    case LossMode::kEga:
      return mask ? Kernel<LossMode::kEga, true>::run(p) : Kernel<LossMode::kEga, false>::run(p);
  }
}

template <LossMode kMode, bool kMask>
struct RowsKernel {
  static void run(const HardnegLossParams& p) { rows_impl<kMode, kMask>(p); }
};
template <LossMode kMode, bool kMask>
struct BlockUpdateKernel {
  static void run(const HardnegLossParams& p) { block_update_impl<kMode, kMask>(p); }
};
template <LossMode kMode, bool kMask>
struct BlockGradKernel {
  static void run(const HardnegLossParams& p) { block_grad_impl<kMode, kMask>(p); }
};

void exp_impl(const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = hardneg_exp(x[i]);
}

}  // namespace

// This variant's entry points, found by cpu_isa.cpp under hardneg::cpu_<variant>::kCpuKernels.
extern const CpuKernels kCpuKernels;
const CpuKernels kCpuKernels = {
    HARDNEG_CPU_VARIANT_NAME,     kCompiledCpuFeatures,       &dispatch<RowsKernel>,
    &dispatch<BlockUpdateKernel>, &dispatch<BlockGradKernel>, &exp_impl,
};

}  // namespace HARDNEG_CPU_NS
}  // namespace hardneg
