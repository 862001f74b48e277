// Launch and dispatch of the CUDA hard-negative loss kernels (math in hardneg_loss.cuh, entry
// points in hardneg_loss_kernels.cu): runtime flags (mode, masking, row length) pick one of the
// embedded kernel instances, launched through the driver API on the caller's stream, in the
// primary context of the device that holds p.s. Host code only; never synchronises.
#include "hardneg_loss.h"

#include <climits>
#include <stdexcept>
#include <string>

#include "cuda_driver.h"
#include "hardneg_loss_kernels.h"
#include "kernel_image.h"

namespace hardneg {
namespace {

using cuda::kBlockThreads;
using cuda::kWarpSize;

// Rows up to this many columns get one warp each (8 rows per block, at most 32 columns per
// lane); longer rows get a whole block, so a lane never sweeps more than cols / 256 columns.
constexpr int64_t kWarpRowMaxCols = 1024;

void launch(LossKernel kernel, const HardnegLossParams& p) {
  if (p.rows == 0 || p.cols == 0) return;  // nothing to do (and a 0-block grid is an error)
  const int mode = static_cast<int>(p.mode);
  if (mode < 0 || mode > 2) {
    throw std::invalid_argument("hardneg CUDA kernels: unknown loss mode code " +
                                std::to_string(mode));
  }
  if (!ds_dtype_valid(static_cast<int32_t>(p.ds_dtype))) {
    throw std::invalid_argument("hardneg CUDA kernels: unknown dS dtype code " +
                                std::to_string(static_cast<int32_t>(p.ds_dtype)));
  }
  const bool mask = p.row_ids != nullptr && p.col_ids != nullptr;
  const bool wide = p.cols > kWarpRowMaxCols;
  const int64_t rows_per_block = kBlockThreads / (wide ? kBlockThreads : kWarpSize);
  const int64_t blocks = (p.rows + rows_per_block - 1) / rows_per_block;
  if (blocks > INT_MAX) {
    throw std::invalid_argument("hardneg CUDA kernels take at most " +
                                std::to_string(INT_MAX * rows_per_block) + " rows per call, got " +
                                std::to_string(p.rows));
  }
  // The stream handle alone does not name a device, and torch callers may pass tensors of a
  // device other than the current one: the kernel runs where p.s lives.
  const int device = device_of_pointer(p.s);
  const ContextGuard guard(device);
  const CUfunction fn = loss_kernel_function(device, loss_kernel_index(kernel, mode, mask, wide));
  HardnegLossParams arg = p;  // the kernel's one parameter, copied by the driver at launch
  void* args[] = {&arg};
  HARDNEG_CU_CHECK(
      cuda_driver().launch_kernel(fn, static_cast<unsigned>(blocks), 1, 1, kBlockThreads, 1, 1, 0,
                                  reinterpret_cast<CUstream>(p.stream), args, nullptr));
}

}  // namespace

void hardneg_loss_rows_cuda(const HardnegLossParams& p) { launch(LossKernel::kRows, p); }
void hardneg_loss_block_update_cuda(const HardnegLossParams& p) {
  launch(LossKernel::kBlockUpdate, p);
}
void hardneg_loss_block_grad_cuda(const HardnegLossParams& p) { launch(LossKernel::kBlockGrad, p); }

}  // namespace hardneg
