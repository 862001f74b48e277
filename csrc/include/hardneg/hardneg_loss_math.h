// Scalar math of the hard-negative loss family, shared verbatim by the CPU and CUDA kernels so the
// CPU tests exercise the formulas the GPU runs. Design section 1:
//   z_ij = s_ij / tau + [j != p(i)] * alpha * sg(s_ij)        (llave; infonce and ega: s_ij / tau)
//   dL_i/ds_ij = (Pbar_ij - Y_ij) / tau, Pbar = P except ega: P_ij * exp(beta * max(0, h +
//   margin)), h_ij = s_ij - s_{i,p(i)} (EGA reconstruction: hardness relative to the positive).
#pragma once

#include <cmath>

#include "hardneg/hardneg_loss.h"

#if defined(__CUDACC__)
#define HN_HD __host__ __device__ __forceinline__
#else
#define HN_HD inline
#endif

namespace hardneg {

// Logit of one entry; masked entries are handled by the caller (they contribute exp(-inf) = 0).
HN_HD float hardneg_logit(float s, bool is_pos, LossMode mode, float inv_tau, float alpha) {
  const float shift = (mode == LossMode::kLlave && !is_pos) ? alpha * s : 0.0f;
  return s * inv_tau + shift;
}

// Logit of a negative divided by s: llave adds alpha * sg(s), a linear shift, so z = c_neg * s for
// every negative and the inner loops multiply once.
HN_HD float hardneg_neg_coefficient(LossMode mode, float inv_tau, float alpha) {
  return mode == LossMode::kLlave ? inv_tau + alpha : inv_tau;
}

// EGA amplification of a negative's probability (1 for other modes and for the positive).
HN_HD float hardneg_ega_amp(float s, float s_pos, float beta, float margin) {
  const float h = s - s_pos + margin;
  return h > 0.0f ? expf(beta * h) : 1.0f;
}

// Gradient of one entry w.r.t. s, before the row scale: (Pbar - Y) / tau.
HN_HD float hardneg_grad(float p, bool is_pos, float amp, float inv_tau) {
  return is_pos ? (p - 1.0f) * inv_tau : p * amp * inv_tau;
}

// Merge of two online logsumexp states (m, l): sum = l * exp(m - m_new) + l2 * exp(m2 - m_new).
HN_HD void hardneg_lse_merge(float& m, float& l, float m2, float l2) {
  if (m2 == -INFINITY) return;
  if (m == -INFINITY) {
    m = m2;
    l = l2;
    return;
  }
  const float m_new = m > m2 ? m : m2;
  l = l * expf(m - m_new) + l2 * expf(m2 - m_new);
  m = m_new;
}

// Pushes one finite logit z into an online logsumexp state (m, l), one exp per element: the GPU
// kernels sweep a row once for its statistics instead of a max pass and a sum pass.
HN_HD void hardneg_lse_push(float& m, float& l, float z) {
  if (z > m) {
    l = l * expf(m - z) + 1.0f;  // m = -inf at the start: exp(-inf) = 0, so l becomes 1
    m = z;
  } else {
    l += expf(z - m);
  }
}

}  // namespace hardneg
