// Launch and dispatch of the CUDA hard-negative loss kernels (math in hardneg_loss.cuh): runtime
// flags (mode, masking, row length) become template parameters here, once per call.
#include "hardneg_loss.h"

#include <climits>
#include <stdexcept>
#include <string>

#include "cuda_check.h"
#include "hardneg_loss.cuh"

namespace hardneg {
namespace {

using cuda::kBlockThreads;
using cuda::kWarpSize;

// Rows up to this many columns get one warp each (8 rows per block, at most 32 columns per
// lane); longer rows get a whole block, so a lane never sweeps more than cols / 256 columns.
constexpr int64_t kWarpRowMaxCols = 1024;

// Makes the device that holds p.s current for the call: the stream handle alone does not name a
// device (0 is the legacy default stream of whichever device is current), and torch callers may
// pass tensors of a device other than the current one.
class DeviceGuard {
 public:
  explicit DeviceGuard(const void* ptr) {
    cudaPointerAttributes attr{};
    HARDNEG_CUDA_CHECK(cudaPointerGetAttributes(&attr, ptr));
    HARDNEG_CUDA_CHECK(cudaGetDevice(&previous_));
    if (attr.type == cudaMemoryTypeDevice && attr.device != previous_) {
      HARDNEG_CUDA_CHECK(cudaSetDevice(attr.device));
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(previous_);  // best effort: a destructor must not throw
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

template <LossMode kMode, bool kMask, int kRowThreads>
struct RowsKernel {
  static constexpr int kThreadsPerRow = kRowThreads;
  static void launch(dim3 grid, cudaStream_t stream, const HardnegLossParams& p) {
    cuda::hardneg_loss_rows_kernel<kMode, kMask, kRowThreads>
        <<<grid, kBlockThreads, 0, stream>>>(p);
    HARDNEG_CUDA_CHECK_LAUNCH("hardneg_loss_rows_kernel");
  }
};

template <LossMode kMode, bool kMask, int kRowThreads>
struct BlockUpdateKernel {
  static constexpr int kThreadsPerRow = kRowThreads;
  static void launch(dim3 grid, cudaStream_t stream, const HardnegLossParams& p) {
    cuda::hardneg_loss_block_update_kernel<kMode, kMask, kRowThreads>
        <<<grid, kBlockThreads, 0, stream>>>(p);
    HARDNEG_CUDA_CHECK_LAUNCH("hardneg_loss_block_update_kernel");
  }
};

template <LossMode kMode, bool kMask, int kRowThreads>
struct BlockGradKernel {
  static constexpr int kThreadsPerRow = kRowThreads;
  static void launch(dim3 grid, cudaStream_t stream, const HardnegLossParams& p) {
    cuda::hardneg_loss_block_grad_kernel<kMode, kMask, kRowThreads>
        <<<grid, kBlockThreads, 0, stream>>>(p);
    HARDNEG_CUDA_CHECK_LAUNCH("hardneg_loss_block_grad_kernel");
  }
};

template <class K>
void launch(const HardnegLossParams& p) {
  constexpr int64_t kRowsPerBlock = kBlockThreads / K::kThreadsPerRow;
  const int64_t blocks = (p.rows + kRowsPerBlock - 1) / kRowsPerBlock;
  if (blocks > INT_MAX) {
    throw std::invalid_argument("hardneg CUDA kernels take at most " +
                                std::to_string(INT_MAX * kRowsPerBlock) + " rows per call, got " +
                                std::to_string(p.rows));
  }
  K::launch(dim3(static_cast<unsigned>(blocks)), reinterpret_cast<cudaStream_t>(p.stream), p);
}

template <template <LossMode, bool, int> class Kernel, LossMode kMode>
void dispatch_flags(const HardnegLossParams& p, bool mask, bool wide) {
  if (mask) {
    wide ? launch<Kernel<kMode, true, kBlockThreads>>(p)
         : launch<Kernel<kMode, true, kWarpSize>>(p);
  } else {
    wide ? launch<Kernel<kMode, false, kBlockThreads>>(p)
         : launch<Kernel<kMode, false, kWarpSize>>(p);
  }
}

// Turns the runtime mode, masking flag and row length into template parameters.
template <template <LossMode, bool, int> class Kernel>
void dispatch(const HardnegLossParams& p) {
  if (p.rows == 0 || p.cols == 0) return;  // nothing to do (and a 0-block grid is an error)
  const DeviceGuard guard(p.s);
  const bool mask = p.row_ids != nullptr && p.col_ids != nullptr;
  const bool wide = p.cols > kWarpRowMaxCols;
  switch (p.mode) {
    case LossMode::kInfoNCE:
      return dispatch_flags<Kernel, LossMode::kInfoNCE>(p, mask, wide);
    case LossMode::kLlave:
      return dispatch_flags<Kernel, LossMode::kLlave>(p, mask, wide);
    case LossMode::kEga:
      return dispatch_flags<Kernel, LossMode::kEga>(p, mask, wide);
  }
  throw std::invalid_argument("hardneg CUDA kernels: unknown loss mode code " +
                              std::to_string(static_cast<int>(p.mode)));
}

}  // namespace

void hardneg_loss_rows_cuda(const HardnegLossParams& p) { dispatch<RowsKernel>(p); }
void hardneg_loss_block_update_cuda(const HardnegLossParams& p) { dispatch<BlockUpdateKernel>(p); }
void hardneg_loss_block_grad_cuda(const HardnegLossParams& p) { dispatch<BlockGradKernel>(p); }

}  // namespace hardneg
