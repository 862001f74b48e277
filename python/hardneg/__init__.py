"""hardneg: fused hard-negative contrastive losses for universal multimodal embedders."""

from hardneg._constants import ALPHA, EGA_BETA, EGA_MARGIN, KEEP_LOGITS_BYTES, TEMPERATURE
from hardneg._finite import raise_if_nonfinite
from hardneg._ops import build_info
from hardneg.loss import fused_hardneg_loss
from hardneg.reference import hardneg_loss_reference

__version__ = build_info()["version"]

__all__ = [
    "ALPHA",
    "EGA_BETA",
    "EGA_MARGIN",
    "KEEP_LOGITS_BYTES",
    "TEMPERATURE",
    "build_info",
    "fused_hardneg_loss",
    "hardneg_loss_reference",
    "raise_if_nonfinite",
]
