"""diffusers UNets from local folders, plus a tiny random UNet for tests.

``diffusers_unet`` reads a ``UNet2DConditionModel`` written by ``save_pretrained``, either a pipeline folder (the
UNet in its ``unet/`` subfolder) or the UNet folder itself, with ``local_files_only=True``. The backbone's model is
the UNet itself, so module names (and the presets) are diffusers' own: ``...attn1.to_q`` (self-attention),
``...attn2.to_k`` (cross-attention to the text), ``...ff.net.0.proj``. The ``attn`` preset is the target list of
diffusers' own DreamBooth-LoRA scripts (``to_q``, ``to_k``, ``to_v``, ``to_out.0``), so adapters exported from
it load with ``load_lora_weights``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from visadapt.backbones._registry import register_backbone
from visadapt.backbones.attention import matching_presets
from visadapt.backbones.base import Backbone, Preprocess

__all__ = ["DIFFUSERS_UNET_PRESETS", "TINY_UNET_CONFIG", "diffusers_unet_backbone", "tiny_unet_backbone"]

_PROJ = r"(to_q|to_k|to_v|to_out\.0)"
DIFFUSERS_UNET_PRESETS: dict[str, str] = {
    "attn": rf".*attn[12]\.{_PROJ}",
    "attn_qkv": r".*attn[12]\.(to_q|to_k|to_v)",
    "attn_qv": r".*attn[12]\.(to_q|to_v)",
    "attn_proj": r".*attn[12]\.to_out\.0",
    "attn_qkv_proj": rf".*attn[12]\.{_PROJ}",  # same as "attn"; the name shared with the other families
    "self_attn": rf".*attn1\.{_PROJ}",
    "cross_attn": rf".*attn2\.{_PROJ}",
    # Custom Diffusion (Kumari et al., CVPR 2023) fine-tunes only the cross-attention key and value projections.
    "cross_attn_kv": r".*attn2\.(to_k|to_v)",
    "ff": r".*ff\.net\.(0\.proj|2)",
    "mlp": r".*ff\.net\.(0\.proj|2)",  # same as "ff"
    "all_linear": rf".*(attn[12]\.{_PROJ}|ff\.net\.(0\.proj|2))",
}
"""Target presets on diffusers ``UNet2DConditionModel`` (module names of diffusers' ``BasicTransformerBlock``)."""

TINY_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
"""A two-level conditional UNet on 8x8 latents with 32-wide text conditioning (runs in milliseconds)."""

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _unet_backbone(unet: Any, identity: str, extra: dict[str, Any]) -> Backbone:
    vae_scale = 8  # latent-to-pixel factor of the Stable Diffusion VAE (three 2x downsamplings)
    return Backbone(
        model=unet,
        family="diffusers",
        identity=identity,
        target_presets=matching_presets(unet, DIFFUSERS_UNET_PRESETS),
        # Stable Diffusion pipelines scale pixels to [-1, 1] before the VAE.
        preprocess=Preprocess(
            image_size=int(unet.config.sample_size) * vae_scale, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        ),
        extra={"sample_size": int(unet.config.sample_size), "cross_attention_dim": unet.config.cross_attention_dim,
               **extra},
    )


@register_backbone("diffusers_unet")
def diffusers_unet_backbone(model_dir: str, subfolder: str | None = None, dtype: str | None = None) -> Backbone:
    """A diffusers ``UNet2DConditionModel`` from a local pipeline or UNet folder.

    Args:
        model_dir: A pipeline folder (with ``unet/config.json``) or a UNet folder (with ``config.json``), as
            written by ``save_pretrained``; or a Hub id already in the local cache.
        subfolder: Folder of the UNet inside ``model_dir``. None picks ``unet`` when that folder exists.
        dtype: Parameter dtype (``float32``, ``float16``, ``bfloat16``); None keeps the stored one.

    Raises:
        FileNotFoundError: When no UNet config is found at the expected place.
    """
    from diffusers import UNet2DConditionModel

    root = Path(model_dir).expanduser()
    if subfolder is None and (root / "unet" / "config.json").is_file():
        subfolder = "unet"
    kwargs: dict[str, Any] = {"local_files_only": True}
    if subfolder:
        kwargs["subfolder"] = subfolder
    if dtype is not None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        kwargs["torch_dtype"] = _DTYPES[dtype]
    config_dir = root / subfolder if subfolder else root
    if root.exists() and not (config_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"No UNet config at {config_dir / 'config.json'}. Expected a pipeline folder with "
            f"{root}/unet/config.json and {root}/unet/diffusion_pytorch_model.safetensors, or a UNet folder with "
            "config.json and diffusion_pytorch_model.safetensors (save_pretrained layout)."
        )
    try:
        unet = UNet2DConditionModel.from_pretrained(str(root) if root.exists() else model_dir, **kwargs)
    except (OSError, ValueError) as err:
        if root.exists():
            raise
        raise FileNotFoundError(
            f"diffusers UNet not found: {model_dir!r} is not a local folder and not in the Hugging Face cache "
            "(visadapt never downloads). Expected a pipeline folder with unet/config.json and "
            "unet/diffusion_pytorch_model.safetensors."
        ) from err
    return _unet_backbone(unet, f"diffusers:unet:{root.name}", {"model_dir": model_dir, "subfolder": subfolder})


@register_backbone("tiny_unet")
def tiny_unet_backbone(seed: int | None = None) -> Backbone:
    """A tiny randomly initialised conditional UNet (8x8 latents, 32-wide text states) for tests and demos.

    Args:
        seed: Seed for the random weights; None draws them from the global random state.
    """
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    return _unet_backbone(unet, "diffusers:unet:tiny", {})
