// CUDA entry points of the fused hard-negative loss (csrc/cuda/hardneg_loss.cpp): the same
// semantics as the CPU ones in csrc/cpu/hardneg_loss.h. Each launches asynchronously on
// (cudaStream_t)p.stream, on the device that holds p.s, and never synchronises the host. All
// pointers in p are device pointers on that device.
#pragma once

#include "hardneg/hardneg_loss.h"

namespace hardneg {

// Row schedule: every row of S holds all candidates. Writes lse, z_pos, s_pos, loss and, when
// p.need_grad, dL/dS in place of S or into p.ds.
void hardneg_loss_rows_cuda(const HardnegLossParams& p);

// Column-block schedule, forward: merges the block into the running (run_max, run_sum) of each row
// and records z_pos / s_pos for rows whose positive lies in the block.
void hardneg_loss_block_update_cuda(const HardnegLossParams& p);

// Column-block schedule, backward: dL/dS of the block in place of S (or into p.ds) from the final
// lse and s_pos.
void hardneg_loss_block_grad_cuda(const HardnegLossParams& p);

}  // namespace hardneg
