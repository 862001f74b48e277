// The CUDA loss kernels of csrc/cuda, compiled for the host (cuda_emu.h) and launched through the
// real dispatch (hardneg_loss.cpp, kernel_image.cpp) on the emulated driver, against an fp64
// reference of the loss (design section 1) on awkward shapes: one row, 1 / 31 / 32 / 33 / 1024 /
// 1025 / 3000 columns, a row stride wider than the row, rows with every negative masked, every
// mode, with and without masking, the row schedule and the ring's column-block schedule (blocks
// merged in a rotated order that starts, as the ring does, with the block holding the positives).
// Every one of the 36 kernel instances must have run.
//
// Tolerance: fp32 against fp64. Logits reach 1/tau + alpha = 59 (ega's amplified z + u about 60
// at beta 50, margin 0.3 on these inputs), where one fp32 ulp is 3.8e-6, so lse, loss, z_pos and
// ega's L_u may differ by a few ulp of 59: 6e-5 absolute (16 ulp). dS_ij = Pbar_ij / tau: its
// error follows from Pbar's relative error (a few ulp of the logit): 1e-4 of the row's largest
// |dS| (at tau = 0.02 P's relative error is ~60 ulp of fp32 = 4e-6, x 25 headroom). A 0.1 % change
// of tau moves the loss by ~1e-3 and fails both, and a 1 % change of ega's beta fails dS: the
// perturbation checks below.
//
// dS written apart from S (p.ds, bf16 / fp16 / fp32, a row stride 3 wider than the row): bit for
// bit the in-place fp32 dS of the same schedule rounded by hardneg_ds_value, with S and the
// padding untouched. With HARDNEG_EMU_DUMP=<dir> each such pair is also written there, so
// test_cuda_emu.py can hold the bf16 / fp16 output against torch's .to() of the fp32 one.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "emu_driver.h"
#include "emu_reference.h"
#include "hardneg/hardneg_loss_math.h"
#include "hardneg_loss.h"
#include "hardneg_loss_kernels.h"
#include "kernel_image.h"

namespace {

int g_passed = 0, g_failed = 0;

void check(bool ok, const std::string& what) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("FAIL %s\n", what.c_str());
  }
}

using ref::Case;
using ref::Result;

constexpr uint8_t kUnwritten = 0xA5;  // the fill of a dS output's bytes before a run

// A dS output apart from S: rows x ld elements of `dtype`, ld = cols + 3 (padding that must stay
// unwritten), and whether the run left S as it was.
struct DsOut {
  hardneg::DsDtype dtype;
  int64_t ld;
  std::vector<uint8_t> bytes;
  bool s_untouched = false;
  DsOut(const Case& c, hardneg::DsDtype d)
      : dtype(d), ld(c.cols + 3), bytes(static_cast<size_t>(c.rows * ld) * elem(), kUnwritten) {}
  size_t elem() const { return dtype == hardneg::DsDtype::kFloat32 ? 4 : 2; }
};

void set_ds(hardneg::HardnegLossParams& p, DsOut* ds) {
  if (ds == nullptr) return;
  p.ds = ds->bytes.data();
  p.ld_ds = ds->ld;
  p.ds_dtype = ds->dtype;
}

// Row schedule through hardneg_loss_rows_cuda; S is overwritten with dS, or dS goes to ds.
Result run_rows(const Case& c, DsOut* ds = nullptr) {
  std::vector<float> s = c.s;
  Result out(c.rows, c.cols);
  hardneg::HardnegLossParams p = ref::params_for(c);
  set_ds(p, ds);
  p.s = s.data();
  p.lse = out.lse.data();
  p.loss = out.loss.data();
  p.z_pos = out.z_pos.data();
  p.s_pos = out.s_pos.data();
  if (c.mode == 2) p.ega_loss = out.ega_loss.data();
  p.need_grad = true;
  emu::register_device_memory(s.data(), s.size() * sizeof(float), 0);
  hardneg::hardneg_loss_rows_cuda(p);
  emu::clear_device_memory();
  out.take_grad(s, c);
  if (ds) ds->s_untouched = std::memcmp(s.data(), c.s.data(), s.size() * sizeof(float)) == 0;
  return out;
}

