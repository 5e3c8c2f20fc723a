"""The 11 few-shot classification datasets of CoOp / CoCoOp / CLIP-LoRA, read from the community layout.

``root`` is the folder that holds the dataset folders (CoOp's ``DATASET.ROOT``), or a dataset folder itself::

    root/
      oxford_pets/      images/             split_zhou_OxfordPets.json
      caltech-101/      101_ObjectCategories/ split_zhou_Caltech101.json
      stanford_cars/    cars_train/, cars_test/ (paths in the JSON start there)  split_zhou_StanfordCars.json
      oxford_flowers/   jpg/                split_zhou_OxfordFlowers.json
      food-101/         images/             split_zhou_Food101.json
      sun397/           SUN397/             split_zhou_SUN397.json
      dtd/              images/             split_zhou_DescribableTextures.json
      eurosat/          2750/               split_zhou_EuroSAT.json
      ucf101/           UCF-101-midframes/  split_zhou_UCF101.json
      imagenet/         images/{train,val}/<wnid>/<image>   classnames.txt ("<wnid> <class name>" per line)
      fgvc_aircraft/    images/<id>.jpg     variants.txt   images_variant_{train,val,test}.txt

A ``split_zhou_<Name>.json`` holds ``{"train": [...], "val": [...], "test": [...]}``, each entry
``[path relative to the image folder, 0-based label, class name]``. The class names in these files are already the
final ones (Caltech101's renames, SUN397's reversed paths, StanfordCars' year-first names, ...). Two rules remain:
underscores become spaces for prompts (``dataset.classnames``; the file's spelling stays in ``raw_classnames``), and
EuroSAT's folder names are expanded (``AnnualCrop`` -> ``Annual Crop Land``) when a split file still carries them.

ImageNet has no split file: train is ``images/train``, and the official 50k ``images/val`` is the test set and also
the val set (``split="val"`` and ``split="test"`` read the same images). FGVCAircraft uses the original
``variants.txt`` (label order) and ``images_variant_<split>.txt`` (``<image id> <variant name>`` per line).

``coop_split`` reads users' own datasets in this format: any ``split_zhou_*.json`` plus its image folder, class
names taken from the file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from visadapt.data._registry import register_dataset
from visadapt.data.imagefolder import SPLITS, ImageFileDataset, list_class_folders, list_images
from visadapt.data.templates import canonical_name, get_templates

EUROSAT_CLASSNAMES = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}
"""EuroSAT folder name -> the descriptive class name CoOp uses in prompts."""


@dataclass(frozen=True)
class CoOpLayout:
    """Where one dataset's files are, relative to its folder."""

    name: str
    """visadapt registry name."""
    folder: str
    """Dataset folder under ``root``."""
    image_dir: str
    """Folder the split file's paths are relative to ("" for the dataset folder itself)."""
    split_file: str | None
    """``split_zhou_*.json``; ``None`` for ImageNet and FGVCAircraft, which have their own formats."""
    title: str
    """One-line description for ``visadapt list datasets``."""
    classname_map: dict[str, str] | None = None
    """Renames applied to class names that a split file may still carry in their raw form."""

    def required(self, split: str) -> list[str]:
        """Paths (relative to the dataset folder) that must exist to read ``split``."""
        if self.name == "imagenet":
            return [f"images/{'train' if split == 'train' else 'val'}", "classnames.txt"]
        if self.name == "fgvc_aircraft":
            return ["images", "variants.txt", f"images_variant_{split}.txt"]
        return [p for p in (self.image_dir, self.split_file) if p]


