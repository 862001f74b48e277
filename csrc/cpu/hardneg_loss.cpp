// Fused hard-negative loss on the CPU: logits, masking, logsumexp, loss and dL/dS of one similarity
// block in at most three sweeps of each row (ega: four, for a second logsumexp, of the amplified
// logits z + u of its gradient), OpenMP over rows, SIMD over columns. The B x N logits are never
// materialised: the caller hands row chunks (or column blocks) of S = Q C^T one at a time, and dS
// overwrites S in place (fp32) or goes to a separate bf16 / fp16 / fp32 buffer. Time
// O(rows * cols), extra memory O(1) per row.
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

// EGA's amplification of one row: z + u of a negative is hardneg_ega_logit(s, s_pos, ...).
struct EgaView {
  float s_pos;
  float inv_tau;
  float beta;
  float margin;
};

EgaView ega_view(const HardnegLossParams& p, float s_pos) {
  return EgaView{s_pos, p.inv_tau, p.ega_beta, p.ega_margin};
}

// EGA: the maxima of z and of z + u over the unmasked negatives of [lo, hi), merged into (m, m_u),
// in one sweep.
template <bool kMask>
void max_range_ega(const RowView& r, const EgaView& e, int64_t lo, int64_t hi, float& m_io,
                   float& m_u_io) {
  const float* s = r.s;
  const int64_t* ids = r.col_ids;
  const int64_t row_id = r.row_id;
  const float s_pos = e.s_pos, inv_tau = e.inv_tau, beta = e.beta, margin = e.margin;
  float m = m_io, m_u = m_u_io;
#pragma omp simd reduction(max : m, m_u)
  for (int64_t j = lo; j < hi; ++j) {
    const bool masked = kMask && ids[j] == row_id;
    const float z = masked ? kNegInf : s[j] * inv_tau;
    const float zu = masked ? kNegInf : hardneg_ega_logit(s[j], s_pos, inv_tau, beta, margin);
    m = z > m ? z : m;
    m_u = zu > m_u ? zu : m_u;
  }
  m_io = m;
  m_u_io = m_u;
}

// EGA: sum exp(z + u - m_u) over the unmasked negatives of [lo, hi). A loop of its own: the sum
// of exp(z - m) stays sum_exp_range's, so ega's loss is bitwise infonce's.
template <bool kMask>
float sum_exp_amplified_range(const RowView& r, const EgaView& e, int64_t lo, int64_t hi,
                              float m_u) {
  const float* s = r.s;
  const int64_t* ids = r.col_ids;
  const int64_t row_id = r.row_id;
  const float s_pos = e.s_pos, inv_tau = e.inv_tau, beta = e.beta, margin = e.margin;
  float l_u = 0.0f;
#pragma omp simd reduction(+ : l_u)
  for (int64_t j = lo; j < hi; ++j) {
    const float e_zu = hardneg_exp(hardneg_ega_logit(s[j], s_pos, inv_tau, beta, margin) - m_u);
    const bool masked = kMask && ids[j] == row_id;
    l_u += masked ? 0.0f : e_zu;
  }
  return l_u;
}

// dS_j = scale * Pbar_j for the negatives of [lo, hi) into out (the row of S itself, or of a
// separate dS buffer of kOut): exp(z_j - lse) for infonce and llave, exp(z_j + u_j - lse_u) for ega
// (lse is then lse_u). scale folds 1/tau.
template <LossMode kMode, bool kMask, DsDtype kOut>
void grad_range(typename DsElement<kOut>::Type* out, const RowView& r, const EgaView& e, int64_t lo,
                int64_t hi, float lse, float scale) {
  const float* s = r.s;
  const int64_t* ids = r.col_ids;
  const int64_t row_id = r.row_id;
  const float c_neg = r.c_neg;
  const float s_pos = e.s_pos, inv_tau = e.inv_tau, beta = e.beta, margin = e.margin;
#pragma omp simd
  for (int64_t j = lo; j < hi; ++j) {
    const float sj = s[j];
    float z;
    if constexpr (kMode == LossMode::kEga) {
      z = hardneg_ega_logit(sj, s_pos, inv_tau, beta, margin);
    } else {
      z = sj * c_neg;
    }
    const float g = hardneg_exp(z - lse) * scale;
    const bool masked = kMask && ids[j] == row_id;
    out[j] = hardneg_ds_value<kOut>(masked ? 0.0f : g);
  }
}

bool has_mask(const HardnegLossParams& p) { return p.row_ids != nullptr && p.col_ids != nullptr; }

// The negatives of a row of `cols` columns whose positive is column pos (possibly outside the
// block): [0, split) and [after, cols), so the inner loops carry no positive test.
struct NegRanges {
  int64_t split;
  int64_t after;
  NegRanges(int64_t cols, int64_t pos)
      : split(pos < 0 ? 0 : (pos > cols ? cols : pos)),
        after((pos >= 0 && pos < cols) ? pos + 1 : split) {}
};

