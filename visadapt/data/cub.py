"""CUB-200-2011 from its official folder layout (as shipped in CEC's archive and used by CoACT).

Expected layout: ``root`` is any of ``<root>``, ``<root>/CUB_200_2011`` or ``<root>/CUB_200_2011/CUB_200_2011``
(CoACT's double nesting) containing::

    images.txt               # "<image id> <class dir>/<file>.jpg"
    train_test_split.txt     # "<image id> <1 = train | 0 = test>"
    image_class_labels.txt   # "<image id> <class id, 1-based>"
    classes.txt              # optional: "<class id> 001.Black_footed_Albatross"
    images/<class dir>/<file>.jpg

200 classes, 5,994 train / 5,794 test images. Labels are ``class id - 1`` (the FSCIL class order); images are
listed in image-id order, as CEC does.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from visadapt.data._registry import register_dataset
from visadapt.data.mini_imagenet import ImageListDataset

CUB_FILES = ("images.txt", "train_test_split.txt", "image_class_labels.txt")
CUB_LAYOUT = ("<root>[/CUB_200_2011[/CUB_200_2011]]/{images.txt, train_test_split.txt, image_class_labels.txt, "
              "classes.txt, images/<class>/<file>.jpg} (the official CUB_200_2011.tgz, extracted)")


def _cub_root(root: str | Path | None) -> Path:
    if root is None:
        raise FileNotFoundError(f"cub200 needs root=<folder>; expected the layout {CUB_LAYOUT}")
    root = Path(root).expanduser()
    for cand in (root, root / "CUB_200_2011", root / "CUB_200_2011" / "CUB_200_2011"):
        if all((cand / f).is_file() for f in CUB_FILES) and (cand / "images").is_dir():
            return cand
    raise FileNotFoundError(f"CUB-200-2011 not found under {root}; expected the layout {CUB_LAYOUT}")


def _read_table(path: Path) -> dict[int, str]:
    out: dict[int, str] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise ValueError(f"{path}:{lineno}: expected '<id> <value>', got {line!r}")
        key = int(parts[0])
        if key in out:
            raise ValueError(f"{path}:{lineno}: id {key} appears twice")
        out[key] = parts[1].strip()
    return out


def _pretty(name: str) -> str:
    """``001.Black_footed_Albatross`` -> ``Black footed Albatross``."""
    return name.split(".", 1)[-1].replace("_", " ")


@register_dataset("cub200")
def cub200(root: str | None = None, split: str = "train", transform: Callable | None = None,
           on_bad_image: str = "raise") -> ImageListDataset:
    """CUB-200-2011 birds (200 classes, 5,994 train / 5,794 test images) from the official folder layout.

    Args:
        root: Folder with the CUB files (see the module docstring for the accepted nestings).
        split: ``train`` or ``test`` (``train_test_split.txt``).
        transform: Applied to the PIL image.
        on_bad_image: ``raise`` or ``skip`` (see :class:`~visadapt.data.base.LabeledImageDataset`).
    """
    if split not in ("train", "test"):
        raise ValueError(f"cub200 split must be 'train' or 'test', got {split!r}")
    base = _cub_root(root)
    images = _read_table(base / "images.txt")
    is_train = _read_table(base / "train_test_split.txt")
    classes = _read_table(base / "image_class_labels.txt")
    want = "1" if split == "train" else "0"
    ids = [k for k in sorted(images) if is_train.get(k) == want]
    missing = [k for k in ids if k not in classes]
    if missing:
        raise ValueError(f"{base / 'image_class_labels.txt'}: no class for image ids {missing[:5]}")
    labels = [int(classes[k]) - 1 for k in ids]
    num_classes = max((int(v) for v in classes.values()), default=0)
    names_file = base / "classes.txt"
    if names_file.is_file():
        table = _read_table(names_file)
        names = [_pretty(table.get(c + 1, str(c + 1))) for c in range(num_classes)]
    else:  # the class folder names carry the same information
        folder = {int(classes[k]) - 1: images[k].split("/", 1)[0] for k in images if k in classes}
        names = [_pretty(folder.get(c, str(c + 1))) for c in range(num_classes)]
    files = [base / "images" / images[k] for k in ids]
    return ImageListDataset(files, labels, names, transform, on_bad_image)


__all__ = ["cub200"]
