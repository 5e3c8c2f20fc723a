"""What every backbone builder returns, and the two model interfaces the methods rely on.

A builder returns a :class:`Backbone`: the ``nn.Module`` plus the facts generic code needs — named adapter
target presets (regular expressions matched in full against module names), the preprocessing the weights
expect, and an identity string recorded in adapter files so that loading onto another model fails clearly.

Two interfaces cover the methods:

* :class:`DualEncoder` (CLIP-style): ``encode_image(images)``, ``tokenize(texts)``, ``encode_text(tokens)``.
* :class:`ImageEncoder`: ``forward(images) -> features`` with ``feature_dim``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Preprocess:
    """Image preprocessing the backbone's weights expect."""

    image_size: int = 224
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    interpolation: str = "bicubic"


@dataclass
class Backbone:
    """A built model plus what generic code needs to adapt and feed it."""

    model: nn.Module
    family: str
    """Library family: ``open_clip``, ``timm``, ``hf``, ``diffusers``, ``devise`` or ``tiny``."""
    identity: str
    """Stable description of architecture and weights, written into adapter files."""
    target_presets: dict[str, str] = field(default_factory=dict)
    """Preset name -> regular expression (fullmatch on module names, ``[q,v]`` suffix for fused-qkv slices)."""
    preprocess: Preprocess = field(default_factory=Preprocess)
    extra: dict[str, Any] = field(default_factory=dict)

    def resolve_target(self, target: str) -> str:
        """A preset name becomes its regular expression; anything else is returned unchanged."""
        return self.target_presets.get(target, target)


class DualEncoder(nn.Module):
    """Interface of CLIP-style dual encoders (subclasses implement the three methods).

    Features are returned unnormalised; callers L2-normalise. ``logit_scale`` is the fixed temperature the
    pretrained model uses (100 for CLIP).
    """

    logit_scale: float = 100.0

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def tokenize(self, texts: list[str]) -> Any:
        """Token tensors (or a dict of tensors) on the CPU; move them with :func:`to_device`."""
        raise NotImplementedError

    def encode_text(self, tokens: Any) -> torch.Tensor:
        raise NotImplementedError


class ImageEncoder(nn.Module):
    """Interface of image encoders used by classification-style methods: ``forward(images) -> (B, feature_dim)``."""

    feature_dim: int


def to_device(tokens: Any, device: torch.device | str) -> Any:
    """Move a tensor or a dict of tensors to ``device``."""
    if isinstance(tokens, dict):
        return {k: v.to(device) for k, v in tokens.items()}
    return tokens.to(device)
