"""The sample contract shared by every dataset, and the labelled-image base class.

A sample is a dict of named fields: ``image`` (a tensor after the transform, a PIL image before it), ``label``
(int), ``classname`` (str), and task-specific fields such as ``mask``, ``boxes`` or ``text``. One collate
(:func:`collate`) and one transform stack serve every task.

:class:`LabeledImageDataset` keeps the list of labels in memory so that samplers (few-shot, base/novel, sessions)
never have to decode an image to know its class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate


class BadImageError(ValueError):
    """Raised when an image file cannot be decoded; the message names the file."""


def load_image(path: str | Path) -> Image.Image:
    """Open ``path`` as an RGB PIL image, or raise :class:`BadImageError` naming the file and the reason."""
    path = Path(path)
    if not path.is_file():
        raise BadImageError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise BadImageError(f"cannot decode image {path}: {e}") from e


class LabeledImageDataset(Dataset):
    """Images with integer labels and class names.

    Subclasses fill ``self.labels`` (list of int), ``self.classnames`` (index -> name) and implement
    :meth:`load` (index -> PIL image). Selection (few-shot, class subsets, relabelling) goes through
    :meth:`subset`, which returns a view without copying image data.

    Args:
        transform: Callable applied to the PIL image.
        on_bad_image: ``"raise"`` (default) stops with the file name; ``"skip"`` replaces a bad sample by the next
            good one of the same dataset and counts it in ``self.skipped``.
    """

    def __init__(self, transform: Callable | None = None, on_bad_image: str = "raise") -> None:
        if on_bad_image not in ("raise", "skip"):
            raise ValueError(f"on_bad_image must be 'raise' or 'skip', got {on_bad_image!r}")
        self.transform = transform
        self.on_bad_image = on_bad_image
        self.labels: list[int] = []
        self.classnames: list[str] = []
        self.skipped: list[str] = []

    # -- to implement -------------------------------------------------------------------------------------------
    def load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """Human-readable identity of sample ``index`` (a file path where there is one)."""
        return f"{type(self).__name__}[{index}]"

    # -- shared -------------------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        for attempt in range(len(self)):
            i = (index + attempt) % len(self)
            try:
                image = self.load(i)
                break
            except BadImageError as e:
                if self.on_bad_image == "raise":
                    raise
                self.skipped.append(f"{self.describe(i)}: {e}")
        else:
            raise BadImageError(f"no readable image in {type(self).__name__}")
        if self.transform is not None:
            image = self.transform(image)
        label = self.labels[i]
        return {"image": image, "label": label, "classname": self.classnames[label], "index": i}

    def subset(self, indices: Sequence[int], label_map: dict[int, int] | None = None,
               classnames: list[str] | None = None) -> "SubsetDataset":
        """A view on ``indices``; ``label_map`` relabels (old -> new) with the new ``classnames``."""
        return SubsetDataset(self, list(indices), label_map, classnames)


class SubsetDataset(LabeledImageDataset):
    """A selection of another dataset's samples, optionally relabelled. Shares the parent's transform."""

    def __init__(self, parent: LabeledImageDataset, indices: list[int], label_map: dict[int, int] | None = None,
                 classnames: list[str] | None = None) -> None:
        super().__init__(parent.transform, parent.on_bad_image)
        self.parent = parent
        self.indices = indices
        self.label_map = label_map
        old = [parent.labels[i] for i in indices]
        self.labels = [label_map[y] for y in old] if label_map else old
        self.classnames = classnames if classnames is not None else list(parent.classnames)

    def load(self, index: int) -> Image.Image:
        return self.parent.load(self.indices[index])

    def describe(self, index: int) -> str:
        return self.parent.describe(self.indices[index])


class ArrayImageDataset(LabeledImageDataset):
    """Images held in memory as a uint8 array ``(N, H, W)`` or ``(N, H, W, 3)``; used for idx / pickle formats."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], classnames: list[str], name: str = "array",
                 transform: Callable | None = None) -> None:
        super().__init__(transform)
        self.images = images
        self.labels = [int(y) for y in labels]
        self.classnames = list(classnames)
        self.name = name

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index]).convert("RGB")

    def describe(self, index: int) -> str:
        return f"{self.name}[{index}]"


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate a list of sample dicts: tensors and numbers are stacked, strings and ragged fields become lists."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], str) or key in ("boxes", "text", "path"):
            out[key] = values
        elif isinstance(values[0], torch.Tensor) and any(v.shape != values[0].shape for v in values):
            out[key] = values
        else:
            out[key] = default_collate(values)
    return out
