// Scalar math of the hard-negative loss family, shared verbatim by the CPU and CUDA kernels so the
// CPU tests exercise the formulas the GPU runs. Design section 1, with EGA renormalised:
//   z_ij = s_ij / tau + [j != p(i)] * alpha * sg(s_ij)        (llave; infonce and ega: s_ij / tau)
//   L_i = logsumexp_j z_ij - z_{i,p(i)}
//   dL_i/ds_ij = (Pbar_ij - Y_ij) / tau with Pbar = P = softmax_j(z), except for ega:
//   Pbar_ij = softmax_j(z_ij + u_ij), u_ij = beta * max(0, s_ij - s_{i,p(i)} + margin) on
//   negatives, u_{i,p(i)} = 0, u held constant (EGA reconstruction: hardness relative to the
//   positive; the value stays InfoNCE's).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "hardneg/hardneg_loss.h"

// Host functions have internal linkage (static): the CPU kernels are compiled once per ISA
// (csrc/cpu/cpu_isa.h), and an inline function with external linkage would be merged by the
// linker into one copy, compiled for whichever ISA it came from, and shared by all of them.
#if defined(__CUDACC__)
#define HN_HD __host__ __device__ __forceinline__
#else
#define HN_HD static inline
#endif

namespace hardneg {

// a * b + c for the CPU exp: one rounding (fmaf) where the target has an FMA instruction (x86 with
// FMA, i.e. the avx2 / avx512 variants; every aarch64), else two. Without the instruction fmaf is
// a libm call that blocks vectorisation; the two-rounding form keeps the x86-64 baseline variant
// vectorised (SSE2), as accurate here: 0.99 ulp max error measured, 1.02 with FMA
// (tests/cpu_isa_worker.py). The C function, not std::fma: that one is an inline wrapper with
// external linkage (see HN_HD).
static inline float hardneg_fma_cpu(float a, float b, float c) {
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
  return fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

// exp for the CPU kernels: inline, branch-free code that GCC and Clang vectorise inside `omp simd`
// loops. libm's expf is an opaque call there; its libmvec SIMD variants are only declared under
// -ffast-math, which would also assume no infinities, and the kernels rely on exp(-inf) = 0 for
// masked entries. Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, then a degree-7 polynomial
// for exp(r) (Cephes expf coefficients): error ~1 ulp (1.02 measured) of the exact exp down to
// -87.3 (tests/test_kernel_math.py). Below that (results under 1.22e-38, near subnormal) it returns
// 0: the loss computes exp(z - max) of every logit and subnormal arithmetic costs ~100 cycles on
// x86 cores, for contributions far below fp32's resolution of the row sum. exp(-inf) = 0, exp(+inf)
// = +inf, overflow gives +inf, NaN propagates.
static inline float hardneg_expf_cpu(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;  // ln 2 split so that n * kLn2Hi is exact for |n| < 2^9
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  constexpr float kMinX = -87.3f;        // e^kMinX = 1.22e-38 > FLT_MIN = 1.18e-38
  // Clamped so that 2^n stays representable below and no subnormal is ever formed. Written as
  // selects (not fmin / fmax) so that a NaN x stays NaN.
  float xc = x < kMinX ? kMinX : x;
  xc = xc > 89.0f ? 89.0f : xc;
  const float t = xc * kLog2e + kRound;
  const float n = t - kRound;
  int32_t t_bits;
  std::memcpy(&t_bits, &t, sizeof t_bits);
  const int32_t n_int = t_bits - 0x4B400000;  // the integer n, from the low mantissa bits of t
  const float r = hardneg_fma_cpu(n, -kLn2Lo, hardneg_fma_cpu(n, -kLn2Hi, xc));
  float p = 1.9875691500e-4f;
  p = hardneg_fma_cpu(p, r, 1.3981999507e-3f);
  p = hardneg_fma_cpu(p, r, 8.3334519073e-3f);
  p = hardneg_fma_cpu(p, r, 4.1665795894e-2f);
  p = hardneg_fma_cpu(p, r, 1.6666665459e-1f);
  p = hardneg_fma_cpu(p, r, 5.0000001201e-1f);
  p = hardneg_fma_cpu(p * r, r, r) + 1.0f;
  // 2^n = 2^a * 2^b with a = n / 2, b = n - a: n reaches 128 near the overflow threshold.
  const int32_t a = n_int >> 1;
  const int32_t b = n_int - a;
  const int32_t a_bits = (a + 127) << 23;
  const int32_t b_bits = (b + 127) << 23;
  float scale_a, scale_b;
  std::memcpy(&scale_a, &a_bits, sizeof scale_a);
  std::memcpy(&scale_b, &b_bits, sizeof scale_b);
  return x < kMinX ? 0.0f : p * scale_a * scale_b;
}

// exp of the shared math: the device's expf on the GPU, hardneg_expf_cpu on the host, so the CPU
// loops that call the helpers below still vectorise.
HN_HD float hardneg_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return hardneg_expf_cpu(x);
#endif
}

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

// EGA's amplified logit of a negative, z + u = s / tau + beta * max(0, s - s_pos + margin): the
// logit of its gradient's softmax Pbar. A select, not fmaxf, so the CPU loops vectorise; a NaN s
// gives a NaN logit.
HN_HD float hardneg_ega_logit(float s, float s_pos, float inv_tau, float beta, float margin) {
  const float h = s - s_pos + margin;
  return s * inv_tau + (h > 0.0f ? beta * h : 0.0f);
}

// Loss of one row, L = log(exp(z_pos) + sum_j exp(z_j)) - z_pos, from the positive's logit and the
// online (max, sum) state (m_neg, l_neg) of its unmasked negatives, with nothing cancelling. The
// plain lse - z_pos subtracts two numbers near 50 (tau = 0.02) and keeps ~1e-6 absolute accuracy,
// i.e. none on a confident row whose L is 1e-7. With d = m_neg - z_pos:
//   d <= 0 (the positive leads):  L = log1p(l_neg exp(d)),         exact to a few ulp of L;
//   d > 0:                        L = d + log(l_neg + exp(-d)),    L > d > 0, no cancellation.
// No unmasked negative (l_neg = 0): L = 0, or NaN when z_pos is (a NaN input stays visible). A NaN
// among the negatives reaches l_neg (the callers sum exp(NaN)) and so L.
HN_HD float hardneg_row_loss(float z_pos, float m_neg, float l_neg) {
  if (l_neg == 0.0f) return z_pos - z_pos;
  const float d = m_neg - z_pos;
  if (d <= 0.0f) return log1pf(l_neg * hardneg_exp(d));
  return d + logf(l_neg + hardneg_exp(-d));
}

// Gradient of the positive w.r.t. s, before the row scale: (P_pos - 1) / tau = -(the negatives'
// total probability) / tau = expm1(-L) / tau, exact where P_pos - 1 would cancel (P_pos ~ 1).
// For ega, L is the amplified row's loss L_u (hardneg_row_loss over z + u): (Pbar_pos - 1) / tau.
HN_HD float hardneg_pos_grad(float loss, float inv_tau) { return expm1f(-loss) * inv_tau; }

// Merge of two online logsumexp states (m, l): sum = l * exp(m - m_new) + l2 * exp(m2 - m_new).
HN_HD void hardneg_lse_merge(float& m, float& l, float m2, float l2) {
  if (m2 == -INFINITY) return;
  if (m == -INFINITY) {
    m = m2;
    l = l2;
    return;
  }
  const float m_new = m > m2 ? m : m2;
  l = l * hardneg_exp(m - m_new) + l2 * hardneg_exp(m2 - m_new);
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

// The bits of an fp32 value (the device's reinterpretation intrinsic; memcpy on the host).
HN_HD uint32_t hardneg_float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

// fp32 -> bf16 and fp32 -> fp16 bits, rounded to nearest, ties to even: the bits of torch's
// .to(torch.bfloat16) / .to(torch.float16) for every non-NaN fp32 value, subnormals kept (no
// flush), overflow to +-inf (fp16 from 65520 on: the tie above 65504 rounds to the even, inf). A
// NaN stays a quiet NaN of its sign with its top payload bits, as the hardware conversions keep it
// (torch's own NaN bits differ between its scalar and vector code, so only NaN-ness is promised).
// Integer arithmetic and selects, one formula for the CPU loops (which it leaves vectorisable) and
// the CUDA kernels. tests/test_kernel_math.py holds both against torch.
HN_HD uint16_t hardneg_round_bf16(float x) {
  const uint32_t u = hardneg_float_bits(x);
  // Adding 0x7fff plus the kept part's lowest bit carries into the kept 16 bits exactly when the
  // dropped 16 are above half, or at half with an odd kept part; a carry out of the mantissa
  // steps the exponent (up to inf) as it should.
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

HN_HD uint16_t hardneg_round_fp16(float x) {
  const uint32_t u = hardneg_float_bits(x);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  // |x| >= 2^-14 (fp16 normals): rebias the exponent (127 -> 15, i.e. minus 112 << 23), then
  // round away the 13 low mantissa bits as hardneg_round_bf16 does its 16. Only used when a >=
  // 0x38800000, so the subtraction never wraps where it matters.
  const uint32_t n = a - 0x38000000u;
  const uint32_t normal = (n + 0xfffu + ((n >> 13) & 1u)) >> 13;
  // |x| < 2^-14 (fp16 subnormals, units of 2^-24): the significand with its implicit bit, m =
  // mant * 2^(e - 126), shifted right by 126 - e and rounded the same way. The shift is capped at
  // 31 (|x| < 2^-32, fp32 subnormals included, all round to 0: mant < 2^24 stays below half).
  const uint32_t e = a >> 23;
  const uint32_t shift = e > 112u ? 14u : (e < 95u ? 31u : 126u - e);
  const uint32_t mant = (a & 0x7fffffu) | 0x800000u;
  const uint32_t subnormal = (mant + ((1u << (shift - 1u)) - 1u) + ((mant >> shift) & 1u)) >> shift;
  uint32_t h = a >= 0x38800000u ? normal : subnormal;  // a carry to 0x400 is the smallest normal
  h = a >= 0x477ff000u ? 0x7c00u : h;                  // 65520 and up, inf included: inf
  h = a > 0x7f800000u ? 0x7e00u | ((a >> 13) & 0x3ffu) : h;  // NaN
  return static_cast<uint16_t>(sign | h);
}

// A dS output's element type (DsDtype): fp32 as is, bf16 / fp16 as their bits.
template <DsDtype kDtype>
struct DsElement {
  using Type = uint16_t;
};
template <>
struct DsElement<DsDtype::kFloat32> {
  using Type = float;
};

// The value stored for the fp32 gradient g in a dS output of kDtype.
template <DsDtype kDtype>
HN_HD typename DsElement<kDtype>::Type hardneg_ds_value(float g) {
  if constexpr (kDtype == DsDtype::kBFloat16) {
    return hardneg_round_bf16(g);
  } else if constexpr (kDtype == DsDtype::kFloat16) {
    return hardneg_round_fp16(g);
  } else {
    return g;
  }
}

}  // namespace hardneg
