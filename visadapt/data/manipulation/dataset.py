"""The manipulation dataset: records -> sample dicts with image, label, mask, box, category, cues and text.

Sample fields (one :func:`visadapt.data.base.collate` for all):

* ``image``: float tensor 3xHxW after the transform;
* ``label``: int, 1 manipulated, 0 authentic;
* ``mask``: float tensor 1xHxW in {0, 1} (zeros for an authentic image; the filled boxes when an item has boxes but
  no mask, then ``has_mask`` is False);
* ``has_mask``: bool, a pixel mask was annotated (pixel metrics use only those);
* ``box``: float tensor (4,), xyxy normalised to [0, 1]: the bounding box of the manipulated region (of all its
  boxes together), zeros for an authentic image; ``has_box``: bool;
* ``category``: int index into ``CATEGORIES`` (-1 authentic or unknown);
* ``cues``: float multi-hot tensor (len(CUES),); ``has_cues``: bool, the item carries a cue annotation;
* ``editor`` (str, ``"authentic"`` for real images), ``text`` (str), ``pair_id`` (int), ``path`` (str), ``index``.

Masks are binarised as IMDL-BenCo does: mean over channels > 127.5.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from visadapt.data.base import BadImageError, LabeledImageDataset, load_image
from visadapt.data.manipulation.format import ManipulationRecord
from visadapt.data.manipulation.vocab import AUTHENTIC, CUES, category_index, cue_index

CLASSNAMES = ["authentic", "manipulated"]


def mask_bbox(mask: np.ndarray) -> list[float] | None:
    """Bounding box ``[x0, y0, x1, y1]`` (pixels, exclusive right/bottom) of the nonzero pixels, or ``None``."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def enclosing_box(boxes: Sequence[Sequence[float]]) -> list[float]:
    """The smallest box containing every box in ``boxes``."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return [float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max())]


def load_mask(path: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """A mask file as a bool HxW array (IMDL-BenCo's rule: mean over channels > 127.5).

    Args:
        size: ``(width, height)`` the mask must have (the image's); a mismatch is an error naming the file.
    """
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    except FileNotFoundError as e:
        raise BadImageError(f"mask file not found: {path}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImageError(f"cannot decode mask {path}: {e}") from e
    mask = arr.mean(-1) > 127.5
    if size is not None and (mask.shape[1], mask.shape[0]) != tuple(size):
        raise BadImageError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]}, its image is {size[0]}x{size[1]}")
    return mask


class ManipulationTransform:
    """Image and mask to tensors: resize both to ``image_size`` (bilinear / nearest; skipped when the size already
    matches, so forensic traces survive), optional horizontal flip (applied to image, mask and box alike), then
    normalise the image with ``mean`` / ``std``.

    IMDL-BenCo's ``is_resizing`` mode; box coordinates are normalised to [0, 1], so a resize leaves them unchanged.
    """

    def __init__(self, image_size: int | None = 224, mean: Sequence[float] = (0.0, 0.0, 0.0),
                 std: Sequence[float] = (1.0, 1.0, 1.0), flip: bool = False) -> None:
        self.image_size, self.flip = image_size, flip
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: Image.Image, mask: np.ndarray, box: list[float]) -> tuple[torch.Tensor, torch.Tensor,
                                                                                          list[float]]:
        s = self.image_size
        if s is not None and image.size != (s, s):
            image = image.resize((s, s), Image.BILINEAR)
            mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((s, s), Image.NEAREST)) > 127
        img = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None]
        if self.flip and torch.rand(()) < 0.5:
            img, m = img.flip(-1), m.flip(-1)
            if any(box):
                box = [1.0 - box[2], box[1], 1.0 - box[0], box[3]]
        return (img - self.mean) / self.std, m, box


class ManipulationDataset(LabeledImageDataset):
    """Images with manipulation annotations, from a list of :class:`ManipulationRecord` (any reader's output).

    Labels are 0 (authentic) and 1 (manipulated); ``classnames`` is ``["authentic", "manipulated"]``.

    Args:
        records: The items.
        transform: A :class:`ManipulationTransform` (or any callable ``(PIL image, bool mask, box) -> (image
            tensor, mask tensor, box)``); ``None`` gives the image as a [0, 1] tensor at its own size.
        name: Shown in messages.
        on_bad_image: ``"raise"`` (default) or ``"skip"`` (decode every file once now and leave unreadable ones out).
    """

    def __init__(self, records: Sequence[ManipulationRecord], transform: Callable | None = None,
                 name: str = "manipulation", on_bad_image: str = "raise") -> None:
        super().__init__(transform, on_bad_image)
        self.records = list(records)
        self.name = name
        self.classnames = list(CLASSNAMES)
        self.labels = [r.label for r in self.records]
        if on_bad_image == "skip":
            self._drop_unreadable(("records",))

    @property
    def paths(self) -> list[str]:
        return [r.image for r in self.records]

    @property
    def editors(self) -> list[str]:
        return [r.editor or (AUTHENTIC if r.label == 0 else "unknown") for r in self.records]

    def describe(self, index: int) -> str:
        return self.records[index].image

    def load(self, index: int) -> Image.Image:
        return load_image(self.records[index].image)

    def load_mask(self, index: int, size: tuple[int, int]) -> tuple[np.ndarray, bool]:
        """``(bool HxW mask, has_mask)`` for an image of ``size = (width, height)``."""
        r = self.records[index]
        if r.mask:
            m = load_mask(r.mask, size)
            if r.label == 1 and not m.any():
                raise BadImageError(f"mask {r.mask} of manipulated image {r.image} is empty; mark an authentic "
                                    "image with \"Negative\"")
            return m, True
        mask = np.zeros((size[1], size[0]), dtype=bool)
        for x0, y0, x1, y1 in r.boxes:  # box-only annotation: the filled boxes stand in (has_mask False)
            mask[max(int(np.floor(y0)), 0):int(np.ceil(y1)), max(int(np.floor(x0)), 0):int(np.ceil(x1))] = True
        return mask, False

    def sample(self, index: int) -> dict[str, Any]:
        """The sample before the transform: PIL image, bool mask and the pixel box (for non-learning baselines)."""
        r = self.records[index]
        image = self.load(index)
        mask, has_mask = self.load_mask(index, image.size)
        box = None
        if r.label == 1:
            box = enclosing_box(r.boxes) if r.boxes else mask_bbox(mask)
        return {"image": image, "mask": mask, "has_mask": has_mask, "box_pixels": box, "record": r}

    def __getitem__(self, index: int) -> dict[str, Any]:
        r = self.records[index]
        s = self.sample(index)
        image, mask, box_px = s["image"], s["mask"], s["box_pixels"]
        w, h = image.size
        box = [box_px[0] / w, box_px[1] / h, box_px[2] / w, box_px[3] / h] if box_px else [0.0] * 4
        box = [min(max(v, 0.0), 1.0) for v in box]
        if self.transform is not None:
            img_t, mask_t, box = self.transform(image, mask, box)
        else:
            img_t = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
            mask_t = torch.from_numpy(mask.astype(np.float32))[None]
        cues = torch.zeros(len(CUES))
        for c in r.cues or []:
            cues[cue_index(c)] = 1.0
        return {
            "image": img_t, "label": int(r.label), "mask": mask_t, "has_mask": bool(s["has_mask"]),
            "box": torch.tensor(box, dtype=torch.float32), "has_box": box_px is not None,
            "category": category_index(r.category) if r.label == 1 else -1,
            "cues": cues, "has_cues": r.cues is not None, "editor": self.editors[index], "text": r.text,
            "pair_id": int(r.pair_id), "path": r.image, "index": index,
        }

    def select(self, indices: Sequence[int], name: str | None = None) -> ManipulationDataset:
        """A new dataset over ``records[indices]`` with the same transform."""
        return ManipulationDataset([self.records[i] for i in indices], self.transform, name or self.name)

    def subset(self, indices: Sequence[int], label_map: dict[int, int] | None = None,  # type: ignore[override]
               classnames: list[str] | None = None) -> ManipulationDataset:
        """A view keeping the manipulation fields (relabelling is not meaningful here)."""
        if label_map or classnames:
            raise ValueError("a manipulation dataset has the fixed labels authentic / manipulated; no relabelling")
        return self.select(indices)


__all__ = ["CLASSNAMES", "ManipulationDataset", "ManipulationTransform", "enclosing_box", "load_mask", "mask_bbox"]
