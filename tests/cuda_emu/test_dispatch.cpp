// The host side of the CUDA module on the emulated driver: which kernel instance and launch
// geometry the dispatch picks, that it runs on the device holding S (not the current one) and
// restores the caller's context, argument errors, and the choice of kernel image per device
// (cubin of the same major architecture, PTX JIT when the driver rejects the cubin).
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_driver.h"
#include "emu_driver.h"
#include "hardneg_loss.h"
#include "kernel_image.h"

void report(bool ok, const std::string& what);

namespace {

template <class Fn>
bool throws_invalid(Fn fn, const char* needle) {
  try {
    fn();
  } catch (const std::invalid_argument& e) {
    return std::string(e.what()).find(needle) != std::string::npos;
  }
  return false;
}

hardneg::HardnegLossParams block(std::vector<float>& s, std::vector<float>& stats, int64_t rows,
                                 int64_t cols) {
  s.assign(static_cast<size_t>(rows * cols), 0.1f);
  stats.assign(static_cast<size_t>(6 * rows), 0.0f);
  hardneg::HardnegLossParams p;
  p.s = s.data();
  p.rows = rows;
  p.cols = cols;
  p.ld_s = cols;
  p.lse = stats.data();
  p.loss = stats.data() + rows;
  p.z_pos = stats.data() + 2 * rows;
  p.s_pos = stats.data() + 3 * rows;
  p.run_max = stats.data() + 4 * rows;
  p.run_sum = stats.data() + 5 * rows;
  return p;
}

void image_selection() {
  const unsigned char none[] = "";
  const std::vector<hardneg::KernelImage> images = {
      {"sm_80 cubin", 80, false, none, 1},
      {"compute_80 PTX", 80, true, none, 1},
      {"sm_90 cubin", 90, false, none, 1},
      {"compute_90 PTX", 90, true, none, 1},
  };
  const auto names = [&](int sm) {
    std::string out;
    for (const auto* image : hardneg::select_kernel_images(images, sm))
      out += image->name + std::string(";");
    return out;
  };
  report(names(80) == "sm_80 cubin;compute_80 PTX;",
         "sm_80 picks its cubin, then PTX: " + names(80));
  report(names(86) == "sm_80 cubin;compute_80 PTX;", "sm_86 runs the sm_80 cubin: " + names(86));
  report(names(90) == "sm_90 cubin;compute_90 PTX;", "sm_90 picks its cubin: " + names(90));
  report(names(120) == "compute_90 PTX;", "sm_120 JIT-compiles the newest PTX: " + names(120));
  report(names(75).empty(), "sm_75 has no image: " + names(75));

  // On the emulated driver: device 1's cubin is rejected (a driver older than the cubin's ptxas),
  // so its module comes from the PTX; device 0 loaded the sm_80 cubin in the kernel tests.
  emu::knobs().reject_cubins = true;
  const std::string d1 = hardneg::loaded_kernel_image(1);
  emu::knobs().reject_cubins = false;
  report(d1 == "compute_80 PTX (JIT)", "a rejected cubin falls back to PTX: " + d1);
  const std::string d0 = hardneg::loaded_kernel_image(0);
  report(d0 == "sm_80 cubin", "device 0 runs the cubin: " + d0);
}

void launch_geometry() {
  std::vector<float> s, stats;
  hardneg::HardnegLossParams p = block(s, stats, 9, 33);
  emu::register_device_memory(s.data(), s.size() * sizeof(float), 0);
  hardneg::hardneg_loss_rows_cuda(p);
  const emu::Counters& c = emu::counters();
  report(c.last_kernel == "hardneg_loss_rows_llave_nomask_warp" && c.last_grid == 2 &&
             c.last_block == 256,
         "9 rows of 33 columns: 2 blocks of 8 warp rows, got " + c.last_kernel + " grid " +
             std::to_string(c.last_grid));
  p = block(s, stats, 3, 1025);
  p.mode = hardneg::LossMode::kEga;
  emu::clear_device_memory();
  emu::register_device_memory(s.data(), s.size() * sizeof(float), 0);
  hardneg::hardneg_loss_rows_cuda(p);
  report(c.last_kernel == "hardneg_loss_rows_ega_nomask_block" && c.last_grid == 3,
         "3 rows of 1025 columns: one block per row, got " + c.last_kernel);
  const std::string before = c.last_kernel;
  const int launches = c.launches.at(before);
  p.rows = 0;
  hardneg::hardneg_loss_rows_cuda(p);
  p.rows = 3;
  p.cols = 0;
  hardneg::hardneg_loss_block_grad_cuda(p);
  report(c.launches.at(before) == launches && c.last_kernel == before,
         "empty blocks launch nothing");
  p.cols = 1025;
  p.mode = static_cast<hardneg::LossMode>(5);
  report(throws_invalid([&] { hardneg::hardneg_loss_rows_cuda(p); }, "unknown loss mode code 5"),
         "an unknown mode is refused");
  p.mode = hardneg::LossMode::kInfoNCE;
  p.ds_dtype = static_cast<hardneg::DsDtype>(3);
  report(
      throws_invalid([&] { hardneg::hardneg_loss_block_grad_cuda(p); }, "unknown dS dtype code 3"),
      "an unknown dS dtype is refused");
  p.ds_dtype = hardneg::DsDtype::kFloat32;
  emu::clear_device_memory();
  p.mode = hardneg::LossMode::kInfoNCE;
  report(throws_invalid([&] { hardneg::hardneg_loss_rows_cuda(p); }, "need device memory"),
         "memory the driver does not know is refused");
}

// S on device 1 while device 0's context is current: the launch runs in device 1's context, and
// the caller's context is current again afterwards.
void device_not_current() {
  std::vector<float> s, stats;
  hardneg::HardnegLossParams p = block(s, stats, 2, 40);
  emu::register_device_memory(s.data(), s.size() * sizeof(float), 1);
  const hardneg::CudaDriver& cu = hardneg::cuda_driver();
  cu.ctx_push_current(hardneg::primary_context(0));
  const int depth = emu::context_depth();
  hardneg::hardneg_loss_block_update_cuda(p);
  report(emu::counters().last_launch_device == 1,
         "the kernel runs on the device that holds S (got device " +
             std::to_string(emu::counters().last_launch_device) + ")");
  report(emu::current_device() == 0 && emu::context_depth() == depth,
         "the caller's current device is restored");
  p.s = s.data() + 1;  // same device: no context switch needed (one column fewer: in bounds)
  p.cols = 39;
  emu::clear_device_memory();
  emu::register_device_memory(s.data(), s.size() * sizeof(float), 0);
  const int pushes = emu::counters().context_pushes;
  hardneg::hardneg_loss_block_update_cuda(p);
  report(emu::counters().context_pushes == pushes,
         "no context switch when S is on the current device");
  CUcontext popped = nullptr;
  cu.ctx_pop_current(&popped);
  emu::clear_device_memory();
}

}  // namespace

void dispatch_checks() {
  image_selection();
  launch_geometry();
  device_not_current();
}