// Column-block schedule: update over the blocks in a rotated order that starts, as the ring does
// with its own block, at the block holding every row's positive (ega's u needs s_pos first); the
// loss (and ega's L_u) from z_pos and the negatives' running (max, sum) as the ring finishes it
// (hardneg_row_loss); then grad block by block from s_pos and the gradient softmax's row loss.
Result run_blocks(const Case& c, const std::vector<int64_t>& widths, DsOut* ds = nullptr) {
  std::vector<float> s = c.s;
  Result out(c.rows, c.cols);
  std::vector<float> run_max(c.rows, -INFINITY), run_sum(c.rows, 0.0f);
  std::vector<float> run_max_u(c.rows, -INFINITY), run_sum_u(c.rows, 0.0f);
  std::vector<int64_t> starts;
  int64_t start = 0;
  size_t first = 0;
  for (size_t b = 0; b < widths.size(); ++b) {
    starts.push_back(start);
    if (start <= c.pos_offset && c.pos_offset < start + widths[b]) first = b;
    start += widths[b];
  }
  const size_t nb = widths.size();
  const int64_t first_end = starts[first] + widths[first];
  check(c.pos_offset + c.rows <= first_end, "the first block holds every row's positive");
  emu::register_device_memory(s.data(), s.size() * sizeof(float), 0);
  for (int pass = 0; pass < 2; ++pass) {
    for (size_t k = 0; k < nb; ++k) {
      const size_t b = (first + k) % nb;
      hardneg::HardnegLossParams p = ref::params_for(c);
      p.s = s.data() + starts[b];
      p.cols = widths[b];
      p.pos_offset = c.pos_offset - starts[b];
      if (p.col_ids) p.col_ids = c.col_ids.data() + starts[b];
      p.z_pos = out.z_pos.data();
      p.s_pos = out.s_pos.data();
      p.run_max = run_max.data();
      p.run_sum = run_sum.data();
      p.loss = out.loss.data();
      if (ds) {
        set_ds(p, ds);
        p.ds = ds->bytes.data() + starts[b] * ds->elem();
      }
      if (c.mode == 2) {
        p.run_max_u = run_max_u.data();
        p.run_sum_u = run_sum_u.data();
        p.ega_loss = out.ega_loss.data();
      }
      if (pass == 0) {
        hardneg::hardneg_loss_block_update_cuda(p);
      } else {
        hardneg::hardneg_loss_block_grad_cuda(p);
      }
    }
    if (pass == 0) {
      for (int64_t i = 0; i < c.rows; ++i) {
        out.loss[i] = hardneg::hardneg_row_loss(out.z_pos[i], run_max[i], run_sum[i]);
        out.lse[i] = out.z_pos[i] + out.loss[i];
        if (c.mode == 2) {
          out.ega_loss[i] = hardneg::hardneg_row_loss(out.z_pos[i], run_max_u[i], run_sum_u[i]);
        }
      }
    }
  }
  emu::clear_device_memory();
  out.take_grad(s, c);
  if (ds) ds->s_untouched = std::memcmp(s.data(), c.s.data(), s.size() * sizeof(float)) == 0;
  return out;
}

// The bytes hardneg_ds_value stores for g in a dS output of `dtype`.
void stored_bytes(float g, hardneg::DsDtype dtype, uint8_t* out) {
  if (dtype == hardneg::DsDtype::kBFloat16) {
    const uint16_t h = hardneg::hardneg_round_bf16(g);
    std::memcpy(out, &h, sizeof h);
  } else if (dtype == hardneg::DsDtype::kFloat16) {
    const uint16_t h = hardneg::hardneg_round_fp16(g);
    std::memcpy(out, &h, sizeof h);
  } else {
    std::memcpy(out, &g, sizeof g);
  }
}

// Writes the fp32 dS and the dS output, both unpadded, for test_cuda_emu.py (HARDNEG_EMU_DUMP).
void dump(const Case& c, const Result& in_place, const DsOut& ds) {
  static int count = 0;
  const char* dir = std::getenv("HARDNEG_EMU_DUMP");
  if (dir == nullptr || ds.dtype == hardneg::DsDtype::kFloat32) return;
  const std::string stem = std::string(dir) + "/" + std::to_string(count++);
  FILE* f = std::fopen((stem + ".f32").c_str(), "wb");
  std::fwrite(in_place.grad.data(), sizeof(float), in_place.grad.size(), f);
  std::fclose(f);
  f = std::fopen((stem + (ds.dtype == hardneg::DsDtype::kBFloat16 ? ".bf16" : ".fp16")).c_str(),
                 "wb");
  for (int64_t i = 0; i < c.rows; ++i) {
    std::fwrite(ds.bytes.data() + i * ds.ld * ds.elem(), ds.elem(), c.cols, f);
  }
  std::fclose(f);
}

