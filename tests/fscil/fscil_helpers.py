"""Shared helpers of the FSCIL tests: a tiny procedural dataset (registered as ``fscil_toy``), a variant with
unreadable images (``fscil_toy_bad``) and tiny-ViT settings."""

import numpy as np

from visadapt.data._registry import DATASETS, register_dataset
from visadapt.data.base import ArrayImageDataset, BadImageError

TOY = "fscil_toy"
TOY_BAD = "fscil_toy_bad"
TINY_VIT = ["--model.backbone=tiny_vit", "--model.backbone_kwargs={seed: 0}",
            "--model.adapter=visadapt.adapters.LoRAConfig", "--model.adapter.target=attn_qv",
            "--model.adapter.r=16", "--model.adapter.alpha=16.0", "--model.adapter.dropout=0.1"]
BAD_TRAIN = {4, 25}  # base-class images of classes 0 and 2
BAD_TEST = {0, 17}  # test images of class 0 (base) and class 3 (the first novel class)


def toy_dataset(root=None, split="train", transform=None, num_classes=6, per_class=10, on_bad_image="raise"):
    """Coloured 16x16 squares: each class has its own colour and stripe position, plus per-image noise."""
    rng = np.random.default_rng(0 if split == "train" else 1)
    n = per_class if split == "train" else max(per_class // 2, 2)
    images, labels = [], []
    for c in range(num_classes):
        colour = np.array([(37 * c) % 256, (91 * c + 40) % 256, (151 * c + 80) % 256], dtype=np.float64)
        for _ in range(n):
            img = np.tile(colour, (16, 16, 1)) + rng.normal(0, 25, (16, 16, 3))
            img[c * 2: c * 2 + 3, :, :] = 255 - img[c * 2: c * 2 + 3, :, :]
            images.append(np.clip(img, 0, 255).astype(np.uint8))
            labels.append(c)
    ds = ArrayImageDataset(np.stack(images), labels, [f"class{c}" for c in range(num_classes)],
                           name=f"{TOY}/{split}", transform=transform)
    ds.on_bad_image = on_bad_image
    return ds


class _WithBadImages(ArrayImageDataset):
    bad: frozenset = frozenset()

    def load(self, index):
        if index in self.bad:
            raise BadImageError(f"cannot decode image {self.describe(index)}: truncated file")
        return super().load(index)


def toy_dataset_bad(root=None, split="train", transform=None, on_bad_image="raise"):
    """``fscil_toy`` whose images ``BAD_TRAIN`` / ``BAD_TEST`` cannot be read."""
    good = toy_dataset(split=split)
    ds = _WithBadImages(good.images, good.labels, good.classnames, name=f"{TOY_BAD}/{split}", transform=transform)
    ds.bad = BAD_TRAIN if split == "train" else BAD_TEST
    ds.on_bad_image = on_bad_image
    return ds


if TOY not in DATASETS:
    register_dataset(TOY)(toy_dataset)
if TOY_BAD not in DATASETS:
    register_dataset(TOY_BAD)(toy_dataset_bad)

TOY_DATA = [f"--data.dataset={TOY}", "--data.root=null", "--data.index_dir=null", "--data.base_classes=3",
            "--data.way=1", "--data.shot=3", "--data.sessions=2", "--data.base_shot=null",
            "--data.test_per_class=null", "--data.image_size=32", "--data.augment=light", "--data.split_rule=auto"]
