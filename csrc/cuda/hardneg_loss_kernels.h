// The CUDA loss kernels' instance list, shared by the device code (hardneg_loss_kernels.cu, which
// defines one extern "C" entry point per instance) and the host code (hardneg_loss.cpp, which
// looks each one up by name in the loaded kernel image). One list, so a name can never drift.
//
// An instance is (kernel, mode, masking, threads per row): 3 x 3 x 2 x 2 = 36 entry points named
// hardneg_loss_<kernel>_<mode>_<mask|nomask>_<warp|block>.
#pragma once

// X(kernel, LossMode enumerator, mode name, mask flag, mask name, threads per row, width name)
#define HARDNEG_KERNEL_WIDTHS(X, k, m, mn, f, fn) \
  X(k, m, mn, f, fn, 32, warp)                    \
  X(k, m, mn, f, fn, 256, block)
#define HARDNEG_KERNEL_MASKS(X, k, m, mn)           \
  HARDNEG_KERNEL_WIDTHS(X, k, m, mn, false, nomask) \
  HARDNEG_KERNEL_WIDTHS(X, k, m, mn, true, mask)
#define HARDNEG_KERNEL_MODES(X, k)                        \
  HARDNEG_KERNEL_MASKS(X, k, LossMode::kInfoNCE, infonce) \
  HARDNEG_KERNEL_MASKS(X, k, LossMode::kLlave, llave)     \
  HARDNEG_KERNEL_MASKS(X, k, LossMode::kEga, ega)
#define HARDNEG_KERNEL_INSTANCES(X)     \
  HARDNEG_KERNEL_MODES(X, rows)         \
  HARDNEG_KERNEL_MODES(X, block_update) \
  HARDNEG_KERNEL_MODES(X, block_grad)

namespace hardneg {
namespace cuda {

// Threads per block for every kernel; a block holds kBlockThreads / (threads per row) rows. The
// instance list's 32 and 256 are these two.
constexpr int kBlockThreads = 256;
constexpr int kWarpSize = 32;

}  // namespace cuda

// The kernels of the loss, in HARDNEG_KERNEL_INSTANCES order.
enum class LossKernel : int { kRows = 0, kBlockUpdate = 1, kBlockGrad = 2 };
constexpr int kNumLossKernelInstances = 36;

// Index of an instance in HARDNEG_KERNEL_INSTANCES order.
constexpr int loss_kernel_index(LossKernel kernel, int mode, bool mask, bool wide) {
  return ((static_cast<int>(kernel) * 3 + mode) * 2 + (mask ? 1 : 0)) * 2 + (wide ? 1 : 0);
}

}  // namespace hardneg
