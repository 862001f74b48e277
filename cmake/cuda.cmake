# CUDA module build rules (filled by the CUDA kernels)