LAYOUTS: dict[str, CoOpLayout] = {layout.name: layout for layout in (
    CoOpLayout("imagenet", "imagenet", "images", None, "ImageNet-1k in CoOp's layout (val is the test set)"),
    CoOpLayout("caltech101", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json",
               "Caltech101, 100 classes, CoOp split"),
    CoOpLayout("oxford_pets", "oxford_pets", "images", "split_zhou_OxfordPets.json",
               "Oxford-IIIT Pets, 37 breeds, CoOp split"),
    CoOpLayout("stanford_cars", "stanford_cars", "", "split_zhou_StanfordCars.json",
               "Stanford Cars, 196 models, CoOp split"),
    CoOpLayout("oxford_flowers", "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
               "Oxford Flowers-102, CoOp split"),
    CoOpLayout("food101", "food-101", "images", "split_zhou_Food101.json", "Food-101, CoOp split"),
    CoOpLayout("fgvc_aircraft", "fgvc_aircraft", "images", None, "FGVC-Aircraft, 100 variants, official split"),
    CoOpLayout("sun397", "sun397", "SUN397", "split_zhou_SUN397.json", "SUN397 scenes, CoOp split"),
    CoOpLayout("dtd", "dtd", "images", "split_zhou_DescribableTextures.json",
               "Describable Textures, 47 classes, CoOp split"),
    CoOpLayout("eurosat", "eurosat", "2750", "split_zhou_EuroSAT.json", "EuroSAT RGB, 10 land-use classes, CoOp split",
               EUROSAT_CLASSNAMES),
    CoOpLayout("ucf101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json",
               "UCF101 action middle frames, 101 classes, CoOp split"),
)}


class CoOpDataset(ImageFileDataset):
    """One split of a CoOp-format dataset (see the module docstring); ``template`` is CoOp's prompt for it."""

    @property
    def template(self) -> str:
        return get_templates(self.name)[0]


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------
def find_dataset_dir(layout: CoOpLayout, root: str | Path, split: str) -> Path:
    """``root/<folder>`` or ``root`` itself, whichever holds the layout; otherwise a ``FileNotFoundError``."""
    base = Path(root).expanduser()
    needed = layout.required(split)
    for candidate in (base / layout.folder, base):
        if all((candidate / p).exists() for p in needed):
            return candidate
    guess = base / layout.folder if (base / layout.folder).is_dir() or not base.is_dir() else base
    missing = [str(guess / p) for p in needed if not (guess / p).exists()]
    expected = ", ".join(f"{layout.folder}/{p}" for p in needed)
    raise FileNotFoundError(
        f"{layout.name}: CoOp layout not found under {base} (missing {', '.join(missing)}). Expected {expected} "
        f"inside root (root may also be the {layout.folder}/ folder itself); see the CoOp DATASETS.md instructions")


def classnames_by_label(entries: list[tuple[str, int]], source: Path | str) -> list[str]:
    """Class name of each label 0..n-1 from ``(classname, label)`` pairs; a conflict or a gap is an error."""
    names: dict[int, str] = {}
    for name, label in entries:
        if names.setdefault(label, name) != name:
            raise ValueError(f"{source}: label {label} is called both {names[label]!r} and {name!r}")
    missing = sorted(set(range(max(names, default=-1) + 1)) - set(names))
    if missing:
        raise ValueError(f"{source}: labels {missing[:10]} have no samples in any split")
    return [names[i] for i in range(len(names))]


