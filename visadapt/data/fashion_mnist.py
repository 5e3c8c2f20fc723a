"""Fashion-MNIST read from the original idx files (Zalando), as installed by Debian's ``dataset-fashion-mnist``."""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from visadapt.data._registry import register_dataset
from visadapt.data.base import ArrayImageDataset

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def _read_idx(path: Path, offset: int) -> np.ndarray:
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    return np.frombuffer(raw, np.uint8, offset=offset)


def fashion_mnist_root(root: str | None = None) -> Path:
    """Resolve the Fashion-MNIST folder: ``root``, else ``$VISADAPT_FASHION_MNIST``, else the Debian location."""
    path = Path(root or os.environ.get("VISADAPT_FASHION_MNIST", DEFAULT_ROOT)).expanduser()
    missing = [s for pair in _FILES.values() for s in pair if _find(path, s) is None]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {path}: missing {', '.join(m + '[.gz]' for m in missing)}. Expected the four "
            "idx files {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] in one folder. Install them with "
            "`apt-get install -y dataset-fashion-mnist` (puts them in /usr/share/datasets/fashion-mnist) or pass "
            "root=<folder> / set VISADAPT_FASHION_MNIST."
        )
    return path


@register_dataset("fashion_mnist")
def fashion_mnist(root: str | None = None, split: str = "train", transform: Callable | None = None,
                  invert: bool = False, on_bad_image: str = "raise") -> ArrayImageDataset:
    """Fashion-MNIST (60,000 train / 10,000 test, 28x28 greyscale, 10 classes) from the idx files.

    Args:
        root: Folder with the idx files; default ``$VISADAPT_FASHION_MNIST`` or /usr/share/datasets/fashion-mnist.
        split: ``train`` or ``test``.
        transform: Applied to the PIL image (converted to RGB by replicating the grey channel).
        invert: Make the images dark-on-white, closer to product photos on a white background.
        on_bad_image: Unused (arrays cannot be corrupt per image); accepted for a uniform signature.
    """
    if split not in _FILES:
        raise ValueError(f"fashion_mnist split must be 'train' or 'test', got {split!r}")
    path = fashion_mnist_root(root)
    img_stem, lab_stem = _FILES[split]
    images = _read_idx(_find(path, img_stem), 16).reshape(-1, 28, 28)
    labels = _read_idx(_find(path, lab_stem), 8)
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels in {path}")
    if invert:
        images = 255 - images
    return ArrayImageDataset(images, labels.tolist(), FASHION_MNIST_CLASSES, name=f"fashion_mnist/{split}",
                             transform=transform)