// (max, sum of exp(z - max)) of the unmasked negatives of a row, on both sides of the positive
// (pos may be outside the block). The positive is kept out: hardneg_row_loss combines them.
template <bool kMask>
void neg_stats(const RowView& r, int64_t cols, int64_t pos, float& m, float& l) {
  const NegRanges n(cols, pos);
  m = max_range<kMask>(r, 0, n.split, kNegInf);
  m = max_range<kMask>(r, n.after, cols, m);
  // m = -inf: no unmasked negative, or only NaN ones (the max skips NaN); the sum is then 0 or
  // NaN, so a NaN input is never hidden.
  l = sum_exp_range<kMask>(r, 0, n.split, m) + sum_exp_range<kMask>(r, n.after, cols, m);
}

// EGA: neg_stats of z (m, l), bitwise neg_stats' (a max is exact in any order, and the sum is
// sum_exp_range itself), and of the amplified z + u (m_u, l_u): one sweep more than neg_stats.
template <bool kMask>
void neg_stats_ega(const RowView& r, const EgaView& e, int64_t cols, int64_t pos, float& m,
                   float& l, float& m_u, float& l_u) {
  const NegRanges n(cols, pos);
  m = m_u = kNegInf;
  max_range_ega<kMask>(r, e, 0, n.split, m, m_u);
  max_range_ega<kMask>(r, e, n.after, cols, m, m_u);
  l = sum_exp_range<kMask>(r, 0, n.split, m) + sum_exp_range<kMask>(r, n.after, cols, m);
  l_u = sum_exp_amplified_range<kMask>(r, e, 0, n.split, m_u) +
        sum_exp_amplified_range<kMask>(r, e, n.after, cols, m_u);
}

// dS of row i into out, from the statistics of its gradient's softmax: lse (the negatives' Pbar =
// exp(z - lse); for ega lse_u, of z + u) and that softmax's row loss L (L_u for ega; the
// positive's exact expm1(-L) / tau), and s_pos (ega's u).
template <LossMode kMode, bool kMask, DsDtype kOut>
void grad_row_to(const HardnegLossParams& p, int64_t i, typename DsElement<kOut>::Type* out,
                 float lse, float s_pos, float loss) {
  const RowView r{p.s + i * p.ld_s, p.col_ids, kMask ? p.row_ids[i] : 0,
                  hardneg_neg_coefficient(kMode, p.inv_tau, p.alpha)};
  const EgaView e = ega_view(p, s_pos);
  const float row_factor = p.grad_scale * (p.row_scale ? p.row_scale[i] : 1.0f);
  const float scale = row_factor * p.inv_tau;
  const int64_t pos = p.pos_offset + i;
  const NegRanges n(p.cols, pos);
  grad_range<kMode, kMask, kOut>(out, r, e, 0, n.split, lse, scale);
  grad_range<kMode, kMask, kOut>(out, r, e, n.after, p.cols, lse, scale);
  if (pos >= 0 && pos < p.cols) {
    out[pos] = hardneg_ds_value<kOut>(hardneg_pos_grad(loss, p.inv_tau) * row_factor);
  }
}

// dS of row i in place of S, or into row i of p.ds in p.ds_dtype (chosen per row, outside the
// vectorised loops).
template <LossMode kMode, bool kMask>
void grad_row(const HardnegLossParams& p, int64_t i, float lse, float s_pos, float loss) {
  if (p.ds == nullptr) {
    return grad_row_to<kMode, kMask, DsDtype::kFloat32>(p, i, p.s + i * p.ld_s, lse, s_pos, loss);
  }
  switch (p.ds_dtype) {
    case DsDtype::kFloat32:
      return grad_row_to<kMode, kMask, DsDtype::kFloat32>(
          p, i, static_cast<float*>(p.ds) + i * p.ld_ds, lse, s_pos, loss);
    case DsDtype::kBFloat16:
      return grad_row_to<kMode, kMask, DsDtype::kBFloat16>(
          p, i, static_cast<uint16_t*>(p.ds) + i * p.ld_ds, lse, s_pos, loss);
    case DsDtype::kFloat16:
      return grad_row_to<kMode, kMask, DsDtype::kFloat16>(
          p, i, static_cast<uint16_t*>(p.ds) + i * p.ld_ds, lse, s_pos, loss);
  }
}

