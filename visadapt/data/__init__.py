"""The dataset registry, datasets, samplers, transforms and DataModules.

``create_dataset(name, **kwargs)`` builds a registered dataset; ``python -m visadapt list datasets`` lists them.
"""

from visadapt.data import (  # noqa: F401  (each module registers its datasets)
    captions,
    cifar,
    coop,
    cub,
    digits,
    dreambooth,
    fashion_mnist,
    imagefolder,
    imagenet_variants,
    manipulation,
    mini_imagenet,
    photos,
    sessions,
    tracking,
)
from visadapt.data._registry import DATASETS, register_dataset
from visadapt.data.base import BadImageError, LabeledImageDataset, collate, load_image
from visadapt.data.datamodule import FewShotDataModule
from visadapt.data.fewshot import FewShotSplit, base_novel_classes, make_fewshot_split, sample_per_class


def create_dataset(name: str, **kwargs) -> LabeledImageDataset:
    """Build the registered dataset ``name``."""
    return DATASETS.get(name)(**kwargs)


__all__ = [
    "DATASETS", "BadImageError", "FewShotDataModule", "FewShotSplit", "LabeledImageDataset", "base_novel_classes",
    "collate", "create_dataset", "load_image", "make_fewshot_split", "register_dataset", "sample_per_class",
]
