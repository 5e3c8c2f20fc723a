"""Captioned images for training the tiny text-to-image base: colourised Fashion-MNIST with sentence captions.

Each Fashion-MNIST garment (28x28, padded with 2 white pixels to 32x32) is painted in one of eight colours on a white
background: a pixel of ink level g in [0, 1] becomes ``(1 - g) * white + g * colour``. Its caption names the colour and
the class in a template, e.g. ``"a photo of a red sneaker"``; a share of the captions leaves the colour out (the model
then learns that the colour is free) and a share is empty (the unconditional branch of classifier-free guidance).

Colours and caption kinds are drawn once per image from ``seed`` (a function of ``(index, seed)`` only), so the data
are reproducible and independent of the global random state. Samples are dicts: ``image`` (3, 32, 32) float in
[-1, 1], ``text``, ``label``, ``colour`` ("" when the caption has none).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from visadapt.backbones.base import Preprocess
from visadapt.data._registry import DATASETS, register_dataset

__all__ = [
    "CLASS_WORDS", "COLOURS", "CaptionDataModule", "CaptionedImages", "caption", "colourise", "fashion_class_means",
    "colour_share", "fashion_mnist_captions", "ink_level", "score_samples",
]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 30), "orange": (245, 135, 15), "yellow": (235, 200, 20), "green": (30, 150, 50),
    "blue": (25, 70, 210), "purple": (125, 40, 165), "pink": (240, 110, 175), "black": (20, 20, 20),
}
"""The eight paint colours (sRGB 0-255)."""

CLASS_WORDS = ["t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
"""Fashion-MNIST's classes as caption words, in label order."""


def colourise(gray: np.ndarray, colours: np.ndarray, pad: int = 2) -> torch.Tensor:
    """Paint white-on-black greyscale images ``gray`` (N, H, W) uint8 in ``colours`` (N, 3) 0-255 on white.

    Returns float images (N, 3, H + 2 pad, W + 2 pad) in [-1, 1] (white background, padding white).
    """
    g = torch.tensor(np.asarray(gray), dtype=torch.float32).div(255.0)[:, None]
    c = torch.as_tensor(colours, dtype=torch.float32).div(255.0)[:, :, None, None]
    rgb = 1.0 - g * (1.0 - c)
    if pad:
        rgb = torch.nn.functional.pad(rgb, (pad, pad, pad, pad), value=1.0)
    return rgb * 2.0 - 1.0


def ink_level(images: torch.Tensor) -> torch.Tensor:
    """Colour-free shape of images (N, 3, H, W) in [-1, 1]: darkness ``1 - mean channel``, scaled per image to a
    maximum of 1 (so a yellow and a black sneaker give similar maps). Returns (N, H, W) in [0, 1]."""
    dark = 1.0 - (images.float().mean(1) + 1.0) / 2.0
    return dark / dark.flatten(1).amax(1).clamp(min=1e-3)[:, None, None]


class CaptionedImages(Dataset):
    """Greyscale ink images painted on the fly, with captions; see the module docstring for the sample fields.

    Args:
        gray: (N, H, W) uint8 white-on-black ink images.
        paint: (N, 3) 0-255 colour of each image.
        texts, labels, colours: Caption, class index and caption colour ("" when not named) per image.
        classnames: Class words in label order.
        name: Shown in messages.
    """

    def __init__(self, gray: np.ndarray, paint: np.ndarray, texts: list[str], labels: list[int], colours: list[str],
                 classnames: list[str], name: str) -> None:
        if not (len(gray) == len(paint) == len(texts) == len(labels) == len(colours)):
            raise ValueError(f"{name}: {len(gray)} images, {len(paint)} paints, {len(texts)} texts, "
                             f"{len(labels)} labels, {len(colours)} colours")
        self.gray, self.paint = np.ascontiguousarray(gray), np.asarray(paint)
        self.texts, self.labels, self.colours = texts, labels, colours
        self.classnames, self.name = classnames, name

    def __len__(self) -> int:
        return len(self.gray)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = colourise(self.gray[i:i + 1], self.paint[i:i + 1])[0]
        return {"image": image, "text": self.texts[i], "label": self.labels[i], "colour": self.colours[i]}


