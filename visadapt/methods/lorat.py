"""LoRAT (Lin et al., ECCV 2024, arXiv 2403.05231): a one-stream ViT tracker adapted with LoRA.

The model, as in the official ``LitingLin/LoRAT`` code (``trackit/models/methods/LoRAT/lorat.py``):

* **Input embedding.** Template (``template_size``, 112 or 196) and search (``search_size``, 224 or 378) crops go
  through the ViT's frozen patch embedding. The pretrained absolute position grid (DINOv2: 37x37, class entry
  dropped) is resized bicubically once to the *search* grid; search tokens add it, template tokens add its top-left
  template-sized sub-grid (a crop, not a second interpolation). It is frozen. Three learned token-type vectors
  (trunc-normal, std 0.02) are added: 0 template background, 1 template foreground (template cells covered by the
  rasterised template box), 2 search (``foreground_embedding: false`` uses 0 for the whole template).
* **Fusion.** ``[template ; search]`` tokens run through every block with full joint attention; after the final norm
  only the search tokens are kept. No class token.
* **Adaptation.** LoRA on every Linear of every block: q, k and v as three independent adapters on the slices of the
  fused qkv, attn.proj, mlp.fc1 and mlp.fc2 (the backbone's ``lorat`` preset); r = alpha = 64, both factors
  trunc-normal with std 0.02 ("bert" init). Any registered adapter config can replace it (``adapter:``);
  ``finetune: true`` (with no adapter) trains the whole ViT instead: the full fine-tuning baseline.
* **Head.** Two 3-layer MLPs (hidden width = embedding width, GELU) on every search token: one logit per cell (the
  score map) and four sigmoid distances ``l, t, r, b`` from the cell centre ``((j+0.5)/W, (i+0.5)/H)`` in
  normalised crop units; the box is ``(cx - l, cy - t, cx + r, cy + b)``.
* **Loss.** Positives are the cells covered by the search box scaled to the grid and rasterised (``floor(x1)`` to
  ``floor(x2 + 1 - 1e-4)``, end exclusive). Classification: BCE-with-logits summed over all cells against the
  IoU-aware soft target (IoU of the cell's predicted box with the ground truth, detached, at positives; 0
  elsewhere). Regression: GIoU loss summed over positives. Both are divided by the number of positives averaged
  over devices (``strategy.reduce(..., "mean")``, i.e. the global count over the world size, as DDP then averages
  the gradients), clamped to >= 1. Weights 1 and 1.
* **Optimisation.** AdamW (``lr 1e-4, weight_decay 0.1``) on the trainable parameters; no weight decay on 1-D
  parameters and on parameters whose name contains ``embed`` (the official rule); cosine schedule per step with a
  linear warm-up; gradient clipping comes from the trainer (1.0; 0.1 for the full fine-tuning baseline).
  ``layer_decay < 1`` scales block i's learning rate by ``layer_decay ** (depth - i)`` (patch and position
  embeddings ``layer_decay ** (depth + 1)``; head and type embeddings 1): the baseline's layer-wise decay 0.7.

For inference, :func:`plain_copy` merges the adapters into the weights and removes the adapter wrappers, so the
tracker runs a plain ViT (the official code builds the inference model without LoRA and folds the weights in with
load-state-dict hooks: the same graph). The tracker itself (crops, Hann window, box mapping) is in
:mod:`visadapt.protocols.tracking`.
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from visadapt.adapters import AdapterConfig, LoRAConfig, adapter_layers, inject, merge_adapters
from visadapt.backbones import Backbone, build_backbone
from visadapt.methods.base import AdapterModule, PlainKwargs

__all__ = ["LoRAT", "MlpHead", "box_iou", "cell_centres", "generalized_box_iou", "lorat_loss", "plain_copy",
           "rasterise_boxes", "resize_position_grid"]

RASTER_EPS = 1e-4


# -- geometry ----------------------------------------------------------------------------------------------------


def rasterise_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Cells of an ``height x width`` grid covered by normalised xyxy boxes ``(B, 4)`` -> bool ``(B, height, width)``.

    A box is scaled to the grid and rasterised as in the official label generator: columns ``floor(x1)`` up to
    ``floor(x2 + 1 - 1e-4)`` (end exclusive), likewise rows, clipped to the grid.
    """
    scale = boxes.new_tensor([width, height, width, height])
    b = boxes.float() * scale
    x1, y1 = torch.floor(b[:, 0]), torch.floor(b[:, 1])
    x2, y2 = torch.floor(b[:, 2] + 1 - RASTER_EPS), torch.floor(b[:, 3] + 1 - RASTER_EPS)
    cols = torch.arange(width, device=boxes.device, dtype=torch.float32)
    rows = torch.arange(height, device=boxes.device, dtype=torch.float32)
    in_x = (cols[None] >= x1[:, None]) & (cols[None] < x2[:, None])
    in_y = (rows[None] >= y1[:, None]) & (rows[None] < y2[:, None])
    return in_y[:, :, None] & in_x[:, None, :]


