// fp64 reference of one similarity block's loss statistics and dL/dS (design section 1; ega's
// Pbar renormalised, README "The loss"), written out plainly for the host tests of the CUDA
// kernels, with the inputs those tests use.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "hardneg/hardneg_loss.h"

namespace ref {

struct Case {
  int64_t rows = 0, cols = 0, ld = 0, pos_offset = 0;
  int mode = 0;  // LossMode code
  bool mask = false;
  // beta and margin: hardneg's EGA defaults (hardneg/_constants.py).
  float inv_tau = 50.0f, alpha = 9.0f, beta = 50.0f, margin = 0.3f, grad_scale = 0.25f;
  std::vector<float> s;  // rows x ld, padding filled with NaN (must never be read)
  std::vector<int64_t> row_ids, col_ids;
  std::vector<float> row_scale;
};

// Deterministic inputs: similarities in [-0.3, 0.5], the positive (column pos_offset + i) higher,
// some negatives just below or above it (EGA's amplification active). masking: 0 none, 1 ids that
// repeat (about a third of the negatives masked), 2 every negative of every row masked.
inline Case make_case(int64_t rows, int64_t cols, int64_t pad, int mode, int masking,
                      uint64_t seed) {
  Case c;
  c.rows = rows;
  c.cols = cols;
  c.ld = cols + pad;
  c.mode = mode;
  c.mask = masking > 0;
  uint64_t state = seed * 0x9E3779B97F4A7C15ull + 1;
  auto uniform = [&] {  // splitmix64 -> [0, 1)
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return static_cast<double>((z ^ (z >> 31)) >> 11) / 9007199254740992.0;
  };
  c.pos_offset = cols >= rows ? (cols - rows) / 2 : 0;
  c.s.assign(static_cast<size_t>(rows * c.ld), NAN);
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t pos = (c.pos_offset + i) % cols;
    for (int64_t j = 0; j < cols; ++j) {
      double v = -0.3 + 0.8 * uniform();
      if (j == pos) v = 0.6 + 0.3 * uniform();
      if (j != pos && uniform() < 0.1) v = 0.55 + 0.2 * uniform();  // hard negatives
      c.s[i * c.ld + j] = static_cast<float>(v);
    }
  }
  // The positive of row i must be column pos_offset + i: rows beyond cols would fall outside.
  if (c.pos_offset + rows > cols) c.rows = rows = cols - c.pos_offset;
  c.row_scale.resize(rows);
  for (int64_t i = 0; i < rows; ++i) c.row_scale[i] = static_cast<float>(0.5 + uniform());
  if (c.mask) {
    c.col_ids.resize(cols);
    c.row_ids.resize(rows);
    for (int64_t j = 0; j < cols; ++j) {
      c.col_ids[j] = masking == 2 ? 7 : static_cast<int64_t>(uniform() * 3);
    }
    for (int64_t i = 0; i < rows; ++i) c.row_ids[i] = c.col_ids[c.pos_offset + i];
  }
  return c;
}

inline hardneg::HardnegLossParams params_for(const Case& c) {
  hardneg::HardnegLossParams p;
  p.rows = c.rows;
  p.cols = c.cols;
  p.ld_s = c.ld;
  p.pos_offset = c.pos_offset;
  p.row_ids = c.mask ? c.row_ids.data() : nullptr;
  p.col_ids = c.mask ? c.col_ids.data() : nullptr;
  p.mode = static_cast<hardneg::LossMode>(c.mode);
  p.inv_tau = c.inv_tau;
  p.alpha = c.alpha;
  p.ega_beta = c.beta;
  p.ega_margin = c.margin;
  p.grad_scale = c.grad_scale;
  p.row_scale = c.row_scale.data();
  return p;
}

// What a kernel run produced (fp32, gradient unpadded to rows x cols). ega_loss: ega's L_u.
struct Result {
  std::vector<float> lse, loss, z_pos, s_pos, ega_loss, grad;
  Result(int64_t rows, int64_t cols)
      : lse(rows, NAN),
        loss(rows, NAN),
        z_pos(rows, NAN),
        s_pos(rows, NAN),
        ega_loss(rows, NAN),
        grad(rows * cols) {}
  void take_grad(const std::vector<float>& s, const Case& c) {
    for (int64_t i = 0; i < c.rows; ++i) {
      for (int64_t j = 0; j < c.cols; ++j) grad[i * c.cols + j] = s[i * c.ld + j];
    }
  }
};

// ega_loss: L_u = logsumexp_j (z_ij + u_ij) - z_pos for ega (the amplified row's loss), else L.
struct Exact {
  std::vector<double> lse, loss, z_pos, s_pos, ega_loss, grad;
};

// logsumexp over the live entries of v.
inline double live_lse(const std::vector<double>& v, const std::vector<bool>& live) {
  double m = -INFINITY;
  for (size_t j = 0; j < v.size(); ++j) {
    if (live[j]) m = std::fmax(m, v[j]);
  }
  double sum = 0.0;
  for (size_t j = 0; j < v.size(); ++j) sum += live[j] ? std::exp(v[j] - m) : 0.0;
  return m + std::log(sum);
}

inline Exact exact(const Case& c) {
  Exact e;
  const double inv_tau = c.inv_tau;
  for (int64_t i = 0; i < c.rows; ++i) {
    const int64_t pos = c.pos_offset + i;
    const double s_pos = c.s[i * c.ld + pos];
    std::vector<double> z(c.cols), zu(c.cols);
    std::vector<bool> live(c.cols);
    for (int64_t j = 0; j < c.cols; ++j) {
      const double s = c.s[i * c.ld + j];
      live[j] = j == pos || !(c.mask && c.col_ids[j] == c.row_ids[i]);
      z[j] = s * inv_tau + (c.mode == 1 && j != pos ? c.alpha * s : 0.0);
      // ega's gradient softmax: z + u, u = beta * max(0, s - s_pos + margin) on negatives.
      const double h = s - s_pos + c.margin;
      zu[j] = z[j] + (c.mode == 2 && j != pos && h > 0.0 ? c.beta * h : 0.0);
    }
    const double lse = live_lse(z, live);
    const double lse_u = live_lse(zu, live);
    e.lse.push_back(lse);
    e.z_pos.push_back(z[pos]);
    e.s_pos.push_back(s_pos);
    e.loss.push_back(lse - z[pos]);
    e.ega_loss.push_back(lse_u - z[pos]);
    const double factor = static_cast<double>(c.grad_scale) * c.row_scale[i];
    for (int64_t j = 0; j < c.cols; ++j) {
      const double pbar = live[j] ? std::exp(zu[j] - lse_u) : 0.0;  // P itself but for ega
      e.grad.push_back(factor * inv_tau * (j == pos ? pbar - 1.0 : pbar));
    }
  }
  return e;
}

}  // namespace ref
