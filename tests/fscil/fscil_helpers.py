"""Shared helpers of the FSCIL tests: a tiny procedural dataset (registered as ``fscil_toy``) and tiny ViT settings."""

import numpy as np

from visadapt.data._registry import DATASETS, register_dataset
from visadapt.data.base import ArrayImageDataset

TOY = "fscil_toy"
TINY_VIT = ["--encoder.source=timm", "--encoder.name=vit_tiny_patch16_224",
            "--encoder.kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
            r"--encoder.lora_target=blocks\.\d+\.attn\.qkv[q,v]"]
TINY_VIT_KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


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
    return ArrayImageDataset(np.stack(images), labels, [f"class{c}" for c in range(num_classes)],
                             name=f"{TOY}/{split}", transform=transform)


if TOY not in DATASETS:
    register_dataset(TOY)(toy_dataset)

TOY_DATA = [f"--data.dataset={TOY}", "--data.root=null", "--data.index_dir=null", "--data.base_classes=3",
            "--data.way=1", "--data.shot=3", "--data.sessions=2", "--data.base_shot=null",
            "--data.test_per_class=null", "--data.image_size=32", "--data.augment=light"]