template <LossMode kMode, bool kMask>
void rows_impl(const HardnegLossParams& p) {
#pragma omp parallel for schedule(static) num_threads(p.num_threads) if (p.num_threads > 1)
  for (int64_t i = 0; i < p.rows; ++i) {
    const float* s = p.s + i * p.ld_s;
    const RowView r{s, p.col_ids, kMask ? p.row_ids[i] : 0,
                    hardneg_neg_coefficient(kMode, p.inv_tau, p.alpha)};
    const int64_t pos = p.pos_offset + i;
    const float s_pos = s[pos];
    const float z_pos = hardneg_logit(s_pos, true, kMode, p.inv_tau, p.alpha);
    float m, l;
    float loss, grad_loss;  // the row's loss, and that of its gradient's softmax (L_u for ega)
    if constexpr (kMode == LossMode::kEga) {
      float m_u, l_u;
      neg_stats_ega<kMask>(r, ega_view(p, s_pos), p.cols, pos, m, l, m_u, l_u);
      loss = hardneg_row_loss(z_pos, m, l);
      grad_loss = hardneg_row_loss(z_pos, m_u, l_u);
      if (p.ega_loss) p.ega_loss[i] = grad_loss;
    } else {
      neg_stats<kMask>(r, p.cols, pos, m, l);
      loss = grad_loss = hardneg_row_loss(z_pos, m, l);
    }
    p.lse[i] = z_pos + loss;
    p.z_pos[i] = z_pos;
    p.s_pos[i] = s_pos;
    p.loss[i] = loss;
    if (p.need_grad) grad_row<kMode, kMask>(p, i, z_pos + grad_loss, s_pos, grad_loss);
  }
}

template <LossMode kMode, bool kMask>
void block_update_impl(const HardnegLossParams& p) {
#pragma omp parallel for schedule(static) num_threads(p.num_threads) if (p.num_threads > 1)
  for (int64_t i = 0; i < p.rows; ++i) {
    const float* s = p.s + i * p.ld_s;
    const RowView r{s, p.col_ids, kMask ? p.row_ids[i] : 0,
                    hardneg_neg_coefficient(kMode, p.inv_tau, p.alpha)};
    const int64_t pos = p.pos_offset + i;
    if (pos >= 0 && pos < p.cols) {
      p.s_pos[i] = s[pos];
      p.z_pos[i] = hardneg_logit(s[pos], true, kMode, p.inv_tau, p.alpha);
    }
    float m, l;  // run_max / run_sum (and ega's run_max_u / run_sum_u) hold negatives only
    if constexpr (kMode == LossMode::kEga) {
      // s_ip: just read from this block, or recorded by the block swept first (the caller's
      // contract, hardneg_loss.h).
      float m_u, l_u;
      neg_stats_ega<kMask>(r, ega_view(p, p.s_pos[i]), p.cols, pos, m, l, m_u, l_u);
      hardneg_lse_merge(p.run_max_u[i], p.run_sum_u[i], m_u, l_u);
    } else {
      neg_stats<kMask>(r, p.cols, pos, m, l);
    }
    hardneg_lse_merge(p.run_max[i], p.run_sum[i], m, l);
  }
}

template <LossMode kMode, bool kMask>
void block_grad_impl(const HardnegLossParams& p) {
#pragma omp parallel for schedule(static) num_threads(p.num_threads) if (p.num_threads > 1)
  for (int64_t i = 0; i < p.rows; ++i) {
    // The saved statistics are s_pos and the row loss of the gradient's softmax: lse = z_pos + L
    // (ega: lse_u = z_pos + L_u).
    const float z_pos = hardneg_logit(p.s_pos[i], true, kMode, p.inv_tau, p.alpha);
    const float grad_loss = kMode == LossMode::kEga ? p.ega_loss[i] : p.loss[i];
    grad_row<kMode, kMask>(p, i, z_pos + grad_loss, p.s_pos[i], grad_loss);
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

template <DsDtype kOut>
void round_loop(const float* x, typename DsElement<kOut>::Type* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = hardneg_ds_value<kOut>(x[i]);
}

void round_impl(const float* x, void* y, int64_t n, DsDtype dtype) {
  switch (dtype) {
    case DsDtype::kFloat32:
      return round_loop<DsDtype::kFloat32>(x, static_cast<float*>(y), n);
    case DsDtype::kBFloat16:
      return round_loop<DsDtype::kBFloat16>(x, static_cast<uint16_t*>(y), n);
    case DsDtype::kFloat16:
      return round_loop<DsDtype::kFloat16>(x, static_cast<uint16_t*>(y), n);
  }
}

}  // namespace

// This variant's entry points, found by cpu_isa.cpp under hardneg::cpu_<variant>::kCpuKernels.
extern const CpuKernels kCpuKernels;
const CpuKernels kCpuKernels = {
    HARDNEG_CPU_VARIANT_NAME,
    kCompiledCpuFeatures,
    &dispatch<RowsKernel>,
    &dispatch<BlockUpdateKernel>,
    &dispatch<BlockGradKernel>,
    &exp_impl,
    &round_impl,
};

}  // namespace HARDNEG_CPU_NS
}  // namespace hardneg
