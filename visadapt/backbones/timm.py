"""timm image encoders, loaded offline from a local weights file or a ``local-dir:`` folder.

Weights go through timm's own loading path (``pretrained=True`` with ``pretrained_cfg_overlay=dict(file=...)``), so
the model's checkpoint filter runs: position embeddings are resampled to a new ``img_size``, a classifier of the
wrong size is dropped, ``.npz`` big_vision files are converted. Nothing is downloaded: a name that is neither a file
nor a folder is an error.

The timm model sits under ``trunk`` in :class:`TimmImageEncoder`, so its module names read
``trunk.blocks.N.attn.qkv`` and the presets carry that prefix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from visadapt.backbones._registry import register_backbone
from visadapt.backbones.attention import matching_presets
from visadapt.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone, ImageEncoder, Preprocess

__all__ = ["TIMM_PRESETS", "TINY_VIT_ARGS", "TimmImageEncoder", "timm_backbone", "tiny_vit_backbone"]

_BLOCK = r"trunk\.blocks\.\d+"
TIMM_PRESETS: dict[str, str] = {
    # Vision transformers (timm's stable module names: blocks.N.attn.qkv / attn.proj / mlp.fc1 / mlp.fc2).
    # attn_qkv: three independent adapters on the q, k, v slices of the fused qkv (as on every other family);
    # attn_qkv_fused: one adapter on the whole fused matrix (PEFT's "qkv" target).
    "attn_qkv": rf"{_BLOCK}\.attn\.qkv[q,k,v]",
    "attn_qv": rf"{_BLOCK}\.attn\.qkv[q,v]",
    "attn_qkv_fused": rf"{_BLOCK}\.attn\.qkv",
    "attn_proj": rf"{_BLOCK}\.attn\.proj",
    "attn_qkv_proj": rf"{_BLOCK}\.attn\.qkv[q,k,v]|{_BLOCK}\.attn\.proj",
    "mlp": rf"{_BLOCK}\.mlp\.fc[12]",
    "all_linear": rf"{_BLOCK}\.attn\.qkv[q,k,v]|{_BLOCK}\.(attn\.proj|mlp\.fc[12])",
    # EfficientNet / MobileNet style convnets: pointwise expansion and projection convs plus the 1x1 head conv.
    "conv_1x1": r"trunk\.(blocks\.\d+\.\d+\.conv_(pw|pwl)|conv_head)",
}
"""Target presets on timm models; a backbone keeps only those that match its modules."""

TINY_VIT_ARGS: dict[str, Any] = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
"""``vit_tiny_patch16_224`` shrunk to two blocks of width 32 on 32x32 images (16 patches)."""

_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz", ".ckpt")


class TimmImageEncoder(ImageEncoder):
    """A timm model behind the :class:`~visadapt.backbones.base.ImageEncoder` interface.

    ``forward`` returns the pooled pre-logit features ``(B, feature_dim)`` whether or not the model has a
    classifier; :meth:`logits` runs the classifier too.

    Args:
        trunk: A timm model.
    """

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk
        self.feature_dim = int(getattr(trunk, "head_hidden_size", None) or trunk.num_features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk.forward_head(self.trunk.forward_features(images), pre_logits=True)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unpooled features (tokens for ViTs, feature maps for convnets)."""
        return self.trunk.forward_features(images)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Classifier outputs (identical to ``forward`` when the model was built with ``num_classes=0``)."""
        return self.trunk(images)


def _weights_source(pretrained: str | None) -> tuple[str, str | None]:
    """``(kind, path)`` with kind ``random``, ``file`` or ``local-dir``."""
    if pretrained in (None, "", "none", "random"):
        return "random", None
    if pretrained.startswith("local-dir:"):
        folder = Path(pretrained[len("local-dir:"):]).expanduser()
        _check_local_dir(folder)
        return "local-dir", str(folder)
    path = Path(pretrained).expanduser()
    if path.is_dir():
        _check_local_dir(path)
        return "local-dir", str(path)
    if path.is_file():
        return "file", str(path)
    if path.suffix in _WEIGHT_SUFFIXES or "/" in pretrained or "\\" in pretrained:
        raise FileNotFoundError(
            f"timm weights file not found: {path}. Expected a state-dict file (.safetensors preferred; .pth/.bin "
            "are read with weights_only=True; .npz for big_vision ViTs), or 'local-dir:<folder>' with "
            "config.json and model.safetensors as written by timm.models.save_for_hf."
        )
    raise ValueError(
        f"pretrained={pretrained!r} is not a local file or folder. visadapt never downloads timm weights: save them "
        "once (e.g. timm.models.save_for_hf) and pass the file path or 'local-dir:<folder>'."
    )


def _check_local_dir(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"timm local folder {folder} has no config.json. Expected layout: {folder}/config.json "
            f"(with 'architecture') and {folder}/model.safetensors, as written by timm.models.save_for_hf."
        )


def _preprocess(model: nn.Module, img_size: int | None) -> Preprocess:
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    if img_size is not None:
        size = img_size
    elif getattr(getattr(model, "patch_embed", None), "img_size", None) is not None:
        size = model.patch_embed.img_size  # the size the ViT was actually built for
    else:
        size = cfg.get("input_size", (3, 224, 224))[-1]
    if isinstance(size, (tuple, list)):
        size = max(size)
    return Preprocess(
        image_size=int(size),
        mean=tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(float(v) for v in cfg.get("std", IMAGENET_STD)),
        interpolation=str(cfg.get("interpolation", "bicubic")),
    )


@register_backbone("timm")
def timm_backbone(
        model_name: str,
        pretrained: str | None = None,
        num_classes: int = 0,
        img_size: int | None = None,
        **kwargs: Any,
) -> Backbone:
    """A timm model as an image encoder returning pooled features.

    Args:
        model_name: timm architecture, e.g. ``vit_base_patch16_224`` or ``tf_efficientnet_lite0`` (a ``.tag``
            suffix selects that tag's preprocessing). Ignored in favour of the folder's ``config.json`` when
            ``pretrained`` is a folder.
        pretrained: Local weights: None for random init, a file (``.safetensors`` preferred) loaded through the
            model's checkpoint filter, or ``local-dir:<folder>`` / a folder with ``config.json`` and weights.
        num_classes: Classifier size; 0 (the default) removes the classifier.
        img_size: Input resolution override for ViTs (loaded position embeddings are resampled).
        **kwargs: Further ``timm.create_model`` arguments (``drop_path_rate``, ``patch_size``, ...).

    Returns:
        A :class:`Backbone` whose ``model`` is a :class:`TimmImageEncoder`.

    Raises:
        FileNotFoundError: When ``pretrained`` looks like a path that does not exist, or a folder lacks
            ``config.json``.
        ValueError: When ``pretrained`` names something that would have to be downloaded.
    """
    import timm

    kind, path = _weights_source(pretrained)
    create_kwargs: dict[str, Any] = dict(num_classes=num_classes, **kwargs)
    if img_size is not None:
        create_kwargs["img_size"] = img_size
    if kind == "local-dir":
        model = timm.create_model(f"local-dir:{path}", pretrained=True, **create_kwargs)
        label = f"local-dir:{Path(path).name}"
    elif kind == "file":
        # custom_load=False: some default cfgs (big_vision ViTs) mark their *hub* weights as .npz; a local
        # .safetensors/.pth must take the ordinary state-dict path. .npz files keep timm's npz loader.
        overlay = {"file": path, "custom_load": path.endswith(".npz")}
        model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay, **create_kwargs)
        label = Path(path).name
    else:
        model = timm.create_model(model_name, pretrained=False, **create_kwargs)
        label = "random"

    encoder = TimmImageEncoder(model)
    arch = getattr(model, "pretrained_cfg", {}).get("architecture") or model_name
    return Backbone(
        model=encoder,
        family="timm",
        identity=f"timm:{arch}:{label}",
        target_presets=matching_presets(encoder, TIMM_PRESETS),
        preprocess=_preprocess(model, img_size),
        extra={
            "model_name": arch, "pretrained": pretrained, "num_classes": num_classes,
            "feature_dim": encoder.feature_dim,
            # one group capturing the block index (ViT block, or convnet stage), searched in parameter names
            "block_pattern": r"blocks\.(\d+)\.",
        },
    )


@register_backbone("tiny_vit")
def tiny_vit_backbone(pretrained: str | None = None, num_classes: int = 0, seed: int | None = None) -> Backbone:
    """A two-block, width-32, randomly initialised timm ViT on 32x32 images, for tests and demos.

    Args:
        pretrained: Optional local weights file for the tiny architecture (used by round-trip tests).
        num_classes: Classifier size; 0 removes the classifier.
        seed: Seed for the random weights; None draws them from the global random state.
    """
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        return timm_backbone("vit_tiny_patch16_224", pretrained=pretrained, num_classes=num_classes, **TINY_VIT_ARGS)