def cell_centres(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """``(height, width, 2)`` normalised cell centres ``((j + 0.5) / width, (i + 0.5) / height)``."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise IoU of xyxy boxes ``(..., 4)`` (continuous coordinates)."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return inter / (area_a + area_b - inter).clamp(min=1e-7)


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise GIoU of xyxy boxes ``(..., 4)``."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    union = (area_a + area_b - inter).clamp(min=1e-7)
    hull = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).clamp(min=0).prod(-1)
    return inter / union - (hull - union) / hull.clamp(min=1e-7)


def resize_position_grid(grid: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A ``(gh, gw, D)`` position grid resized bicubically (``align_corners=False``, no antialias) to ``(height,
    width, D)``; returned unchanged when the size already matches. Computed in float32."""
    if tuple(grid.shape[:2]) == (height, width):
        return grid.float().clone()
    g = grid.float().permute(2, 0, 1)[None]
    g = F.interpolate(g, size=(height, width), mode="bicubic", align_corners=False)
    return g[0].permute(1, 2, 0).contiguous()


def lorat_loss(scores: torch.Tensor, boxes: torch.Tensor, target: torch.Tensor,
               normaliser: torch.Tensor | float | None = None) -> dict[str, torch.Tensor]:
    """LoRAT's training loss.

    Args:
        scores: Score-map logits ``(B, H, W)``.
        boxes: Predicted normalised xyxy boxes per cell ``(B, H, W, 4)``.
        target: Ground-truth normalised xyxy search boxes ``(B, 4)``.
        normaliser: Number of positives to divide by (the cross-device mean); ``None``: this batch's count.

    Returns:
        ``loss`` (= ``cls + giou``), ``cls``, ``giou`` and ``num_pos`` (this batch's positive count).
    """
    b, h, w = scores.shape
    pos = rasterise_boxes(target, h, w)
    num_pos = pos.sum()
    norm = num_pos.float() if normaliser is None else torch.as_tensor(normaliser, dtype=torch.float32,
                                                                      device=scores.device)
    norm = norm.clamp(min=1.0)
    gt = target.float()[:, None, None, :].expand(b, h, w, 4)
    boxes = boxes.float()
    with torch.no_grad():
        soft = torch.where(pos, box_iou(boxes, gt), torch.zeros_like(scores, dtype=torch.float32))
    cls = F.binary_cross_entropy_with_logits(scores.float(), soft, reduction="sum") / norm
    giou = (1.0 - generalized_box_iou(boxes[pos], gt[pos])).sum() / norm
    return {"loss": cls + giou, "cls": cls, "giou": giou, "num_pos": num_pos}


# -- modules -----------------------------------------------------------------------------------------------------


class MlpHead(nn.Module):
    """A 3-layer MLP (hidden width = input width, GELU), trunc-normal (std 0.02) weights and zero biases."""

    def __init__(self, dim: int, out_features: int, num_layers: int = 3) -> None:
        super().__init__()
        sizes = [dim] * num_layers + [out_features]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in itertools.pairwise(sizes))
        for layer in self.layers:
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.gelu(x)
        return x


