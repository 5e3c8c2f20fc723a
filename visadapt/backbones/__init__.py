"""Backbone builders (open_clip, timm, transformers, diffusers, the offline DeViSE preset, tiny test models).

``build_backbone(name, **kwargs)`` looks the name up in the registry; ``python -m visadapt list backbones`` shows
what is registered.
"""

from visadapt.backbones import (
    attention,  # noqa: F401  (fused-qkv attention normalisation)
    devise,  # noqa: F401  (registers devise_effnet_minilm)
    diffusers,  # noqa: F401  (registers diffusers_unet, tiny_unet)
    effnet,  # noqa: F401  (registers effnet_lite0)
    hf,  # noqa: F401  (registers hf_text, hf_clip, hf_vit and their tiny_*)
    open_clip,  # noqa: F401  (registers open_clip, tiny_open_clip)
    t2i,  # noqa: F401  (registers sd_local, sdxl_local, tiny_sd, tiny_sdxl, visadapt_t2i_base)
    timm,  # noqa: F401  (registers timm, tiny_vit)
    tiny,  # noqa: F401  (index of the tiny test backbones)
    vlm,  # noqa: F401  (registers manipshield_vlm, tiny_vlm, hf_vlm)
    tracking_vit,  # noqa: F401  (registers tracking_vit, tiny_tracking_vit)
)
from visadapt.backbones._registry import BACKBONES, register_backbone
from visadapt.backbones.base import Backbone, DualEncoder, ImageEncoder, Preprocess, to_device


def build_backbone(name: str, **kwargs) -> Backbone:
    """Build the registered backbone ``name`` with builder keyword arguments ``kwargs``."""
    return BACKBONES.get(name)(**kwargs)


__all__ = [
    "BACKBONES", "Backbone", "DualEncoder", "ImageEncoder", "Preprocess", "build_backbone", "register_backbone",
    "to_device",
]
