"""The four ImageNet domain-generalisation test sets in CoOp's layout: ImageNet-V2, -Sketch, -A and -R.

``root`` is the folder that holds the dataset folders (as for :mod:`visadapt.data.coop`), or a dataset folder
itself. Each folder carries a copy of ImageNet's ``classnames.txt`` ("<wnid> <class name>" per line)::

    root/
      imagenetv2/            imagenetv2-matched-frequency-format-val/<0..999>/<image>   classnames.txt
      imagenet-sketch/       images/<wnid>/<image>                                      classnames.txt
      imagenet-adversarial/  imagenet-a/<wnid>/<image>   (200 of the 1,000 wnids)       classnames.txt
      imagenet-rendition/    imagenet-r/<wnid>/<image>   (200 of the 1,000 wnids)       classnames.txt

Labels: V2's folders are ImageNet label indices; Sketch's wnid folders map through ``classnames.txt``; A and R keep
only the 200 classes whose folders exist, relabelled 0..199 in ``classnames.txt`` order, so that a model trained on
ImageNet is scored against those 200 names only (CoOp's rule). They are test sets: ``split`` must be ``test``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from visadapt.data._registry import register_dataset
from visadapt.data.imagefolder import ImageFileDataset, list_class_folders, list_images


@dataclass(frozen=True)
class VariantLayout:
    name: str
    folder: str  # dataset folder under root
    image_dir: str  # class folders inside it
    by_index: bool  # class folders named 0..999 (V2) instead of wnids
    description: str


VARIANTS = {v.name: v for v in (
    VariantLayout("imagenet_v2", "imagenetv2", "imagenetv2-matched-frequency-format-val", True,
                  "ImageNet-V2 matched-frequency (10,000 images, 1,000 classes); DG test set, CoOp layout."),
    VariantLayout("imagenet_sketch", "imagenet-sketch", "images", False,
                  "ImageNet-Sketch (50,889 sketches, 1,000 classes); DG test set, CoOp layout."),
    VariantLayout("imagenet_a", "imagenet-adversarial", "imagenet-a", False,
                  "ImageNet-A (7,500 natural adversarial images, 200 classes); DG test set, CoOp layout."),
    VariantLayout("imagenet_r", "imagenet-rendition", "imagenet-r", False,
                  "ImageNet-R (30,000 renditions, 200 classes); DG test set, CoOp layout."),
)}


def read_classnames(path: Path) -> tuple[list[str], list[str]]:
    """``(wnids, class names)`` from an ImageNet ``classnames.txt``."""
    wnids, names = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, name = line.strip().partition(" ")
        if not name.strip():
            raise ValueError(f"{path}:{n}: expected '<wnid> <class name>', got {line!r}")
        wnids.append(wnid)
        names.append(name.strip())
    return wnids, names


def _dataset_dir(layout: VariantLayout, root: str | Path) -> Path:
    base = Path(root).expanduser()
    for candidate in (base / layout.folder, base):
        if (candidate / layout.image_dir).is_dir() and (candidate / "classnames.txt").is_file():
            return candidate
    raise FileNotFoundError(
        f"{layout.name}: not found under {base}. Expected {layout.folder}/{layout.image_dir}/<class folders> and "
        f"{layout.folder}/classnames.txt (a copy of ImageNet's) inside root, or root being {layout.folder}/ itself")


def read_variant(name: str, root: str | Path, split: str = "test", transform: Callable | None = None,
                 on_bad_image: str = "raise") -> ImageFileDataset:
    """Read the ImageNet variant ``name`` (a key of :data:`VARIANTS`) under ``root``."""
    layout = VARIANTS[name]
    if split != "test":
        raise ValueError(f"{name} is a test set only; use split='test', got {split!r}")
    ddir = _dataset_dir(layout, root)
    wnids, names = read_classnames(ddir / "classnames.txt")
    image_dir = ddir / layout.image_dir
    folders = list_class_folders(image_dir)
    if layout.by_index:
        bad = [f for f in folders if not f.isdigit() or not 0 <= int(f) < len(names)]
        if bad:
            raise ValueError(f"{name}: class folders of {image_dir} must be 0..{len(names) - 1}, found {bad[:3]}")
        index_of_folder = {f: int(f) for f in folders}
    else:
        label_of = {w: i for i, w in enumerate(wnids)}
        unknown = [f for f in folders if f not in label_of]
        if unknown:
            raise ValueError(f"{name}: folder(s) {unknown[:3]} of {image_dir} are not listed in classnames.txt")
        index_of_folder = {f: label_of[f] for f in folders}
    # A and R hold 200 of the 1,000 classes: keep the present ones, in classnames.txt order
    classes = sorted(set(index_of_folder.values()))
    relabel = {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    for f in folders:
        images = list_images(image_dir / f)
        paths += images
        labels += [relabel[index_of_folder[f]]] * len(images)
    return ImageFileDataset(paths, labels, [names[c] for c in classes], name, split, transform, on_bad_image)


def _register(layout: VariantLayout) -> None:
    def build(root: str, split: str = "test", transform: Callable | None = None,
              on_bad_image: str = "raise") -> ImageFileDataset:
        return read_variant(layout.name, root, split, transform, on_bad_image)

    build.__name__ = build.__qualname__ = layout.name
    build.__doc__ = f"""{layout.description}

    Args:
        root: Folder holding ``{layout.folder}/`` (or that folder itself); see :mod:`visadapt.data.imagenet_variants`.
        split: ``"test"`` (the only split).
        transform: Applied to each PIL image.
        on_bad_image: ``"raise"`` (default) or ``"skip"`` undecodable images.
    """
    register_dataset(layout.name)(build)


for _layout in VARIANTS.values():
    _register(_layout)
