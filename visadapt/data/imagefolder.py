"""Image files on disk: the shared file-backed dataset class and the generic ImageFolder layout.

ImageFolder layout (torchvision's): one folder per class, images anywhere below it::

    root/<class>/<image>                      # a plain class-per-folder tree: split deterministically (below)
    root/{train,val,test}/<class>/<image>     # one folder per split

Classes are the sorted folder names; with split folders, the class list is the union over all split folders present,
so a label means the same class in every split.

A plain tree asked for ``train`` / ``val`` / ``test`` is split per class with CoOp's proportions (``read_and_split_data``:
50 % train, 20 % val, the rest test; at least one train and, where a class has two or more images, one test image),
after a shuffle by a private generator seeded with ``split_seed``. The split is saved to ``root/imagefolder_split.json``
(or ``split_file``) and read back by later runs, so it stays fixed even if files are added.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from visadapt.data._registry import register_dataset
from visadapt.data.base import LabeledImageDataset, load_image
from visadapt.data.templates import prompt_name

log = logging.getLogger(__name__)

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
        if on_bad_image == "skip":
            self._drop_unreadable(("paths",))

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


SPLIT_FILE = "imagefolder_split.json"
TRAIN_FRACTION, VAL_FRACTION = 0.5, 0.2  # CoOp's read_and_split_data defaults (p_trn=0.5, p_val=0.2)


def split_plain_tree(files_by_class: dict[str, list[str]], seed: int) -> dict[str, dict[str, list[str]]]:
    """Split each class's files (relative paths) into train / val / test with CoOp's proportions.

    Deterministic: the files are sorted, then shuffled by ``random.Random(seed)`` (the global state is untouched).
    """
    rng = random.Random(seed)
    out: dict[str, dict[str, list[str]]] = {s: {} for s in SPLITS}
    for cls in sorted(files_by_class):
        files = sorted(files_by_class[cls])
        rng.shuffle(files)
        n = len(files)
        n_train = max(1, round(n * TRAIN_FRACTION))
        n_val = round(n * VAL_FRACTION)
        if n >= 2 and n_train + n_val >= n:  # keep one test image
            n_val = max(0, n - 1 - n_train)
            n_train = min(n_train, n - 1)
        parts = {"train": files[:n_train], "val": files[n_train:n_train + n_val], "test": files[n_train + n_val:]}
        for split, chosen in parts.items():
            out[split][cls] = sorted(chosen)
    return out


def _read_or_make_split(base: Path, classes: list[str], files_by_class: dict[str, list[str]], seed: int,
                        split_file: str | None) -> dict[str, dict[str, list[str]]]:
    path = Path(split_file).expanduser() if split_file else base / SPLIT_FILE
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            saved = data["splits"]
            if not all(s in saved and isinstance(saved[s], dict) for s in SPLITS):
                raise ValueError("missing train/val/test")
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"imagefolder: {path} is not a split file written by visadapt ({e}); delete it to "
                             "split the folder again") from None
        missing = sorted(set(classes) - {c for s in SPLITS for c in saved[s]})
        if missing:
            raise ValueError(f"imagefolder: {path} has no entry for class folder(s) {missing[:5]}; delete it to "
                             "split the folder again")
        return saved
    splits = split_plain_tree({c: files_by_class[c] for c in classes}, seed)
    record = {"root": str(base), "seed": seed, "fractions": {"train": TRAIN_FRACTION, "val": VAL_FRACTION},
              "splits": splits}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)
        log.info("imagefolder: split of %s saved to %s", base, path)
    except OSError as e:
        log.warning("imagefolder: could not save the split of %s to %s (%s); pass split_file=<writable path> to keep "
                    "it", base, path, e)
    return splits


@register_dataset("imagefolder")
def imagefolder(root: str, split: str | None = None, transform: Callable | None = None,
                on_bad_image: str = "raise", empty_classes: str = "error", split_seed: int = 0,
                split_file: str | None = None) -> ImageFolderDataset:
    """Generic ImageFolder layout: ``root/<class>/<image>`` or ``root/{train,val,test}/<class>/<image>``.

    Args:
        root: The folder holding the class folders, or the split folders.
        split: ``None`` reads all of ``root`` (a plain tree) as one set; ``"train"``, ``"val"`` or ``"test"`` reads
            ``root/<split>`` when split folders exist (labelled with the classes of all split folders), and
            otherwise that part of the plain tree's saved deterministic split (see the module docstring).
        transform: Applied to each PIL image.
        on_bad_image: ``"raise"`` (default) or ``"skip"``: unreadable images are left out of the index, listed in
            ``dataset.skipped`` and logged.
        empty_classes: A class folder without images: ``"error"`` (default) stops and names it; ``"drop"`` leaves
            the class out (with a warning), so it gets no label.
        split_seed: Seed of the plain tree's split.
        split_file: Where the plain tree's split is saved / read; default ``root/imagefolder_split.json``.
    """
    base = Path(root).expanduser()
    layout = "root/<class>/<image> (a plain tree) or root/{train,val,test}/<class>/<image>"
    if empty_classes not in ("error", "drop"):
        raise ValueError(f"imagefolder: empty_classes must be 'error' or 'drop', got {empty_classes!r}")
    if not base.is_dir():
        raise FileNotFoundError(f"imagefolder: root {base} does not exist; expected {layout}")
    if split is not None and split not in SPLITS:
        raise ValueError(f"imagefolder: split must be one of {SPLITS} or None, got {split!r}")
    split_dirs = [s for s in SPLITS if (base / s).is_dir()]
    if split_dirs:  # root/{train,val,test}/<class>/<image>
        if split is None:
            raise ValueError(f"imagefolder: {base} has split folders {split_dirs}; pass split=train/val/test")
        folder = base / split
        if not folder.is_dir():
            raise FileNotFoundError(f"imagefolder: no split folder {folder}; expected {layout}")
        classes = sorted({c for s in split_dirs for c in list_class_folders(base / s)})
        listing = {c: {s: list_images(base / s / c) if (base / s / c).is_dir() else [] for s in split_dirs}
                   for c in classes}
        counts = {c: sum(len(v) for v in listing[c].values()) for c in classes}
        chosen = {c: listing[c].get(split, []) for c in classes}
    else:  # a plain class-per-folder tree
        folder = base
        classes = list_class_folders(base)
        found = {c: list_images(base / c) for c in classes}
        counts = {c: len(found[c]) for c in classes}
        chosen = found
    empty = [c for c in classes if counts[c] == 0]
    if empty:
        where = ", ".join(str(base / c) if not split_dirs else f"{base}/*/{c}" for c in empty[:5])
        if empty_classes == "error":
            raise ValueError(f"imagefolder: {len(empty)} class folder(s) hold no image ({', '.join(IMAGE_EXTENSIONS)}"
                             f"): {where}; add images, remove the folder(s), or pass "
                             "dataset_kwargs={empty_classes: drop} to leave them out")
        log.warning("imagefolder: leaving out %d empty class folder(s): %s", len(empty), where)
        classes = [c for c in classes if c not in empty]
    if not classes:
        raise FileNotFoundError(f"imagefolder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}; "
                                f"expected {layout}")
    if not split_dirs and split is not None:
        rel = {c: [p.relative_to(base).as_posix() for p in chosen[c]] for c in classes}
        splits = _read_or_make_split(base, classes, rel, split_seed, split_file)
        chosen = {c: [base / f for f in splits[split].get(c, [])] for c in classes}
    paths, labels = [], []
    for label, cls in enumerate(classes):
        paths += chosen[cls]
        labels += [label] * len(chosen[cls])
    if not paths:
        raise FileNotFoundError(f"imagefolder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}"
                                f"{'' if split is None else f' for split {split}'}; expected {layout}")
    return ImageFolderDataset(paths, labels, classes, "imagefolder", split, transform, on_bad_image)
