"""miniImageNet in the FSCIL layout of CEC (Zhang et al., CVPR'21), reused by CoACT and most FSCIL code.

Expected layout (``root`` may be the parent folder or ``miniimagenet/`` itself)::

    <root>/miniimagenet/split/train.csv     # "filename,label" header, then e.g. "n0153282900000005.jpg,n01532829"
    <root>/miniimagenet/split/test.csv
    <root>/miniimagenet/images/<filename>   # 84x84 JPEGs, all in one folder

100 classes, 500 train and 100 test images each. The class order is the sorted wnids, which equals their order of
first appearance in CEC's ``train.csv`` (the FSCIL label order). Class names are the wnids unless
``<root>/miniimagenet/classnames.txt`` ("wnid name" per line) exists.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from visadapt.data._registry import register_dataset
from visadapt.data.base import LabeledImageDataset, load_image

MINI_IMAGENET_LAYOUT = ("<root>/miniimagenet/{split/train.csv, split/test.csv, images/*.jpg} (CEC's miniImageNet "
                        "archive; csv rows are 'filename,wnid')")


class ImageListDataset(LabeledImageDataset):
    """Images given as a list of file paths with integer labels (decoded lazily by :func:`load_image`)."""

    def __init__(self, files: Sequence[str | Path], labels: Sequence[int], classnames: list[str],
                 transform: Callable | None = None, on_bad_image: str = "raise") -> None:
        super().__init__(transform, on_bad_image)
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} files but {len(labels)} labels")
        self.files = [Path(f) for f in files]
        self.labels = [int(y) for y in labels]
        self.classnames = list(classnames)

    def load(self, index: int) -> Image.Image:
        return load_image(self.files[index])

    def describe(self, index: int) -> str:
        return str(self.files[index])


def _mini_root(root: str | Path | None) -> Path:
    if root is None:
        raise FileNotFoundError(f"mini_imagenet needs root=<folder>; expected the layout {MINI_IMAGENET_LAYOUT}")
    root = Path(root).expanduser()
    for cand in (root / "miniimagenet", root):
        if (cand / "split" / "train.csv").is_file() and (cand / "images").is_dir():
            return cand
    raise FileNotFoundError(f"miniImageNet not found under {root}; expected the layout {MINI_IMAGENET_LAYOUT}")


def _read_csv(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"miniImageNet split file missing: {path}; expected the layout {MINI_IMAGENET_LAYOUT}")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        raise ValueError(f"{path}: expected the header 'filename,label', got {rows[0] if rows else 'an empty file'}")
    out = []
    for lineno, row in enumerate(rows[1:], 2):
        if not row:
            continue
        if len(row) != 2:
            raise ValueError(f"{path}:{lineno}: expected 'filename,wnid', got {row}")
        out.append((row[0].strip(), row[1].strip()))
    return out


@register_dataset("mini_imagenet")
def mini_imagenet(root: str | None = None, split: str = "train", transform: Callable | None = None,
                  on_bad_image: str = "raise") -> ImageListDataset:
    """miniImageNet (100 classes; 500 train / 100 test 84x84 images per class) in CEC's FSCIL folder layout.

    Args:
        root: Folder containing ``miniimagenet/`` (or that folder itself).
        split: ``train`` or ``test``.
        transform: Applied to the PIL image.
        on_bad_image: ``raise`` or ``skip`` (see :class:`~visadapt.data.base.LabeledImageDataset`).
    """
    if split not in ("train", "test"):
        raise ValueError(f"mini_imagenet split must be 'train' or 'test', got {split!r}")
    base = _mini_root(root)
    wnids = sorted({w for _, w in _read_csv(base / "split" / "train.csv")})
    index = {w: i for i, w in enumerate(wnids)}
    rows = _read_csv(base / "split" / f"{split}.csv")
    unknown = sorted({w for _, w in rows if w not in index})
    if unknown:
        raise ValueError(f"{base / 'split' / (split + '.csv')}: wnids {unknown[:5]} are not in train.csv")
    names = list(wnids)
    names_file = base / "classnames.txt"
    if names_file.is_file():
        lookup = dict(line.split(maxsplit=1) for line in names_file.read_text().splitlines() if line.strip())
        names = [lookup.get(w, w).strip() for w in wnids]
    files = [base / "images" / f for f, _ in rows]
    return ImageListDataset(files, [index[w] for _, w in rows], names, transform, on_bad_image)


__all__ = ["ImageListDataset", "mini_imagenet"]
