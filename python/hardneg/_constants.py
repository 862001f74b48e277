"""Defaults of the loss family, in one place for the op, the reference and the recipes."""

# LLaVE (arXiv 2503.04812): temperature 0.02 (logit scale 50) and hardness weight alpha = 9.
TEMPERATURE = 0.02
ALPHA = 9.0

# EGA reconstruction (design section 1): a_ij = exp(beta * max(0, s_ij - s_ip + margin)).
# Chosen by the synthetic ablation (benchmarks/results/ablation_*.md, recipes/ablate.py): with
# margin 0 only negatives that outscore their positive are amplified, e-fold per 1/beta = 0.5
# cosine above it. beta 5 with margin 0.1 collapsed there (the reconstruction does not renormalise
# Pbar: when every negative sits within the margin of its positive, sum_j Pbar_ij > 1 and the
# gradient pushes each query away from all its candidates); beta 1, 2 and 5 at margin 0 trained
# alike (P@1 within one std over 3 seeds), so the default is the setting farthest from collapse.
EGA_BETA = 2.0
EGA_MARGIN = 0.0

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
