"""scikit-learn's bundled handwritten digits (UCI optical digits): 1,797 real 8x8 images, 10 classes, offline.

A small real dataset that ships with scikit-learn, used as an offline cross-dataset transfer target (train on
Fashion-MNIST, evaluate on digits with their own prompts). scikit-learn defines no train/test split; this module
fixes one: within each class, a seeded permutation puts every other image in ``test`` (about 900 images).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from visadapt.data._registry import register_dataset
from visadapt.data.base import ArrayImageDataset

DIGIT_CLASSES = [str(i) for i in range(10)]
_SPLIT_SEED = 0


@register_dataset("digits")
def digits(root: str | None = None, split: str = "test", transform: Callable | None = None, invert: bool = False,
           on_bad_image: str = "raise") -> ArrayImageDataset:
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), with a fixed per-class half split.

    Args:
        root: Unused (the data ships inside scikit-learn); accepted for a uniform signature.
        split: ``train``, ``test`` (each about half of every class) or ``all``.
        transform: Applied to the PIL image (grey replicated to RGB).
        invert: Dark ink on white instead of scikit-learn's bright ink on black.
        on_bad_image: Unused; accepted for a uniform signature.
    """
    from sklearn.datasets import load_digits

    if split not in ("train", "test", "all"):
        raise ValueError(f"digits split must be 'train', 'test' or 'all', got {split!r}")
    data = load_digits()
    images = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)  # ink 0..16 -> 0..255
    labels = data.target.astype(int)
    if split != "all":
        rng = np.random.default_rng(_SPLIT_SEED)
        keep = []
        for c in range(10):
            idx = rng.permutation(np.flatnonzero(labels == c))
            keep.extend(idx[1::2] if split == "test" else idx[0::2])
        keep = np.sort(np.asarray(keep))
        images, labels = images[keep], labels[keep]
    if invert:
        images = 255 - images
    return ArrayImageDataset(images, labels.tolist(), DIGIT_CLASSES, name=f"digits/{split}", transform=transform)