def caption(word: str, colour: str, template: str) -> str:
    """``template`` filled with ``"<colour> <word>"`` (or the word alone when ``colour`` is empty)."""
    return template.format(f"{colour} {word}" if colour else word)


@register_dataset("fashion_mnist_captions")
def fashion_mnist_captions(root: str | None = None, split: str = "train", template: str = "a photo of a {}",
                           colours: list[str] | None = None, p_colour: float = 0.7, p_plain: float = 0.2,
                           seed: int = 0, limit: int | None = None) -> CaptionedImages:
    """Colourised Fashion-MNIST (32x32 RGB on white) with captions such as "a photo of a red sneaker".

    Args:
        root: Folder of the Fashion-MNIST idx files (default: Debian's /usr/share/datasets/fashion-mnist).
        split: ``train`` (60,000) or ``test`` (10,000).
        template: Caption template with one ``{}`` for ``"<colour> <class>"``.
        colours: Names from :data:`COLOURS` to paint with (default all eight).
        p_colour: Share of captions that name colour and class.
        p_plain: Share that name the class only; the rest (``1 - p_colour - p_plain``) are empty.
        seed: Seed of the per-image colour and caption-kind draws.
        limit: Keep only the first ``limit`` images (tests).
    """
    from visadapt.data.fashion_mnist import fashion_mnist

    names = list(colours) if colours is not None else list(COLOURS)
    unknown = [c for c in names if c not in COLOURS]
    if unknown or not names:
        raise ValueError(f"unknown colour(s) {unknown}; choose from {list(COLOURS)}")
    if not (0 <= p_colour and 0 <= p_plain and p_colour + p_plain <= 1):
        raise ValueError(f"need p_colour, p_plain >= 0 and p_colour + p_plain <= 1, got {p_colour}, {p_plain}")
    if "{}" not in template:
        raise ValueError(f"template must contain '{{}}', got {template!r}")
    base = fashion_mnist(root=root, split=split)
    gray = np.asarray(base.images)
    labels = np.asarray(base.labels, dtype=np.int64)
    if limit is not None:
        gray, labels = gray[:limit], labels[:limit]
    rng = np.random.default_rng(seed)
    colour_idx = rng.integers(0, len(names), size=len(gray))
    kind = rng.random(len(gray))
    paint = np.array([COLOURS[n] for n in names])[colour_idx]
    texts, used = [], []
    for i, (lab, ci, k) in enumerate(zip(labels, colour_idx, kind)):
        colour = names[ci] if k < p_colour else ""
        texts.append("" if k >= p_colour + p_plain else caption(CLASS_WORDS[lab], colour, template))
        used.append(colour if texts[-1] else "")
    return CaptionedImages(gray, paint, texts, labels.tolist(), used, list(CLASS_WORDS),
                           name=f"fashion_mnist_captions/{split}")


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {"image": torch.stack([s["image"] for s in samples]), "text": [s["text"] for s in samples],
            "label": torch.tensor([s["label"] for s in samples]), "colour": [s["colour"] for s in samples]}


class CaptionDataModule(pl.LightningDataModule):
    """Image-caption pairs for text-to-image training (shuffled with a seeded generator; no validation split).

    Args:
        dataset: Registered caption dataset (e.g. ``fashion_mnist_captions``).
        dataset_kwargs: Its keyword arguments.
        batch_size: Images per step.
        num_workers: DataLoader workers.
        seed: Seed of the shuffling.
        preprocess: The model's preprocessing (linked by the CLI); its image size must equal the data's.
    """

    def __init__(self, dataset: str = "fashion_mnist_captions",
                 dataset_kwargs: dict[str, str | int | float | bool | list[str] | None] | None = None,
                 batch_size: int = 32, num_workers: int = 0, seed: int = 0,
                 preprocess: Preprocess | None = None) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.dataset, self.dataset_kwargs = dataset, dict(dataset_kwargs or {})
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.train_set: CaptionedImages | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = DATASETS.get(self.dataset)(**self.dataset_kwargs)
            size = int(self.train_set[0]["image"].shape[-1])
            if self.preprocess is not None and self.preprocess.image_size != size:
                raise ValueError(f"dataset {self.dataset!r} gives {size}x{size} images but the model expects "
                                 f"{self.preprocess.image_size}x{self.preprocess.image_size}")

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.num_workers, collate_fn=_collate,
                          generator=torch.Generator().manual_seed(self.seed))