// A dS output matches the in-place fp32 dS of the same schedule bit for bit once rounded, and the
// run wrote nothing else (S and the output's padding as they were).
void compare_ds(const Case& c, const Result& in_place, const DsOut& ds, const std::string& name) {
  int64_t wrong = 0, padding = 0;
  uint8_t want[4];
  for (int64_t i = 0; i < c.rows; ++i) {
    for (int64_t j = 0; j < ds.ld; ++j) {
      const uint8_t* got = ds.bytes.data() + (i * ds.ld + j) * ds.elem();
      if (j >= c.cols) {
        for (size_t b = 0; b < ds.elem(); ++b) padding += got[b] != kUnwritten;
        continue;
      }
      stored_bytes(in_place.grad[i * c.cols + j], ds.dtype, want);
      wrong += std::memcmp(got, want, ds.elem()) != 0;
    }
  }
  const bool ok = wrong == 0 && padding == 0 && ds.s_untouched;
  if (!ok) {
    std::printf("  %s: %lld values differ, %lld padding bytes written, S untouched %d\n",
                name.c_str(), static_cast<long long>(wrong), static_cast<long long>(padding),
                ds.s_untouched);
  }
  check(ok, name);
  dump(c, in_place, ds);
}

// True when `got` matches `want` within the tolerances of the file header; prints the errors.
bool matches(const Case& c, const Result& got, const ref::Exact& want, const std::string& name) {
  double stat_err = 0.0;
  for (int64_t i = 0; i < c.rows; ++i) {
    stat_err = std::fmax(stat_err, std::fabs(got.lse[i] - want.lse[i]));
    stat_err = std::fmax(stat_err, std::fabs(got.loss[i] - want.loss[i]));
    stat_err = std::fmax(stat_err, std::fabs(got.z_pos[i] - want.z_pos[i]));
    stat_err = std::fmax(stat_err, std::fabs(got.s_pos[i] - want.s_pos[i]));
    if (c.mode == 2) stat_err = std::fmax(stat_err, std::fabs(got.ega_loss[i] - want.ega_loss[i]));
  }
  // dS = factor * (Pbar - Y) / tau, and Pbar = exp(z (+ u) - lse) carries the logits' absolute
  // error (6e-5, above) as a relative one: |error| <= factor / tau * 6e-5 * max(Pbar, 1 at the
  // positive), with the 6e-5 doubled for headroom.
  double grad_ratio = 0.0;
  int64_t worst = -1;
  bool finite = true;
  for (int64_t i = 0; i < c.rows; ++i) {
    const double factor = static_cast<double>(c.grad_scale) * c.row_scale[i] * c.inv_tau;
    for (int64_t j = 0; j < c.cols; ++j) {
      const double g = got.grad[i * c.cols + j];
      const double w = want.grad[i * c.cols + j];
      finite = finite && std::isfinite(g);
      const double size = j == c.pos_offset + i ? 1.0 : std::fmax(std::fabs(w) / factor, 1e-3);
      const double ratio = std::fabs(g - w) / (1.2e-4 * factor * size);
      if (ratio > grad_ratio) {
        grad_ratio = ratio;
        worst = i * c.cols + j;
      }
    }
  }
  const bool ok = finite && stat_err <= 6e-5 && grad_ratio <= 1.0;
  if (!ok) {
    std::printf(
        "  %s: stat err %.2e (tol 6e-5), grad err / tol %.2f at %lld (got %.9g, want "
        "%.9g), finite %d\n",
        name.c_str(), stat_err, grad_ratio, static_cast<long long>(worst),
        worst < 0 ? 0.0 : got.grad[worst], worst < 0 ? 0.0 : want.grad[worst], finite);
  }
  return ok;
}

