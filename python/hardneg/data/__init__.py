"""Data: the MMEB-train reader, its batch sampler and collator, and the synthetic generator."""

from hardneg.data.collate import TrainCollator
from hardneg.data.images import MMEB_IMAGE_PLACEHOLDER, ImageLoadError, load_image
from hardneg.data.mmeb_train import MMEBTrainDataset, TrainBatchSampler

__all__ = [
    "MMEB_IMAGE_PLACEHOLDER",
    "ImageLoadError",
    "MMEBTrainDataset",
    "TrainBatchSampler",
    "TrainCollator",
    "load_image",
]
