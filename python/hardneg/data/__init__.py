"""Data: the MMEB-train reader, its batch sampler, the collators (whole batches and GradCache
chunks) and the synthetic generator."""

from hardneg.data.collate import STREAMS, ChunkedCollate, ChunkInputs, TrainCollator, split_rows
from hardneg.data.images import MMEB_IMAGE_PLACEHOLDER, ImageLoadError, load_image
from hardneg.data.mmeb_train import MMEBTrainDataset, TrainBatchSampler

__all__ = [
    "MMEB_IMAGE_PLACEHOLDER",
    "STREAMS",
    "ChunkInputs",
    "ChunkedCollate",
    "ImageLoadError",
    "MMEBTrainDataset",
    "TrainBatchSampler",
    "TrainCollator",
    "load_image",
    "split_rows",
]
