"""Defaults of the loss family, in one place for the op, the reference and the recipes."""

# LLaVE (arXiv 2503.04812): temperature 0.02 (logit scale 50) and hardness weight alpha = 9.
TEMPERATURE = 0.02
ALPHA = 9.0

# EGA reconstruction (README "The loss"): value InfoNCE, gradient (Pbar - Y) / tau with
# Pbar_ij = softmax_j(s_ij / tau + u_ij), u_ij = beta * max(0, s_ij - s_ip + margin) on negatives.
# Chosen on benchmarks/bench_hardness.py's controlled task (README "Learning quality"): 50 / 0.3 is
# the middle of the plateau of the renormalised form (its neighbours 20 / 0.5, 50 / 0.5, 100 / 0.3
# within 1 point), +12.6 points of hard-split P@1 over InfoNCE at tau 0.02, as much as llave.
# The earlier unnormalised form (Pbar = P e^u, default 2 / 0) pushed queries away from every
# candidate once negatives entered the margin and lost 8.7 points there.
EGA_BETA = 50.0
EGA_MARGIN = 0.3

MODES = ("infonce", "llave", "ega")
REDUCTIONS = ("mean", "sum", "none")
STRATEGIES = ("auto", "ring", "allgather")
TRANSPORTS = ("auto", "torch", "nccl")

# The id the kernels give hard negatives when the caller passes target_ids but no
# hard_negative_ids ("never mask a hard negative"): the smallest int64, which target ids must not
# use. The kernels compare ids only; a reserved value keeps them free of a special case.
UNMASKED_ID = -(2**63)

# Logits of whole ring blocks kept between forward and backward at most: each kept block saves the
# recompute GEMM (2 B_r N_k D flops) for a copy of B_r N_k floats. 64 MiB keeps every block at
# small per-rank batches, where recompute would be noticeable next to the transfer, and none at
# large ones, where the ring's point is O(chunk) memory.
KEEP_LOGITS_BYTES = 64 * 2**20
