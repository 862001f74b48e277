"""Defaults of the loss family, in one place for the op, the reference and the recipes."""

# LLaVE (arXiv 2503.04812): temperature 0.02 (logit scale 50) and hardness weight alpha = 9.
TEMPERATURE = 0.02
ALPHA = 9.0

# EGA reconstruction (design section 1): a_ij = exp(beta * max(0, s_ij - s_ip + margin)).
# Amplification starts when a negative comes within `margin` = 0.1 cosine of its positive and grows
# e-fold every 1/beta = 0.2 cosine beyond that: a negative as similar as the positive gets 1.65x,
# one 0.2 above it 4.5x. Hardness is relative to the positive, as in the paper's analysis; the
# values are a starting point that the synthetic ablation (recipes/ablate.py) is meant to revisit.
EGA_BETA = 5.0
EGA_MARGIN = 0.1

MODES = ("infonce", "llave", "ega")
REDUCTIONS = ("mean", "sum", "none")
STRATEGIES = ("auto", "ring", "allgather")