def _read_split_rows(path: Path) -> dict[str, list[tuple[str, int, str]]]:
    """``{split: [(relative path, label, classname), ...]}`` from a ``split_zhou_*.json``, or an error naming it."""
    try:
        data = json.loads(path.read_text())
        return {s: [(str(p), int(y), str(c)) for p, y, c in data[s]] for s in SPLITS}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a CoOp split file ({{'train'|'val'|'test': [[path, label, classname], "
                         f"...]}}): {e!r}") from e


def read_split_json(layout: CoOpLayout, dataset_dir: Path, split: str) -> tuple[list[Path], list[int], list[str]]:
    """Paths and labels of ``split`` plus the class names of all splits, from a ``split_zhou_*.json``."""
    split_path = dataset_dir / layout.split_file
    rows = _read_split_rows(split_path)
    rename = layout.classname_map or {}
    classnames = classnames_by_label([(rename.get(c, c), y) for s in SPLITS for _, y, c in rows[s]], split_path)
    image_dir = dataset_dir / layout.image_dir
    return [image_dir / p for p, _, _ in rows[split]], [y for _, y, _ in rows[split]], classnames


def read_imagenet(dataset_dir: Path, split: str) -> tuple[list[Path], list[int], list[str]]:
    """ImageNet from ``images/train`` or ``images/val`` (for val and test); labels follow ``classnames.txt``."""
    listing = dataset_dir / "classnames.txt"
    wnids, classnames = [], []
    for line in listing.read_text().splitlines():
        if line.strip():
            wnid, _, name = line.strip().partition(" ")
            wnids.append(wnid)
            classnames.append(name.strip())
    label_of = {w: i for i, w in enumerate(wnids)}
    folder = dataset_dir / "images" / ("train" if split == "train" else "val")
    paths, labels = [], []
    for wnid in list_class_folders(folder):
        if wnid not in label_of:
            raise ValueError(f"imagenet: folder {folder / wnid} is not listed in {listing}")
        images = list_images(folder / wnid)
        paths += images
        labels += [label_of[wnid]] * len(images)
    return paths, labels, classnames


def read_fgvc_aircraft(dataset_dir: Path, split: str) -> tuple[list[Path], list[int], list[str]]:
    """FGVC-Aircraft: labels in ``variants.txt`` order, samples from ``images_variant_<split>.txt``."""
    classnames = [line.strip() for line in (dataset_dir / "variants.txt").read_text().splitlines() if line.strip()]
    label_of = {c: i for i, c in enumerate(classnames)}
    listing = dataset_dir / f"images_variant_{split}.txt"
    paths, labels = [], []
    for n, line in enumerate(listing.read_text().splitlines(), 1):
        if not line.strip():
            continue
        image_id, _, variant = line.strip().partition(" ")
        if variant not in label_of:
            raise ValueError(f"{listing}:{n}: variant {variant!r} is not in variants.txt")
        paths.append(dataset_dir / "images" / f"{image_id}.jpg")
        labels.append(label_of[variant])
    return paths, labels, classnames


def read_coop(name: str, root: str | Path, split: str = "train", transform: Callable | None = None,
              on_bad_image: str = "raise") -> CoOpDataset:
    """Read ``split`` of the CoOp dataset ``name`` (a key of :data:`LAYOUTS`) under ``root``."""
    layout = LAYOUTS[name]
    if split not in SPLITS:
        raise ValueError(f"{name}: split must be one of {SPLITS}, got {split!r}")
    dataset_dir = find_dataset_dir(layout, root, split)
    if name == "imagenet":
        paths, labels, classnames = read_imagenet(dataset_dir, split)
    elif name == "fgvc_aircraft":
        paths, labels, classnames = read_fgvc_aircraft(dataset_dir, split)
    else:
        paths, labels, classnames = read_split_json(layout, dataset_dir, split)
    return CoOpDataset(paths, labels, classnames, name, split, transform, on_bad_image)


def _register(layout: CoOpLayout) -> None:
    def build(root: str, split: str = "train", transform: Callable | None = None,
              on_bad_image: str = "raise") -> CoOpDataset:
        return read_coop(layout.name, root, split, transform, on_bad_image)

    build.__name__ = build.__qualname__ = layout.name
    build.__doc__ = f"""{layout.title}.

    Args:
        root: Folder holding ``{layout.folder}/`` (or that folder itself); see :mod:`visadapt.data.coop`.
        split: ``"train"``, ``"val"`` or ``"test"``.
        transform: Applied to each PIL image.
        on_bad_image: ``"raise"`` (default) or ``"skip"`` undecodable images (counted in ``dataset.skipped``).
    """
    register_dataset(layout.name)(build)


for _layout in LAYOUTS.values():
    _register(_layout)


# ---------------------------------------------------------------------------------------------------------------
# Users' own datasets in CoOp's format
# ---------------------------------------------------------------------------------------------------------------
def find_split_file(root: Path, split_file: str | None) -> Path:
    """The ``split_zhou_*.json`` to read: ``split_file`` (a path, or a name inside ``root``), else the only one."""
    if split_file is not None:
        for candidate in (Path(split_file).expanduser(), root / split_file):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"coop_split: split file {split_file} not found (also looked in {root})")
    if root.is_file():
        return root
    found = sorted(root.glob("split_zhou_*.json")) if root.is_dir() else []
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(f"coop_split: no split_zhou_*.json in {root}; pass split_file=<path or name>")
    raise ValueError(f"coop_split: {root} holds several split files ({', '.join(p.name for p in found)}); choose "
                     "one with split_file=<name>")


def find_image_dir(dataset_dir: Path, first_path: str, image_dir: str | None) -> Path:
    """The folder the split file's paths are relative to: ``image_dir`` if given, else the dataset folder or the one
    of its sub-folders (one level down) that holds the first listed image."""
    if image_dir is not None:
        folder = Path(image_dir).expanduser()
        folder = folder if folder.is_absolute() else dataset_dir / folder
        if not folder.is_dir():
            raise FileNotFoundError(f"coop_split: image_dir {folder} is not a folder")
        return folder
    candidates = [dataset_dir, *sorted(p for p in dataset_dir.iterdir() if p.is_dir() and not p.name.startswith("."))]
    for folder in candidates:
        if (folder / first_path).is_file():
            return folder
    raise FileNotFoundError(f"coop_split: the first image of the split file, {first_path}, is neither in {dataset_dir} "
                            "nor in one of its sub-folders; pass image_dir=<folder the paths are relative to>")


@register_dataset("coop_split")
def coop_split(root: str, split: str = "train", split_file: str | None = None, image_dir: str | None = None,
               name: str | None = None, transform: Callable | None = None, on_bad_image: str = "raise") -> CoOpDataset:
    """Any dataset in CoOp's format: a ``split_zhou_<Name>.json`` plus its image folder; class names from the file.

    Args:
        root: Dataset folder (holding the split file and the images), or the split file itself.
        split: ``"train"``, ``"val"`` or ``"test"``.
        split_file: Split file (a path, or a name inside ``root``); default: the only ``split_zhou_*.json`` in root.
        image_dir: Folder the file's paths are relative to (absolute, or relative to the dataset folder); default:
            the dataset folder or the sub-folder that holds the first listed image.
        name: Dataset name for the prompt template (a CoOp name such as ``EuroSAT`` picks CoOp's template); default:
            ``<Name>`` of ``split_zhou_<Name>.json``. Unknown names get ``a photo of a {}.``.
        transform: Applied to each PIL image.
        on_bad_image: ``"raise"`` (default) or ``"skip"`` undecodable images.
    """
    if split not in SPLITS:
        raise ValueError(f"coop_split: split must be one of {SPLITS}, got {split!r}")
    path = find_split_file(Path(root).expanduser(), split_file)
    rows = _read_split_rows(path)
    classnames = classnames_by_label([(c, y) for s in SPLITS for _, y, c in rows[s]], path)
    first = next((p for s in SPLITS for p, _, _ in rows[s]), None)
    if first is None:
        raise ValueError(f"{path}: the split file lists no image")
    folder = find_image_dir(path.parent, first, image_dir)
    stem = path.stem[len("split_zhou_"):] if path.stem.startswith("split_zhou_") else path.stem
    ds_name = canonical_name(name or stem)
    return CoOpDataset([folder / p for p, _, _ in rows[split]], [y for _, y, _ in rows[split]], classnames, ds_name,
                       split, transform, on_bad_image)
