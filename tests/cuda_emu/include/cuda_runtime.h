// The two runtime types nccl.h needs, for the host emulation's NCCL logic test (no toolkit).
#pragma once

#include <cuda.h>

typedef CUstream cudaStream_t;
typedef CUevent cudaEvent_t;
