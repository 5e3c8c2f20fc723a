"""Plain ViTs for one-stream trackers (LoRAT): DINOv2-style timm ViTs whose parts a tracker runs itself.

A one-stream tracker does not call the ViT's own ``forward``: it embeds the template and the search image
separately (patch embedding only), adds its own position and token-type embeddings, concatenates the two token
sets, and runs the blocks and the final norm on them. :class:`TrackingViT` exposes exactly those parts:

* :meth:`TrackingViT.patchify`: images ``(B, 3, H, W)`` -> tokens ``(B, H/p * W/p, D)`` (any size divisible by p);
* :meth:`TrackingViT.position_grid`: the pretrained absolute position embedding without its class entry, as a
  ``(gh, gw, D)`` grid (DINOv2: 37x37);
* ``blocks`` and ``norm``.

Weights come from a local file only: the official ``dinov2_vit{s,b,l,g}14_pretrain.pth`` (read with
``weights_only=True`` and converted by timm's DINOv2 checkpoint filter) or a ``.safetensors`` state dict of the
timm model. The timm model sits under ``trunk`` so adapter targets read ``trunk.blocks.N.attn.qkv`` and the timm
presets apply (``lorat``: q, k, v slices, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2`` in every block).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from visadapt.backbones._registry import register_backbone
from visadapt.backbones.attention import matching_presets
from visadapt.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone, Preprocess
from visadapt.backbones.timm import TIMM_PRESETS

__all__ = ["TINY_TRACKING_VIT_ARGS", "TRACKING_PRESETS", "TrackingViT", "sincos_position_grid",
           "tiny_tracking_vit_backbone", "tracking_vit_backbone"]

TRACKING_PRESETS: dict[str, str] = {
    **{k: v for k, v in TIMM_PRESETS.items() if k != "conv_1x1"},
    # LoRAT: every frozen Linear of every block, the fused qkv split into three independent q, k, v adapters
    "lorat": TIMM_PRESETS["all_linear"],
}
"""Adapter target presets of :class:`TrackingViT` (module names start with ``trunk.``)."""

TINY_TRACKING_VIT_ARGS: dict[str, Any] = {
    "img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4, "init_values": None,
}
"""A four-block, width-64 ViT with 8-px patches and an 8x8 position grid (no LayerScale: with random weights a
1e-5 LayerScale would turn every block into an identity that no adapter can move)."""


class TrackingViT(nn.Module):
    """The parts of a plain (class-token) timm ViT that a one-stream tracker runs.

    Args:
        trunk: A timm ``VisionTransformer`` with an absolute position embedding.
    """

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        if getattr(trunk, "pos_embed", None) is None:
            raise ValueError(f"{type(trunk).__name__} has no absolute position embedding (pos_embed)")
        self.trunk = trunk
        self.embed_dim = int(trunk.embed_dim)
        patch = trunk.patch_embed.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        grid = trunk.patch_embed.grid_size
        self.grid_size = (int(grid[0]), int(grid[1]))
        # timm stores prefix (class / register) entries in pos_embed unless no_embed_class is set
        self.pos_prefix = 0 if getattr(trunk, "no_embed_class", False) else int(trunk.num_prefix_tokens)

    @property
    def blocks(self) -> nn.Sequential:
        return self.trunk.blocks

    @property
    def norm(self) -> nn.Module:
        return self.trunk.norm

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens ``(B, (H/p)(W/p), D)`` in row-major order, for any ``H, W`` divisible by the patch size."""
        h, w = images.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {self.patch_size}")
        x = self.trunk.patch_embed.proj(images).flatten(2).transpose(1, 2)
        return self.trunk.patch_embed.norm(x)

    def position_grid(self) -> torch.Tensor:
        """The pretrained position embedding of the patch tokens as a ``(gh, gw, D)`` grid (prefix entries dropped)."""
        pos = self.trunk.pos_embed[0, self.pos_prefix:]
        return pos.reshape(self.grid_size[0], self.grid_size[1], self.embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The plain ViT's own token features (``forward_features``)."""
        return self.trunk.forward_features(images)


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(
            f"ViT weights file not found: {path}. Expected the official DINOv2 checkpoint "
            "(dinov2_vitb14_pretrain.pth) or a .safetensors state dict of the timm model")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure: name the file
        raise ValueError(f"{path}: cannot be read as a plain state dict with weights_only=True ({err})") from None
    if not isinstance(state, dict):
        raise TypeError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


@register_backbone("tracking_vit")
def tracking_vit_backbone(
        model_name: str = "vit_base_patch14_dinov2",
        pretrained: str | None = None,
        drop_path_rate: float = 0.0,
        **kwargs: Any,
) -> Backbone:
    """A DINOv2-style timm ViT split into the parts a one-stream tracker runs (:class:`TrackingViT`).

    Args:
        model_name: timm architecture (``vit_{small,base,large}_patch14_dinov2``; ``vit_giant_patch14_dinov2`` has
            a SwiGLU MLP whose linears are ``mlp.fc1_g/fc1_x/fc2`` and needs its own target).
        pretrained: Local weights file: the official ``dinov2_vit*14_pretrain.pth`` (read with
            ``weights_only=True``; timm's DINOv2 filter converts its keys and drops ``mask_token``) or a
            ``.safetensors`` state dict of the timm model. ``None``: random weights. Nothing is downloaded.
        drop_path_rate: Stochastic depth of the blocks (LoRAT: 0 for B, 0.1 for L, 0.4 for g).
        **kwargs: Further ``timm.create_model`` arguments (``img_size``, ``embed_dim``, ``depth``, ...).

    Raises:
        FileNotFoundError: ``pretrained`` does not exist.
        ValueError: the file is not a plain state dict, or its tensors do not fit the architecture (the message
            names the file and the first offending keys).
    """
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    trunk = timm.create_model(model_name, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate, **kwargs)
    label = "random"
    if pretrained not in (None, "", "none", "random"):
        path = Path(str(pretrained)).expanduser()
        state = checkpoint_filter_fn(_load_state_dict(path), trunk)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        try:
            missing, unexpected = trunk.load_state_dict(state, strict=False)
        except RuntimeError as err:
            raise ValueError(f"{path}: the weights do not fit {model_name} ({str(err).splitlines()[0]}...)") from None
        missing = [k for k in missing if not k.startswith("head.")]
        if missing or unexpected:
            raise ValueError(f"{path}: the weights do not fit {model_name}: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}")
        label = path.name
    model = TrackingViT(trunk)
    return Backbone(
        model=model,
        family="timm",
        identity=f"timm:{model_name}:{label}",
        target_presets=matching_presets(model, TRACKING_PRESETS),
        preprocess=Preprocess(image_size=model.grid_size[0] * model.patch_size, mean=IMAGENET_MEAN,
                              std=IMAGENET_STD, interpolation="bilinear"),
        extra={"model_name": model_name, "pretrained": pretrained, "block_pattern": r"blocks\.(\d+)\.",
               "num_blocks": len(trunk.blocks)},
    )


def sincos_position_grid(height: int, width: int, dim: int) -> torch.Tensor:
    """A 2-D sine-cosine position grid ``(height, width, dim)`` (MAE's fixed embedding): a quarter of the channels
    each for ``sin(x w_k)``, ``cos(x w_k)``, ``sin(y w_k)``, ``cos(y w_k)`` with ``w_k = 10000 ** (-k / (dim / 4))``."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos grid needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                            indexing="ij")
    ax, ay = xs[..., None] * omega, ys[..., None] * omega
    return torch.cat([ax.sin(), ax.cos(), ay.sin(), ay.cos()], dim=-1).float()


@register_backbone("tiny_tracking_vit")
def tiny_tracking_vit_backbone(pretrained: str | None = None, seed: int | None = 0, depth: int = 4,
                               embed_dim: int = 64, position_init: str = "sincos", patch_size: int = 8) -> Backbone:
    """A small random ViT for the offline tracking task and tests (:data:`TINY_TRACKING_VIT_ARGS`).

    Args:
        pretrained: Optional local weights file for the same architecture.
        seed: Seed of the random weights (``None``: the global random state).
        depth: Number of blocks.
        embed_dim: Width (4 heads).
        patch_size: Patch side in pixels (8: a 64-px search crop is an 8 x 8 token grid).
        position_init: ``sincos``: the position grid is a fixed 2-D sine-cosine grid, a stand-in for a pretrained
            grid (DINOv2's learned grid is smooth and carries position; timm's random std-0.02 init carries almost
            none, and LoRAT keeps the grid frozen); ``random``: timm's init. Ignored when ``pretrained`` is given.
    """
    if position_init not in ("sincos", "random"):
        raise ValueError(f"position_init must be 'sincos' or 'random', got {position_init!r}")
    args = {**TINY_TRACKING_VIT_ARGS, "depth": depth, "embed_dim": embed_dim, "patch_size": patch_size}
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        bb = tracking_vit_backbone("vit_small_patch16_224", pretrained=pretrained, **args)
    if position_init == "sincos" and pretrained in (None, "", "none", "random"):
        vit: TrackingViT = bb.model
        gh, gw = vit.grid_size
        with torch.no_grad():
            vit.trunk.pos_embed[0, vit.pos_prefix:] = sincos_position_grid(gh, gw, vit.embed_dim).reshape(gh * gw, -1)
            vit.trunk.pos_embed[0, : vit.pos_prefix] = 0.0
    return bb
