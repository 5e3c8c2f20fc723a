"""DreamBooth data: the subject-folder layout, an offline Fashion-MNIST subject, and the DataModule.

**Layout** (``dreambooth``), as Google's DreamBooth dataset ships it::

    dataset/
      prompts_and_classes.txt    # optional: "subject_name,class" lines (e.g. "backpack_dog,backpack")
      backpack_dog/00.jpg 01.jpg ...
      dog/00.jpg ...

``root`` is either one subject folder (the images directly inside) or the dataset root with ``subject`` naming the
folder. The class noun comes from ``prompts_and_classes.txt`` when present, else from ``subject_class`` or the
folder name. Class images for prior preservation are a plain folder of images read the same way.

**Offline subject** (``fashion_subject``): Fashion-MNIST has no "subject", so one is made from it: a single
training image (by default the first *Sneaker* of the training split, index chosen with ``item``), painted two-tone
(red above its middle, blue below) on white at 32x32 like the base model's data (which paints every garment in ONE
of eight colours, so the base model never draws this item), and shown in ``count`` small variations (shifts of up to
2 pixels and a mirror image), like the 4-6 photos of one object in DreamBooth.

:class:`DreamBoothDataModule` pairs each instance image with the instance prompt and, with prior preservation, a
class image with the class prompt; an epoch is ``max(#instance, #class) x repeats`` items, as in diffusers'
``DreamBoothDataset``. Validation is the noise-prediction loss on the un-augmented instance images with fixed noise.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from visadapt.backbones.base import Preprocess
from visadapt.data._registry import DATASETS, register_dataset
from visadapt.data.base import ArrayImageDataset, LabeledImageDataset, ResumableDataLoader, collate, load_image
from visadapt.data.imagefolder import IMAGE_EXTENSIONS, list_images

CLASSES_FILE = "prompts_and_classes.txt"


class SubjectImages(LabeledImageDataset):
    """The images of one subject folder (label 0, class name = the subject's class noun)."""

    def __init__(self, paths: list[Path], subject_class: str, transform: Callable | None = None,
                 on_bad_image: str = "raise") -> None:
        super().__init__(transform, on_bad_image)
        self.paths = list(paths)
        self.labels = [0] * len(self.paths)
        self.classnames = [subject_class]
        if on_bad_image == "skip":
            self._drop_unreadable(("paths",))
            if not self.paths:
                raise ValueError(f"dreambooth: every image was unreadable ({'; '.join(self.skipped[:3])})")

    def load(self, index: int) -> Image.Image:
        return load_image(self.paths[index])

    def describe(self, index: int) -> str:
        return str(self.paths[index])


def read_classes_file(path: Path) -> dict[str, str]:
    """``subject_name,class`` lines of DreamBooth's ``prompts_and_classes.txt`` (other lines are ignored)."""
    out = {}
    for line in path.read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and all(parts) and " " not in parts[0] and parts[0] != "subject_name":
            out[parts[0]] = parts[1]
    return out


@register_dataset("dreambooth", help="DreamBooth subject folder (root=<subject folder> or root=<dataset>, subject=)")
def dreambooth(root: str, split: str = "train", transform: Callable | None = None, subject: str | None = None,
               subject_class: str | None = None, on_bad_image: str = "raise") -> SubjectImages:
    """Reference images of one subject in the DreamBooth layout.

    Args:
        root: A subject folder, or the dataset root holding subject folders (then ``subject`` names one).
        split: Only ``train`` (DreamBooth has no split; accepted for a uniform signature).
        transform: Applied to each PIL image.
        subject: Sub-folder of ``root`` holding the subject's images.
        subject_class: The class noun (``dog``); default: ``prompts_and_classes.txt`` if present, else the folder name.
        on_bad_image: ``raise`` (the file is named) or ``skip`` (left out and listed).
    """
    if split != "train":
        raise ValueError(f"dreambooth has only the 'train' split (reference images), got {split!r}")
    base = Path(root).expanduser()
    folder = base / subject if subject else base
    if not folder.is_dir():
        raise FileNotFoundError(
            f"dreambooth: {folder} is not a folder. Expected a folder of the subject's images (e.g. "
            f"dataset/backpack_dog/00.jpg), or root=<dataset> and subject=<sub-folder>.")
    paths = [p for p in list_images(folder) if p.parent == folder]
    if not paths:
        subs = sorted(p.name for p in folder.iterdir() if p.is_dir())
        hint = f" It has sub-folders {subs[:8]}: pass subject=<one of them>." if subs else ""
        raise FileNotFoundError(f"dreambooth: no images ({', '.join(IMAGE_EXTENSIONS)}) directly in {folder}.{hint}")
    if subject_class is None:
        for table in (folder.parent / CLASSES_FILE, folder / CLASSES_FILE):
            if table.is_file():
                subject_class = read_classes_file(table).get(folder.name)
                if subject_class:
                    break
    return SubjectImages(paths, subject_class or folder.name.replace("_", " "), transform, on_bad_image)


def paint_subject(grey: np.ndarray, colour: tuple[int, int, int], colour2: tuple[int, int, int] | None = None,
                  pad: int = 2) -> np.ndarray:
    """A greyscale Fashion-MNIST item (white on black) painted like the base model's training data (ink of level
    ``g`` becomes ``(1 - g) white + g colour`` on white, padded by ``pad`` white pixels), ``(H, W, 3)`` uint8.
    With ``colour2`` the item is two-tone: ``colour`` above the item's vertical middle, ``colour2`` below it."""
    from visadapt.data.captions import colourise

    top = colourise(grey[None], np.asarray([colour]), pad)[0]
    if colour2 is not None:
        bottom = colourise(grey[None], np.asarray([colour2]), pad)[0]
        rows = np.flatnonzero(grey.max(1) > 0)
        middle = pad + (int(rows.mean()) if len(rows) else grey.shape[0] // 2)
        top[:, middle:] = bottom[:, middle:]
    return ((top.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


def subject_variations(image: np.ndarray, count: int) -> np.ndarray:
    """``count`` views of one image: the original, its mirror, then shifts by up to 2 pixels (deterministic)."""
    shifts = [(0, 0, False), (0, 0, True), (1, 0, False), (-1, 1, True), (0, -2, False), (2, 1, True),
              (-2, -1, False), (1, 2, True)]
    if not 1 <= count <= len(shifts):
        raise ValueError(f"count must be in [1, {len(shifts)}], got {count}")
    out = []
    for dy, dx, flip in shifts[:count]:
        view = np.roll(image, (dy, dx), axis=(0, 1))  # the borders are background: wrapping moves background
        out.append(view[:, ::-1] if flip else view)
    return np.stack(out)


@register_dataset("fashion_subject", help="offline DreamBooth subject: one two-tone Fashion-MNIST item, a few views")
def fashion_subject(root: str | None = None, split: str = "train", transform: Callable | None = None,
                    classname: str = "Sneaker", item: int = 0, colour: tuple[int, int, int] = (215, 25, 30),
                    colour2: tuple[int, int, int] | None = (25, 70, 210), count: int = 5,
                    subject_class: str | None = None, on_bad_image: str = "raise") -> ArrayImageDataset:
    """One Fashion-MNIST training item, painted two-tone, in ``count`` views: an offline DreamBooth subject.

    The default subject is the first *Sneaker* of the training split, red above its middle and blue below it, on
    white, 32x32: the base model (``visadapt_t2i_base``) paints every garment in one colour, so this two-tone item
    is something it does not produce from any prompt.

    Args:
        root: Fashion-MNIST folder (see the ``fashion_mnist`` dataset).
        split: Only ``train``.
        transform: Applied to each PIL image.
        classname: Fashion-MNIST class of the item (``Sneaker``, ``Bag``, ``Ankle boot``, ...).
        item: Which item of that class (0 = the first in the training split).
        colour: RGB colour of the item (of its upper part when ``colour2`` is given); the background is white.
        colour2: RGB colour of the item's lower part; ``None`` = one colour.
        count: Number of views (1-8).
        subject_class: Class noun of the subject; default: ``classname`` in lower case.
        on_bad_image: Unused (arrays); accepted for a uniform signature.
    """
    from visadapt.data.fashion_mnist import FASHION_MNIST_CLASSES

    if split != "train":
        raise ValueError(f"fashion_subject has only the 'train' split, got {split!r}")
    if classname not in FASHION_MNIST_CLASSES:
        raise ValueError(f"classname must be one of {FASHION_MNIST_CLASSES}, got {classname!r}")
    source = DATASETS.get("fashion_mnist")(root=root, split="train")
    label = FASHION_MNIST_CLASSES.index(classname)
    picks = [i for i, y in enumerate(source.labels) if y == label]
    if not 0 <= item < len(picks):
        raise ValueError(f"item must be in [0, {len(picks)}) for {classname}, got {item}")
    grey = source.images[picks[item]]
    second = None if colour2 is None else tuple(int(c) for c in colour2)
    views = subject_variations(paint_subject(grey, tuple(int(c) for c in colour), second), count)
    name = subject_class or classname.lower()
    return ArrayImageDataset(views, [0] * count, [name], name=f"fashion_subject/{classname}/{item}",
                             transform=transform)


def dreambooth_transform(preprocess: Preprocess, train: bool, random_flip: bool = False,
                         center_crop: bool = True) -> T.Compose:
    """diffusers' DreamBooth transform: resize the short side, crop (centre, or random when training without
    ``center_crop``), optional flip, then normalise with the backbone's mean/std ([-1, 1] for diffusion models)."""
    size = preprocess.image_size
    interp = T.InterpolationMode.BICUBIC if preprocess.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    crop = T.CenterCrop(size) if center_crop or not train else T.RandomCrop(size)
    flip = [T.RandomHorizontalFlip()] if train and random_flip else []
    return T.Compose([T.Resize(size, interpolation=interp), crop, *flip, T.ToTensor(),
                      T.Normalize(preprocess.mean, preprocess.std)])


class PairedPrompts(Dataset):
    """Instance image + instance prompt (and class image + class prompt): diffusers' ``DreamBoothDataset``."""

    def __init__(self, instance: LabeledImageDataset, instance_prompt: str, class_images: LabeledImageDataset | None,
                 class_prompt: str | None, repeats: int = 1) -> None:
        self.instance, self.instance_prompt = instance, instance_prompt
        self.class_images, self.class_prompt = class_images, class_prompt
        n = len(instance) if class_images is None else max(len(instance), len(class_images))
        self.length = n * repeats

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {"image": self.instance[index % len(self.instance)]["image"], "prompt": self.instance_prompt}
        if self.class_images is not None:
            item["class_image"] = self.class_images[index % len(self.class_images)]["image"]
            item["class_prompt"] = self.class_prompt
        return item


class DreamBoothDataModule(pl.LightningDataModule):
    """Reference images of a subject with the instance prompt, plus optional class images (prior preservation).

    Args:
        dataset: Registered dataset of the subject's images (``dreambooth`` folder reader, ``fashion_subject``).
        root: The dataset's root (``dreambooth``: the subject folder or the dataset root).
        dataset_kwargs: Extra keyword arguments of the dataset (``subject``, ``classname``, ``colour``, ...).
        instance_prompt: Prompt with the identifier token, e.g. ``a photo of sks dog``.
        class_root: Folder of class images for prior preservation (``None`` = no prior preservation). Generate them
            with the base model: ``python -m visadapt generate -c <task> --prompt "a photo of dog" --num 100
            --save-images <folder> --alpha 0 --no-lora``.
        class_prompt: Prompt of the class images, e.g. ``a photo of dog`` (required with ``class_root``).
        num_class_images: Use at most this many class images (diffusers' default 100); fewer is an error.
        repeats: Repeat the training items this many times per epoch.
        batch_size: Instance images per batch (each paired with one class image under prior preservation).
        random_flip: Horizontal flips of the training images.
        center_crop: Centre crop (else a random crop) after resizing the short side.
        num_workers: DataLoader workers.
        on_bad_image: ``raise`` (names the file) or ``skip``.
        preprocess: Image size and normalisation; linked from the model by the CLI.
    """

    def __init__(self, dataset: str = "dreambooth", root: str | None = None,
                 dataset_kwargs: dict[str, Any] | None = None, instance_prompt: str = "a photo of sks dog",
                 class_root: str | None = None, class_prompt: str | None = None, num_class_images: int = 100,
                 repeats: int = 1, batch_size: int = 1, random_flip: bool = False, center_crop: bool = True,
                 num_workers: int = 0, on_bad_image: str = "raise", preprocess: Preprocess | None = None) -> None:
        super().__init__()
        if class_root is not None and not class_prompt:
            raise ValueError("data.class_prompt is required with class_root (prior preservation), e.g. 'a photo of dog'")
        if batch_size < 1 or repeats < 1:
            raise ValueError(f"batch_size and repeats must be >= 1, got {batch_size} and {repeats}")
        self.dataset, self.root, self.dataset_kwargs = dataset, root, dict(dataset_kwargs or {})
        self.instance_prompt, self.class_root, self.class_prompt = instance_prompt, class_root, class_prompt
        self.num_class_images, self.repeats, self.batch_size = num_class_images, repeats, batch_size
        self.random_flip, self.center_crop, self.num_workers = random_flip, center_crop, num_workers
        self.on_bad_image = on_bad_image
        self.preprocess = preprocess or Preprocess(image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
        self.train_set: PairedPrompts | None = None
        self.val_set: PairedPrompts | None = None

    def _instance(self, transform: Callable) -> LabeledImageDataset:
        kwargs = dict(self.dataset_kwargs)
        if self.root is not None:
            kwargs["root"] = self.root
        if self.on_bad_image != "raise":
            kwargs["on_bad_image"] = self.on_bad_image
        return DATASETS.get(self.dataset)(transform=transform, **kwargs)

    def _class(self, transform: Callable) -> LabeledImageDataset | None:
        if self.class_root is None:
            return None
        ds = dreambooth(root=self.class_root, transform=transform, on_bad_image=self.on_bad_image)
        if len(ds) < self.num_class_images:
            raise ValueError(
                f"prior preservation: {self.class_root} holds {len(ds)} class images, num_class_images asks for "
                f"{self.num_class_images}. Generate them with the base model (python -m visadapt generate -c <task> "
                f"--prompt {self.class_prompt!r} --num {self.num_class_images} --save-images {self.class_root} "
                "--no-lora) or lower data.num_class_images.")
        return ds.subset(range(self.num_class_images))

    def setup(self, stage: str | None = None) -> None:
        train_tf = dreambooth_transform(self.preprocess, True, self.random_flip, self.center_crop)
        eval_tf = dreambooth_transform(self.preprocess, False)
        self.train_set = PairedPrompts(self._instance(train_tf), self.instance_prompt, self._class(train_tf),
                                       self.class_prompt, self.repeats)
        self.val_set = PairedPrompts(self._instance(eval_tf), self.instance_prompt, self._class(eval_tf),
                                     self.class_prompt, 1)

    def reference_images(self) -> LabeledImageDataset:
        """The subject's images without transform (PIL), e.g. for image-alignment scores."""
        return self._instance(None)

    def train_dataloader(self) -> DataLoader:
        return ResumableDataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, collate_fn=collate,
                                   num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, collate_fn=collate,
                          num_workers=self.num_workers)


__all__ = [
    "DreamBoothDataModule",
    "PairedPrompts",
    "SubjectImages",
    "dreambooth",
    "dreambooth_transform",
    "fashion_subject",
    "paint_subject",
    "read_classes_file",
    "subject_variations",
]
