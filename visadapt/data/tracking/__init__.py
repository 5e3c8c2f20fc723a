"""Single-object tracking data: sequences, readers (LaSOT, GOT-10k, TrackingNet, COCO pairs), the offline
procedural generator, SiamFC crops, the pair sampler and :class:`TrackingPairDataModule`."""

from visadapt.data.tracking import coco, got10k, lasot, synthetic, trackingnet  # noqa: F401  (register datasets)
from visadapt.data.tracking.crop import CropParams, box_from_crop, box_to_crop, crop_around, crop_image, siamfc_params
from visadapt.data.tracking.datamodule import TrackingPairDataModule, build_tracking_dataset
from visadapt.data.tracking.pairs import EpochPairSampler, PairConfig, TrackingPairDataset
from visadapt.data.tracking.sequence import TrackingDataset, TrackingSequence
from visadapt.data.tracking.synthetic import render_sequence, tracking_synthetic

__all__ = [
           "CropParams",
           "EpochPairSampler",
           "PairConfig",
           "TrackingDataset",
           "TrackingPairDataModule",
           "TrackingPairDataset",
           "TrackingSequence",
           "box_from_crop",
           "box_to_crop",
           "build_tracking_dataset",
           "crop_around",
           "crop_image",
           "render_sequence",
           "siamfc_params",
           "tracking_synthetic",
]
