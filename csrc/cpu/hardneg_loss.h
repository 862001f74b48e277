// CPU entry points of the fused hard-negative loss. Each calls the kernels of csrc/cpu/
// hardneg_loss.cpp in the ISA variant chosen at run time (cpu_isa.h; defined in cpu_isa.cpp).
#pragma once

#include <cstdint>

#include "hardneg/hardneg_loss.h"

namespace hardneg {

// Row schedule: every row of S holds all candidates. Writes lse, z_pos, s_pos, loss and, when
// p.need_grad, dL/dS in place of S or into p.ds.
void hardneg_loss_rows_cpu(const HardnegLossParams& p);

// Column-block schedule, forward: merges the block into the running (run_max, run_sum) of each row
// and records z_pos / s_pos for rows whose positive lies in the block.
void hardneg_loss_block_update_cpu(const HardnegLossParams& p);

// Column-block schedule, backward: dL/dS of the block in place of S (or into p.ds) from the final
// lse and s_pos.
void hardneg_loss_block_grad_cpu(const HardnegLossParams& p);

// y[i] = hardneg_exp(x[i]), the kernels' own exp, exposed so tests can hold it against torch.exp.
void hardneg_exp_cpu(const float* x, float* y, int64_t n);

// y[i] = x[i] as a dS output of dtype code `dtype` (DsDtype) stores it: the kernels' own rounding
// (hardneg_round_bf16 / _fp16), exposed so tests can hold it against torch's .to().
void hardneg_round_cpu(const float* x, void* y, int64_t n, int32_t dtype);

}  // namespace hardneg
