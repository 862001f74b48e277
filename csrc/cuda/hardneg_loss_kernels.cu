// Device code of the CUDA loss: one extern "C" __global__ entry point per instance of the kernels
// in hardneg_loss.cuh (hardneg_loss_kernels.h lists them). Plain C names let the host code find
// each kernel in the loaded image with cuModuleGetFunction, without the CUDA runtime.
//
// Compiled to PTX only (cmake/cuda.cmake), never linked as host code; the host emulation in
// tests/cuda_emu compiles this same file for the CPU.
#include "hardneg_loss.cuh"
#include "hardneg_loss_kernels.h"

#define HARDNEG_DEFINE_KERNEL(kernel, mode, mode_name, mask, mask_name, threads, width_name) \
  extern "C" __global__ void __launch_bounds__(::hardneg::cuda::kBlockThreads)               \
      hardneg_loss_##kernel##_##mode_name##_##mask_name##_##width_name(                      \
          ::hardneg::HardnegLossParams p) {                                                  \
    ::hardneg::cuda::hardneg_loss_##kernel<::hardneg::mode, mask, threads>(p);               \
  }

HARDNEG_KERNEL_INSTANCES(HARDNEG_DEFINE_KERNEL)

#undef HARDNEG_DEFINE_KERNEL
