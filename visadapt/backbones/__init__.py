"""Backbone builders (open_clip, timm, transformers, diffusers, the offline DeViSE preset, tiny test models).

``build_backbone(name, **kwargs)`` looks the name up in the registry; ``python -m visadapt list backbones`` shows
what is registered.
"""

from visadapt.backbones._registry import BACKBONES, register_backbone
from visadapt.backbones.base import Backbone, DualEncoder, ImageEncoder, Preprocess, to_device


def build_backbone(name: str, **kwargs) -> Backbone:
    """Build the registered backbone ``name`` with builder keyword arguments ``kwargs``."""
    return BACKBONES.get(name)(**kwargs)


__all__ = [
    "BACKBONES", "Backbone", "DualEncoder", "ImageEncoder", "Preprocess", "build_backbone", "register_backbone",
    "to_device",
]
