"""Image files on disk: the shared file-backed dataset class and the generic ImageFolder layout.

ImageFolder layout (torchvision's): one folder per class, images anywhere below it::

    root/<class>/<image>                      # one folder, no splits: split=None
    root/{train,val,test}/<class>/<image>     # one folder per split

Classes are the sorted folder names; with split folders, the class list is the union over all split folders present,
so a label means the same class in every split.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from visadapt.data._registry import register_dataset
from visadapt.data.base import LabeledImageDataset, load_image
from visadapt.data.templates import prompt_name

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
SPLITS = ("train", "val", "test")


class ImageFileDataset(LabeledImageDataset):
    """Labelled images read from files, one path per sample.

    ``classnames`` are the names as they go into prompts (underscores replaced by spaces); ``raw_classnames`` keep
    the spelling of the source (folder names, split files).

    Args:
        paths: Image file of each sample.
        labels: Label of each sample (0-based).
        raw_classnames: Class name of each label as the source spells it.
        name: Dataset name (used for prompt templates and messages).
        split: The split these samples belong to.
        transform: Applied to the PIL image.
        on_bad_image: ``"raise"`` or ``"skip"`` (see :class:`~visadapt.data.base.LabeledImageDataset`).
    """

    def __init__(self, paths: Sequence[str | Path], labels: Sequence[int], raw_classnames: Sequence[str], name: str,
                 split: str | None, transform: Callable | None = None, on_bad_image: str = "raise") -> None:
        super().__init__(transform, on_bad_image)
        if len(paths) != len(labels):
            raise ValueError(f"{name}: {len(paths)} paths but {len(labels)} labels")
        self.paths = [Path(p) for p in paths]
        self.labels = [int(y) for y in labels]
        self.raw_classnames = list(raw_classnames)
        self.classnames = [prompt_name(c) for c in self.raw_classnames]
        self.name = name
        self.split = split

    def load(self, index: int) -> Image.Image:
        return load_image(self.paths[index])

    def describe(self, index: int) -> str:
        return str(self.paths[index])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, split={self.split!r}, {len(self)} images, " \
               f"{self.num_classes} classes)"


def is_image_file(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(folder: Path) -> list[Path]:
    """Image files anywhere below ``folder`` (hidden files and other extensions skipped), in sorted order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if is_image_file(f))
    return found


def list_class_folders(folder: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``folder``."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


class ImageFolderDataset(ImageFileDataset):
    """A dataset in the ImageFolder layout (see the module docstring)."""


@register_dataset("imagefolder")
def imagefolder(root: str, split: str | None = None, transform: Callable | None = None,
                on_bad_image: str = "raise") -> ImageFolderDataset:
    """Generic ImageFolder layout: ``root/<class>/<image>`` or ``root/{train,val,test}/<class>/<image>``.

    Args:
        root: The folder holding the class folders, or the split folders.
        split: ``None`` reads ``root`` itself as one folder; ``"train"``, ``"val"`` or ``"test"`` reads
            ``root/<split>``, labelled with the classes of all split folders present.
        transform: Applied to each PIL image.
        on_bad_image: ``"raise"`` (default) or ``"skip"`` undecodable images (counted in ``dataset.skipped``).
    """
    base = Path(root).expanduser()
    layout = "root/<class>/<image> (split=None) or root/{train,val,test}/<class>/<image>"
    if not base.is_dir():
        raise FileNotFoundError(f"imagefolder: root {base} does not exist; expected {layout}")
    if split is None:
        folder, classes = base, list_class_folders(base)
    else:
        if split not in SPLITS:
            raise ValueError(f"imagefolder: split must be one of {SPLITS} or None, got {split!r}")
        folder = base / split
        if not folder.is_dir():
            raise FileNotFoundError(f"imagefolder: no split folder {folder}; expected {layout}. For a single "
                                    f"folder of class folders pass split=None")
        classes = sorted({c for s in SPLITS if (base / s).is_dir() for c in list_class_folders(base / s)})
    paths, labels = [], []
    for label, cls in enumerate(classes):
        if (folder / cls).is_dir():
            images = list_images(folder / cls)
            paths += images
            labels += [label] * len(images)
    if not paths:
        raise FileNotFoundError(f"imagefolder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}; "
                                f"expected {layout}")
    return ImageFolderDataset(paths, labels, classes, "imagefolder", split, transform, on_bad_image)
