"""Real photographs that ship inside scikit-image and scikit-learn, and a procedural dataset with exact labels."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

from visadapt.data._registry import register_dataset
from visadapt.data.base import ArrayImageDataset, LabeledImageDataset

# name -> (loader, class name); every file is inside the installed wheels, nothing downloads.
_SKIMAGE_PHOTOS = {
    "astronaut": "astronaut", "coffee": "cup of coffee", "chelsea": "cat", "rocket": "rocket",
    "hubble_deep_field": "galaxy", "immunohistochemistry": "tissue sample", "camera": "cameraman",
    "brick": "brick wall", "grass": "grass", "gravel": "gravel", "moon": "moon", "coins": "coins",
}


def sample_photo_arrays() -> list[tuple[str, str, np.ndarray]]:
    """``(file id, class name, HxWx3 uint8)`` for the bundled scikit-image and scikit-learn photos."""
    from skimage import data as skdata
    from sklearn.datasets import load_sample_image

    out = []
    for fn, classname in _SKIMAGE_PHOTOS.items():
        img = getattr(skdata, fn)()
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        out.append((f"skimage.{fn}", classname, np.ascontiguousarray(img[..., :3]).astype(np.uint8)))
    out.append(("sklearn.china", "temple", load_sample_image("china.jpg")))
    out.append(("sklearn.flower", "flower", load_sample_image("flower.jpg")))
    return out


class _PhotoDataset(LabeledImageDataset):
    def __init__(self, transform: Callable | None = None) -> None:
        super().__init__(transform)
        photos = sample_photo_arrays()
        self.ids = [p[0] for p in photos]
        self.classnames = [p[1] for p in photos]
        self.labels = list(range(len(photos)))
        self._arrays = [p[2] for p in photos]

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self._arrays[index])

    def describe(self, index: int) -> str:
        return self.ids[index]


@register_dataset("sample_photos")
def sample_photos(root: str | None = None, split: str = "train", transform: Callable | None = None,
                  on_bad_image: str = "raise") -> LabeledImageDataset:
    """The 14 real photos bundled in scikit-image and scikit-learn, one class each (demos and smoke tests)."""
    return _PhotoDataset(transform)


SHAPES = ["circle", "square", "triangle", "cross", "bar"]


def draw_shape(shape: str, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Draw one ``shape`` at a random position, scale and colour on a random-tint background."""
    bg = tuple(int(c) for c in rng.integers(0, 80, 3))
    fg = tuple(int(c) for c in rng.integers(150, 256, 3))
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    r = rng.uniform(0.22, 0.38) * size
    cx, cy = rng.uniform(r, size - r, 2)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    elif shape == "cross":
        w = r / 3
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fg)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fg)
    elif shape == "bar":
        d.rectangle([cx - r, cy - r / 4, cx + r, cy + r / 4], fill=fg)
    else:
        raise ValueError(f"unknown shape {shape!r}; available: {SHAPES}")
    return np.asarray(im)


@register_dataset("procedural_shapes")
def procedural_shapes(root: str | None = None, split: str = "train", transform: Callable | None = None,
                      num_per_class: int = 40, image_size: int = 32, seed: int = 0,
                      on_bad_image: str = "raise") -> ArrayImageDataset:
    """Generated shapes with exact labels; a function of ``(split, seed)`` only. For tests and quick checks.

    Args:
        num_per_class: Images per class.
        image_size: Side of the square images.
        seed: Generator seed; the test split uses a different stream than train.
    """
    stream = {"train": 0, "val": 1, "test": 2}.get(split)
    if stream is None:
        raise ValueError(f"procedural_shapes split must be train, val or test, got {split!r}")
    rng = np.random.default_rng([seed, stream])
    labels = [c for c in range(len(SHAPES)) for _ in range(num_per_class)]
    images = np.stack([draw_shape(SHAPES[c], rng, image_size) for c in labels])
    return ArrayImageDataset(images, labels, list(SHAPES), name=f"procedural_shapes/{split}", transform=transform)