def fashion_class_means(root: str | None = None, split: str = "test", per_class: int = 200) -> torch.Tensor:
    """Class means (10, 32, 32) of :func:`ink_level` over the first ``per_class`` images of each Fashion-MNIST class
    (painted black): the reference of :func:`score_samples`' nearest-class-mean check."""
    from visadapt.data.fashion_mnist import fashion_mnist

    base = fashion_mnist(root=root, split=split)
    gray, labels = np.asarray(base.images), np.asarray(base.labels)
    means = []
    for c in range(len(CLASS_WORDS)):
        idx = np.flatnonzero(labels == c)[:per_class]
        ink = ink_level(colourise(gray[idx], np.tile(COLOURS["black"], (len(idx), 1))))
        means.append(ink.mean(0))
    return torch.stack(means)


def score_samples(images: torch.Tensor, labels: list[int], colours: list[str] | None,
                  class_means: torch.Tensor) -> dict[str, float]:
    """How well generated images (B, H, W, 3) uint8 follow their prompts' class and colour.

    * ``class_agreement``: share whose nearest class mean (Euclidean, on the colour-free :func:`ink_level`) is the
      prompted class (chance 0.1; 400 real colourised test images scored 0.64 with these means);
    * ``colour_agreement``: share whose ink colour (mean RGB of the pixels with ink level > 0.5, rescaled to full
      ink) is nearest to the prompted colour among :data:`COLOURS` (chance 1/8); only prompts naming a colour count.
    """
    x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    ink = ink_level(x)
    dist = torch.cdist(ink.flatten(1), class_means.flatten(1).to(ink))
    pred = dist.argmin(1)
    out = {"class_agreement": float((pred == torch.as_tensor(labels)).float().mean())}
    if colours is not None and any(colours):
        names = list(COLOURS)
        hits = []
        for img, k, colour in zip(x, ink, colours):
            if not colour:
                continue
            m = k > 0.5
            rgb = (img[:, m].mean(1) + 1) / 2 if m.any() else torch.ones(3)
            level = k[m].mean() if m.any() else torch.tensor(1.0)
            hits.append(names[int(_nearest_colour(rgb[None], level[None]))] == colour)  # at the mean ink level
        out["colour_agreement"] = float(np.mean(hits))
    return out


def _nearest_colour(rgb: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Index in :data:`COLOURS` of the paint that explains ``rgb`` (P, 3) in [0, 1] at ink ``level`` (P,): undo
    ``1 - g (1 - c)`` and take the nearest of the eight colours."""
    table = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 255.0
    paint = 1 - (1 - rgb) / level[:, None].clamp(min=1e-3)
    return torch.cdist(paint, table).argmin(1)


def colour_share(images: torch.Tensor, colour: str, ink_threshold: float = 0.5) -> float:
    """Share of the garment's pixels painted in ``colour``: a prompt-attribute check for generated images.

    Every pixel with :func:`ink_level` above ``ink_threshold`` (the garment, not the white background) gets the paint
    colour that explains it best, ``1 - (1 - rgb) / level`` (undoing ``1 - g (1 - c)``), matched to the nearest of
    :data:`COLOURS`. The result is the share of those pixels whose nearest colour is ``colour``, averaged over the
    images (B, H, W, 3) uint8. Unlike :func:`score_samples`' one mean colour per image, a two-tone garment scores by
    how much of it is in the asked colour. Real single-colour test images score 1.0 (the first 200 test images, every colour).
    """
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; expected one of {list(COLOURS)}")
    target = list(COLOURS).index(colour)
    x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    shares = []
    for img, k in zip(x, ink_level(x)):
        m = k > ink_threshold
        hit = _nearest_colour(((img[:, m] + 1) / 2).T, k[m]) == target  # per garment pixel
        shares.append(float(hit.float().mean()) if m.any() else 0.0)
    return float(np.mean(shares))