void compare(const Case& c, const Result& got, const ref::Exact& want, const std::string& name) {
  check(matches(c, got, want, name), name);
}

const char* const kDsNames[] = {"fp32", "bf16", "fp16"};

std::vector<int64_t> split3(int64_t cols) {
  const int64_t a = cols / 3, b = (cols - a) / 2;
  return {a, b, cols - a - b};  // may hold a 0-wide block: a no-op launch
}

void kernel_cases() {
  const int64_t col_counts[] = {1, 31, 32, 33, 1024, 1025, 3000};
  const char* modes[] = {"infonce", "llave", "ega"};
  for (int mode = 0; mode < 3; ++mode) {
    for (int masking = 0; masking < 3; ++masking) {  // none, partial, every negative masked
      for (int64_t cols : col_counts) {
        // One row everywhere; 9 rows (two blocks of warp rows, the second mostly idle) and 2
        // wide rows where it matters; a row stride 7 wider than the row for half the cases.
        const int64_t rows = cols == 33 ? 9 : (cols == 1025 ? 2 : 1);
        const int64_t pad = (cols + mode) % 2 ? 7 : 0;
        const Case c = ref::make_case(rows, cols, pad, mode, masking, 1000 * mode + cols);
        const ref::Exact want = ref::exact(c);
        char name[128];
        std::snprintf(name, sizeof name, "%s masking=%d rows=%lld cols=%lld ld=%lld", modes[mode],
                      masking, static_cast<long long>(rows), static_cast<long long>(cols),
                      static_cast<long long>(c.ld));
        const Result rows_fp32 = run_rows(c);
        const Result blocks_fp32 = run_blocks(c, split3(cols));
        compare(c, rows_fp32, want, std::string("rows ") + name);
        compare(c, blocks_fp32, want, std::string("blocks ") + name);
        for (const auto dtype : {hardneg::DsDtype::kBFloat16, hardneg::DsDtype::kFloat16,
                                 hardneg::DsDtype::kFloat32}) {
          const std::string tag = std::string(" dS ") + kDsNames[static_cast<int>(dtype)] + " ";
          DsOut ds_rows(c, dtype), ds_blocks(c, dtype);
          run_rows(c, &ds_rows);
          compare_ds(c, rows_fp32, ds_rows, "rows" + tag + name);
          run_blocks(c, split3(cols), &ds_blocks);
          compare_ds(c, blocks_fp32, ds_blocks, "blocks" + tag + name);
        }
        if (cols == 3000) {  // a narrow block and a wide one in one schedule
          compare(c, run_blocks(c, {40, 1960, 1000}), want,
                  std::string("blocks 40/1960/1000 ") + name);
        }
      }
    }
  }
}

// The comparison must be able to fail: tau moved by 0.1 % in the reference.
void perturbation_is_caught() {
  const Case c = ref::make_case(9, 33, 0, 1, 1, 7);
  Case moved = c;
  moved.inv_tau *= 1.001f;
  const Result got = run_rows(c);
  check(matches(c, got, ref::exact(c), "unperturbed"), "unperturbed reference matches");
  check(!matches(c, got, ref::exact(moved), "perturbed reference (expected to differ)"),
        "a 0.1% change of tau is caught by the comparison");
  const Case ega = ref::make_case(9, 33, 0, 2, 1, 8);
  Case ega_moved = ega;
  ega_moved.beta *= 1.01f;
  const Result got_ega = run_rows(ega);
  check(matches(ega, got_ega, ref::exact(ega), "unperturbed ega"), "unperturbed ega matches");
  check(!matches(ega, got_ega, ref::exact(ega_moved), "ega beta +1% (expected to differ)"),
        "a 1% change of ega's beta is caught by the comparison");
}

}  // namespace

void dispatch_checks();  // test_dispatch.cpp

int main() {
  emu::reset();
  kernel_cases();
  perturbation_is_caught();
  int instances = 0;
  for (const auto& [name, n] : emu::counters().launches) instances += n > 0;
  check(instances == hardneg::kNumLossKernelInstances,
        "every kernel instance ran (" + std::to_string(instances) + " of " +
            std::to_string(hardneg::kNumLossKernelInstances) + ")");
  dispatch_checks();
  std::printf("cuda_emu kernels: %d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}

void report(bool ok, const std::string& what) { check(ok, what); }
