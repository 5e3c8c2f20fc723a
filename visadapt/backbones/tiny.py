"""The tiny test backbones in one place: what is registered, example inputs, and writers of on-disk copies.

Every family has a randomly initialised ``tiny_*`` backbone (two layers, width 32-64) that runs in milliseconds on a
CPU; the builders live next to their family's loader. The ``save_tiny_*`` functions write the same models in each
library's own on-disk layout, so tests (and demos) can exercise the real path-based loaders offline:

=====================  ====================================  ==============================================
backbone               interface                             on-disk copy, loaded by
=====================  ====================================  ==============================================
``tiny_open_clip``     DualEncoder (open_clip)               ``save_tiny_open_clip`` -> ``open_clip``
``tiny_hf_clip``       DualEncoder (transformers CLIP)       ``save_tiny_hf("clip")`` -> ``hf_clip``
``tiny_vit``           ImageEncoder (timm ViT)               ``save_tiny_timm`` -> ``timm``
``tiny_hf_vit``        ImageEncoder (transformers ViT)       ``save_tiny_hf("vit")`` -> ``hf_vit``
``tiny_bert_text``     text encoder (transformers BERT)      ``save_tiny_hf("bert")`` -> ``hf_text``
``tiny_unet``          diffusers ``UNet2DConditionModel``    ``save_tiny_unet`` -> ``diffusers_unet``
=====================  ====================================  ==============================================
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from visadapt.backbones import diffusers as _diffusers
from visadapt.backbones import hf as _hf
from visadapt.backbones import open_clip as _open_clip
from visadapt.backbones import timm as _timm

__all__ = [
    "TINY_BACKBONES", "example_inputs", "save_tiny_hf", "save_tiny_open_clip", "save_tiny_timm", "save_tiny_unet",
]

TINY_BACKBONES: dict[str, str] = {
    "tiny_open_clip": "dual_encoder",
    "tiny_hf_clip": "dual_encoder",
    "tiny_vit": "image_encoder",
    "tiny_hf_vit": "image_encoder",
    "tiny_bert_text": "text_encoder",
    "tiny_unet": "unet",
}
"""Registered tiny backbone name -> the interface its model implements."""

_TEXTS = ["a photo of a cat.", "a blurry photo of a dog"]


def example_inputs(name: str, batch: int = 2, seed: int = 0) -> dict[str, Any]:
    """Inputs for the tiny backbone ``name``: ``images`` and/or ``texts``, or the UNet's keyword arguments.

    Args:
        name: A key of :data:`TINY_BACKBONES`.
        batch: Batch size.
        seed: Seed of the random tensors.
    """
    gen = torch.Generator().manual_seed(seed)
    kind = TINY_BACKBONES[name]
    texts = [_TEXTS[i % len(_TEXTS)] for i in range(batch)]
    if kind == "dual_encoder":
        return {"images": torch.randn(batch, 3, 32, 32, generator=gen), "texts": texts}
    if kind == "image_encoder":
        return {"images": torch.randn(batch, 3, 32, 32, generator=gen)}
    if kind == "text_encoder":
        return {"texts": texts}
    cfg = _diffusers.TINY_UNET_CONFIG
    size = cfg["sample_size"]
    return {
        "sample": torch.randn(batch, cfg["in_channels"], size, size, generator=gen),
        "timestep": torch.randint(0, 1000, (batch,), generator=gen),
        "encoder_hidden_states": torch.randn(batch, 5, cfg["cross_attention_dim"], generator=gen),
    }


def _seeded(seed: int | None, build: Any) -> Any:
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        return build()


def save_tiny_open_clip(folder: str | Path, seed: int | None = 0) -> Path:
    """Write the tiny open_clip model as a ``local-dir:`` folder (``open_clip_config.json`` + safetensors).

    The weights use open_clip's own (unnormalised) names, as any released checkpoint does. The same file loads
    with ``open_clip_backbone("visadapt-tiny-clip", pretrained=<folder>/open_clip_model.safetensors)``.

    Args:
        folder: Destination folder (created if needed).
        seed: Seed of the random weights (``tiny_open_clip(seed=...)`` gives the same model).

    Returns:
        The folder.
    """
    import open_clip
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _open_clip.register_open_clip_config(_open_clip.TINY_OPEN_CLIP_NAME, _open_clip.TINY_OPEN_CLIP_CFG)
    model = _seeded(seed, lambda: open_clip.create_model(_open_clip.TINY_OPEN_CLIP_NAME, force_custom_text=True))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    config = {
        "model_cfg": {**_open_clip.TINY_OPEN_CLIP_CFG, "custom_text": True},
        "preprocess_cfg": {k: v for k, v in model.visual.preprocess_cfg.items() if k in ("size", "mean", "std",
                                                                                           "interpolation")},
    }
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


def save_tiny_timm(folder: str | Path, seed: int | None = 0) -> Path:
    """Write the tiny timm ViT with ``timm.models.save_for_hf`` (``config.json`` + ``model.safetensors``).

    Args:
        folder: Destination folder (created if needed).
        seed: Seed of the random weights (``tiny_vit(seed=...)`` gives the same model).

    Returns:
        The folder.
    """
    import timm
    from timm.models import save_for_hf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = _seeded(seed, lambda: timm.create_model("vit_tiny_patch16_224", num_classes=0, **_timm.TINY_VIT_ARGS))
    save_for_hf(model, str(folder), safe_serialization=True)
    return folder


def save_tiny_hf(kind: str, folder: str | Path, seed: int | None = 0) -> Path:
    """Write a tiny transformers model (and its tokenizer) with ``save_pretrained``.

    Args:
        kind: ``bert`` (loads with ``hf_text``), ``clip`` (``hf_clip``) or ``vit`` (``hf_vit``).
        folder: Destination folder (created if needed).
        seed: Seed of the random weights (the matching ``tiny_*`` builder with this seed gives the same model).

    Returns:
        The folder.
    """
    from transformers import BertConfig, BertModel, BertTokenizer, CLIPConfig, CLIPModel, ViTConfig, ViTModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "bert":
        vocab = _hf.tiny_wordpiece_vocab()
        model = _seeded(seed, lambda: BertModel(BertConfig(vocab_size=len(vocab), **_hf.TINY_BERT_CONFIG)))
        BertTokenizer(vocab=vocab).save_pretrained(str(folder))
    elif kind == "clip":
        model = _seeded(seed, lambda: CLIPModel(CLIPConfig(**_hf.TINY_HF_CLIP_CONFIG)))
        context = _hf.TINY_HF_CLIP_CONFIG["text_config"]["max_position_embeddings"]
        _hf.write_clip_tokenizer(folder, context_length=context)
    elif kind == "vit":
        model = _seeded(seed, lambda: ViTModel(ViTConfig(**_hf.TINY_HF_VIT_CONFIG)))
    else:
        raise ValueError(f"kind must be 'bert', 'clip' or 'vit', got {kind!r}")
    model.save_pretrained(str(folder))
    return folder


def save_tiny_unet(folder: str | Path, seed: int | None = 0) -> Path:
    """Write the tiny UNet in the pipeline layout (``<folder>/unet/config.json`` + safetensors).

    Args:
        folder: Destination pipeline folder (created if needed).
        seed: Seed of the random weights (``tiny_unet(seed=...)`` gives the same model).

    Returns:
        The folder.
    """
    folder = Path(folder)
    unet = _diffusers.tiny_unet_backbone(seed=seed).model
    unet.save_pretrained(str(folder / "unet"))
    return folder