def default_lora() -> LoRAConfig:
    """LoRAT's adapter: r = alpha = 64 on q, k, v, o, fc1, fc2 of every block, both factors trunc-normal 0.02."""
    return LoRAConfig(target="lorat", r=64, alpha=64.0, dropout=0.0, init="trunc_normal", init_std=0.02)


def plain_copy(model: LoRAT) -> LoRAT:
    """A copy of ``model`` for inference: adapters merged into the weights and their wrappers replaced by the plain
    base layers (the graph of a plain ViT). ``model`` itself is left untouched."""
    trainer = model._trainer
    model._trainer = None  # never deep-copy the trainer (and its data) along
    try:
        clone = copy.deepcopy(model)
    finally:
        model._trainer = trainer
    merge_adapters(clone)
    for name, layer in adapter_layers(clone):
        parent, _, child = name.rpartition(".")
        setattr(clone.get_submodule(parent) if parent else clone, child, layer.base_layer)
    return clone.eval()


class LoRAT(AdapterModule):
    """LoRAT: a one-stream ViT tracker (template + search tokens with joint attention) trained with LoRA.

    Batches are dicts with ``template`` ``(B, 3, T, T)``, ``search`` ``(B, 3, S, S)`` (normalised images),
    ``template_box`` and ``search_box`` ``(B, 4)`` (xyxy, normalised to their crops).

    Args:
        backbone: Registered tracking ViT (``tracking_vit`` for DINOv2 weights, ``tiny_tracking_vit`` offline).
        backbone_kwargs: Builder arguments, e.g. ``{model_name: vit_base_patch14_dinov2, pretrained:
            /path/dinov2_vitb14_pretrain.pth}``.
        adapter: Adapter config (``target`` may be a backbone preset such as ``lorat``); ``None``: LoRAT's LoRA (r =
            alpha = 64, trunc-normal A and B, the ``lorat`` preset), unless ``finetune``.
        finetune: Full fine-tuning baseline: every ViT parameter trains and no adapter is injected (``adapter`` must
            be ``None``); the resized position grid trains too, as in the official baseline.
        template_size: Template crop side in pixels (a multiple of the patch size; 112 or 196 in the paper).
        search_size: Search crop side in pixels (224 or 378).
        foreground_embedding: Separate template foreground / background type embeddings (False: one template type).
        layer_decay: Layer-wise learning-rate decay (1: none; 0.7 for the full fine-tuning baseline).
        optimizer: Optimiser over the trainable parameter groups (AdamW lr 1e-4, weight decay 0.1).
        lr_scheduler: Scheduler callable; ``None`` uses the built-in ``schedule``.
        schedule: Built-in per-step schedule: ``cosine`` or ``constant``.
        warmup_steps: Linear warm-up steps of the built-in schedule.
        min_lr: Final learning rate of the cosine schedule.
    """

    def __init__(
        self,
        backbone: str = "tiny_tracking_vit",
        backbone_kwargs: PlainKwargs | None = None,
        adapter: AdapterConfig | None = None,
        finetune: bool = False,
        template_size: int = 112,
        search_size: int = 224,
        foreground_embedding: bool = True,
        layer_decay: float = 1.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        schedule: str = "cosine",
        warmup_steps: int = 0,
        min_lr: float = 1e-6,
    ) -> None:
        super().__init__(optimizer, lr_scheduler, schedule, warmup_steps, min_lr)
        if finetune and adapter is not None:
            raise ValueError("model.finetune: true trains the whole ViT; set model.adapter: null")
        if not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"model.layer_decay must be in (0, 1], got {layer_decay}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "adapter"])
        self.hparams["adapter"] = None if adapter is None else {"class": type(adapter).__name__, **asdict(adapter)}
        bb: Backbone = build_backbone(backbone, **(backbone_kwargs or {}))
        self.backbone_info = bb
        self.vit: nn.Module = bb.model
        self.preprocess = bb.preprocess
        p = self.vit.patch_size
        for name, size in (("template_size", template_size), ("search_size", search_size)):
            if size % p:
                raise ValueError(f"model.{name}={size} is not a multiple of the backbone's patch size {p}")
        if template_size > search_size:
            raise ValueError(f"model.template_size={template_size} must not exceed search_size={search_size}")
        self.template_size, self.search_size = template_size, search_size
        self.z_grid = template_size // p
        self.x_grid = search_size // p
        self.embed_dim = int(self.vit.embed_dim)
        self.foreground_embedding = foreground_embedding
        self.finetune = finetune
        self.layer_decay = layer_decay
        for prm in self.vit.parameters():
            prm.requires_grad_(finetune)
        # the shared position grid: resized once to the search grid, frozen (trainable in the full-FT baseline)
        with torch.no_grad():
            grid = resize_position_grid(self.vit.position_grid().detach(), self.x_grid, self.x_grid)
        self.pos_embed = nn.Parameter(grid.reshape(1, self.x_grid * self.x_grid, self.embed_dim),
                                      requires_grad=finetune)
        self.adapter_cfg = None
        if not finetune:
            cfg = adapter if adapter is not None else default_lora()
            cfg = copy.copy(cfg)
            cfg.target = bb.resolve_target(cfg.target)
            self.adapter_cfg = cfg
            self.injection = inject(self.vit, cfg)
        self.token_type_embed = nn.Parameter(torch.empty(3, self.embed_dim))
        nn.init.trunc_normal_(self.token_type_embed, std=0.02)
        self.cls_head = MlpHead(self.embed_dim, 1)
        self.reg_head = MlpHead(self.embed_dim, 4)
        self.register_buffer("centres", cell_centres(self.x_grid, self.x_grid), persistent=False)
        self.report: dict[str, Any] = {"backbone": bb.identity}

    # -- forward ---------------------------------------------------------------------------------------------------
    def template_mask(self, template_box: torch.Tensor) -> torch.Tensor:
        """Token-type indices of the template tokens ``(B, z*z)``: 1 inside the rasterised box, else 0."""
        if not self.foreground_embedding:
            return torch.zeros(template_box.shape[0], self.z_grid ** 2, dtype=torch.long, device=template_box.device)
        return rasterise_boxes(template_box, self.z_grid, self.z_grid).flatten(1).long()

    def template_positions(self) -> torch.Tensor:
        """The top-left ``z x z`` sub-grid of the search position grid, flattened: ``(1, z*z, D)``."""
        g = self.pos_embed.view(1, self.x_grid, self.x_grid, self.embed_dim)[:, : self.z_grid, : self.z_grid]
        return g.reshape(1, self.z_grid ** 2, self.embed_dim)

    def embed_template(self, template: torch.Tensor, template_box: torch.Tensor) -> torch.Tensor:
        """Template tokens with positions and type embeddings ``(B, z*z, D)`` (computed once per sequence)."""
        z = self.vit.patchify(template)
        return z + self.template_positions() + self.token_type_embed[self.template_mask(template_box)]

    def embed_search(self, search: torch.Tensor) -> torch.Tensor:
        x = self.vit.patchify(search)
        return x + self.pos_embed + self.token_type_embed[2].view(1, 1, -1)

    def fuse(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Joint attention over ``[z ; x]`` in every block; the normalised search tokens ``(B, x*x, D)``."""
        tokens = torch.cat((z, x), dim=1)
        for block in self.vit.blocks:
            tokens = block(tokens)
        return self.vit.norm(tokens)[:, z.shape[1]:]

    def head(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score-map logits ``(B, H, W)`` and normalised xyxy boxes ``(B, H, W, 4)`` (computed in float32)."""
        b = tokens.shape[0]
        scores = self.cls_head(tokens).float().view(b, self.x_grid, self.x_grid)
        ltrb = self.reg_head(tokens).float().sigmoid().view(b, self.x_grid, self.x_grid, 4)
        c = self.centres
        return scores, torch.cat((c - ltrb[..., :2], c + ltrb[..., 2:]), dim=-1)

    def forward_embedded(self, z: torch.Tensor, search: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward with precomputed template tokens (the tracker's per-frame call)."""
        return self.head(self.fuse(z, self.embed_search(search)))

    def forward(self, template: torch.Tensor, search: torch.Tensor,
                template_box: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_embedded(self.embed_template(template, template_box), search)

    # -- training ----------------------------------------------------------------------------------------------------
    def _positive_normaliser(self, num_pos: torch.Tensor) -> torch.Tensor:
        """The positive count averaged over devices (the global count / world size)."""
        if self._trainer is not None and self.trainer.world_size > 1:
            return self.trainer.strategy.reduce(num_pos.float(), reduce_op="mean")
        return num_pos.float()

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        scores, boxes = self(batch["template"], batch["search"], batch["template_box"])
        target = batch["search_box"].float()
        num_pos = rasterise_boxes(target, self.x_grid, self.x_grid).sum()
        out = lorat_loss(scores, boxes, target, self._positive_normaliser(num_pos))
        with torch.no_grad():  # IoU of the box at the score argmax: what the tracker would output
            flat = scores.flatten(1).argmax(1)
            best = boxes.flatten(1, 2)[torch.arange(len(flat), device=flat.device), flat]
            iou = box_iou(best, target).mean()
        n = target.shape[0]
        self.log(f"{stage}_loss", out["loss"], prog_bar=True, batch_size=n, sync_dist=stage != "train")
        self.log(f"{stage}_loss_cls", out["cls"], batch_size=n, sync_dist=stage != "train")
        self.log(f"{stage}_loss_giou", out["giou"], batch_size=n, sync_dist=stage != "train")
        self.log(f"{stage}_iou", iou, prog_bar=stage != "train", batch_size=n, sync_dist=stage != "train")
        return out["loss"]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    # -- optimisation ------------------------------------------------------------------------------------------------
    def _layer_id(self, name: str, depth: int) -> int:
        """0 for the patch and position embeddings, i + 1 for block i, depth + 1 for the rest (head, types, norm)."""
        m = re.search(r"blocks\.(\d+)\.", name)
        if m:
            return int(m.group(1)) + 1
        if "patch_embed" in name or name == "pos_embed" or name.endswith(".pos_embed") or "cls_token" in name:
            return 0
        return depth + 1

    def param_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters grouped by weight decay (none on 1-D and ``*embed*`` parameters, the official rule)
        and, with ``layer_decay < 1``, by learning-rate scale (``lr_scale``, applied in ``configure_optimizers``)."""
        depth = len(self.vit.blocks)
        groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
        for name, prm in self.named_parameters():
            if not prm.requires_grad:
                continue
            no_decay = prm.ndim <= 1 or "embed" in name
            scale = self.layer_decay ** (depth + 1 - self._layer_id(name, depth)) if self.layer_decay < 1 else 1.0
            groups.setdefault((no_decay, scale), []).append(prm)
        if not groups:
            raise RuntimeError("LoRAT has no trainable parameter: check the adapter target")
        out = []
        for (no_decay, scale), params in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            group: dict[str, Any] = {"params": params, "lr_scale": scale}
            if no_decay:
                group["weight_decay"] = 0.0
            out.append(group)
        return out

    # -- bookkeeping -------------------------------------------------------------------------------------------------
    def trainable_counts(self) -> dict[str, int]:
        """Trainable parameter counts: adapters, head, type embeddings, and the total."""
        counts = {"adapter": 0, "head": 0, "type_embed": 0, "backbone": 0}
        for name, prm in self.named_parameters():
            if not prm.requires_grad:
                continue
            key = ("adapter" if ".adapters." in name else "head" if name.startswith(("cls_head", "reg_head"))
                   else "type_embed" if name == "token_type_embed" else "backbone")
            counts[key] += prm.numel()
        counts["total"] = sum(counts.values())
        return counts

    def on_fit_start(self) -> None:
        self.report["trainable"] = self.trainable_counts()
        self.report["grid"] = {"template": self.z_grid, "search": self.x_grid}

