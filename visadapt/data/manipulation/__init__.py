"""Manipulation-detection data: the extended IMDL-BenCo format, readers, the offline generator and the DataModule.

Registered datasets: ``manipulation_json``, ``imdl_folder``, ``manipbench_folder`` (readers) and
``generated_manipulations`` (real edits of the photos bundled in scikit-image / scikit-learn, cached on disk).
"""

from visadapt.data.manipulation import generator, readers  # noqa: F401  (each module registers its datasets)
from visadapt.data.manipulation.datamodule import ManipulationDataModule, TwinBatchSampler
from visadapt.data.manipulation.dataset import ManipulationDataset, ManipulationTransform, mask_bbox
from visadapt.data.manipulation.format import ManipulationRecord, read_manipulation_json, write_manipulation_json
from visadapt.data.manipulation.vocab import AUTHENTIC, CATEGORIES, CUES, EDITOR_CATEGORY, EDITORS

__all__ = [
    "AUTHENTIC", "CATEGORIES", "CUES", "EDITORS", "EDITOR_CATEGORY", "ManipulationDataModule", "ManipulationDataset",
    "ManipulationRecord", "ManipulationTransform", "TwinBatchSampler", "mask_bbox", "read_manipulation_json", "write_manipulation_json",
]
