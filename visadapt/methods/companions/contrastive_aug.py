"""Data augmentation with an added contrastive loss (Obadinma, Guo, Zhu, arXiv 2303.02577) as a callback.

The paper finds that plain task-agnostic augmentation helps parameter-efficient tuning inconsistently and adds a
contrastive loss that pulls same-class originals and augmented views together: ``L = L_CE + lambda * L_con``. For
images (reference note 2.23, "ViT" paragraph) every step here:

1. draws an augmented view of the batch's images (per-sample random resized crop and horizontal flip on the input
   tensors, from the callback's own generator: ``seed``);
2. runs the method's own ``training_step`` on the augmented batch (its loss, weighted by ``ce_weight``, is the
   augmentation's cross-entropy: the views count as extra training examples; ``ce_weight=0`` keeps only the
   contrastive use of the views) while a forward hook takes the embeddings of ``module`` (``model.visual`` for
   ClipFewShot: the pooled image features);
3. adds ``lambda_ * L_con`` over the 2B l2-normalised embeddings (originals from the real step, views from step 2).

``loss="supcon"`` (default): supervised contrastive loss (Khosla et al. 2020): positives are every other embedding
of the same class; ``loss="simclr"``: NT-Xent, the one positive is the other view of the same image. The paper does
not pin the variant or lambda; supcon with lambda 0.1 and temperature 0.1 is the documented best reading (config).

The extra terms are backpropagated in ``on_before_backward`` (``retain_graph`` for the originals' embeddings),
scaled like the loss under mixed precision and gradient accumulation; Lightning's backward then adds the task
gradient. Batches are dicts (``input_key`` / ``label_key``, default ``image`` / ``label``) or ``(x, y)`` tuples.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from visadapt.adapters import REGULARISERS
from visadapt.errors import UserError
from visadapt.methods.companions._extra_pass import step_loss


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss of l2-normalised embeddings ``z`` (N x D) with class ``labels`` (N).

    For each anchor ``i`` with at least one positive: ``-mean_{p in P(i)} log(exp(z_i.z_p/t) / sum_{a != i}
    exp(z_i.z_a/t))``, ``P(i)`` = the other embeddings of its class; averaged over those anchors.
    """
    n = z.shape[0]
    sim = z @ z.t() / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    log_prob = sim - torch.logsumexp(sim.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~self_mask
    count = pos.sum(1)
    has = count > 0
    per_anchor = -(log_prob * pos).sum(1)[has] / count[has]
    return per_anchor.mean() if has.any() else z.sum() * 0.0


def simclr_loss(z: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """NT-Xent over ``z`` = [originals; views] (2B x D): the positive of ``i`` is ``i +- B``."""
    b = z.shape[0] // 2
    pair = torch.arange(2 * b, device=z.device)
    return supcon_loss(z, torch.cat([pair[:b], pair[:b]]), temperature)


def augment(images: torch.Tensor, generator: torch.Generator, scale: tuple[float, float] = (0.5, 1.0),
            flip: float = 0.5) -> torch.Tensor:
    """Per-sample random resized crop (area fraction in ``scale``, aspect 3/4..4/3) and horizontal flip of a
    ``(B, C, H, W)`` batch, back to ``(H, W)``; random numbers from ``generator`` only."""
    b, _, h, w = images.shape
    out = []
    for i in range(b):
        u = torch.rand(4, generator=generator).tolist()
        area = (scale[0] + (scale[1] - scale[0]) * u[0]) * h * w
        ratio = torch.exp(torch.tensor(-0.2877 + 0.5754 * u[1])).item()  # log-uniform in [3/4, 4/3]
        ch = max(1, min(h, round((area / ratio) ** 0.5)))
        cw = max(1, min(w, round((area * ratio) ** 0.5)))
        top, left = int(u[2] * (h - ch + 1)), int(u[3] * (w - cw + 1))
        crop = images[i : i + 1, :, top : top + ch, left : left + cw]
        view = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)
        if torch.rand(1, generator=generator).item() < flip:
            view = view.flip(-1)
        out.append(view)
    return torch.cat(out)


@REGULARISERS.register("contrastive_aug")
class ContrastiveAug(pl.Callback):
    """Augmented views of every batch with their task loss and a supervised contrastive loss (arXiv 2303.02577).

    Args:
        module: Dotted name of the submodule whose output is the embedding (``model.visual`` for ClipFewShot).
        lambda_: Weight of the contrastive loss.
        temperature: Temperature of the contrastive loss.
        loss: ``supcon`` (same-class positives) or ``simclr`` (the other view of the same image).
        ce_weight: Weight of the method's loss on the augmented batch (0 = views only feed the contrastive loss).
        crop_scale: Area range of the random resized crop.
        flip: Probability of a horizontal flip.
        input_key: Image key of dict batches (tuple batches use element 0).
        label_key: Label key of dict batches (tuple batches use element 1).
        seed: Seed of the augmentation generator.
    """

    def __init__(self, module: str = "model.visual", lambda_: float = 0.1, temperature: float = 0.1,
                 loss: str = "supcon", ce_weight: float = 1.0, crop_scale: tuple[float, float] = (0.5, 1.0),
                 flip: float = 0.5, input_key: str = "image", label_key: str = "label", seed: int = 0) -> None:
        if loss not in ("supcon", "simclr"):
            raise ValueError(f"ContrastiveAug.loss must be 'supcon' or 'simclr', got {loss!r}")
        self.module, self.lambda_, self.temperature, self.loss = module, lambda_, temperature, loss
        self.ce_weight, self.crop_scale, self.flip = ce_weight, tuple(crop_scale), flip
        self.input_key, self.label_key = input_key, label_key
        self.generator = torch.Generator().manual_seed(seed)
        self._hook: Any = None
        self._emb: list[torch.Tensor] = []
        self._batch: Any = None
        self.last: dict[str, float] = {}

    def _submodule(self, pl_module: pl.LightningModule) -> torch.nn.Module:
        try:
            return pl_module.get_submodule(self.module)
        except AttributeError:
            raise UserError(f"contrastive_aug: {type(pl_module).__name__} has no submodule {self.module!r}; set the "
                            "callback's `module`") from None

    def _split(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(batch, dict):
            if self.input_key not in batch or self.label_key not in batch:
                raise UserError(f"contrastive_aug: the batch has keys {sorted(batch)}; set input_key / label_key")
            return batch[self.input_key], batch[self.label_key]
        return batch[0], batch[1]

    def _with_images(self, batch: Any, images: torch.Tensor) -> Any:
        if isinstance(batch, dict):
            return {**batch, self.input_key: images}
        return type(batch)([images, *batch[1:]]) if isinstance(batch, (list, tuple)) else images

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._submodule(pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._hook is not None:  # a step that never reached backward
            self._hook.remove()
        self._batch, self._batch_idx, self._emb = batch, batch_idx, []

        def keep(mod: Any, args: Any, out: Any) -> None:
            if torch.is_grad_enabled() and isinstance(out, torch.Tensor):
                self._emb.append(out)

        self._hook = self._submodule(pl_module).register_forward_hook(keep)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self._batch is None or not self._emb:
            return
        images, labels = self._split(self._batch)
        z_orig = self._emb[0]
        self._emb = []
        views = augment(images, self.generator, self.crop_scale, self.flip).to(images.dtype)
        ce_aug = step_loss(pl_module, self._with_images(self._batch, views), self._batch_idx)
        self._hook.remove()
        self._hook = None
        if not self._emb:
            raise UserError(f"contrastive_aug: {self.module} was not called on the augmented batch")
        z = F.normalize(torch.cat([z_orig, self._emb[0]]).float().flatten(1), dim=-1)
        con = supcon_loss(z, torch.cat([labels, labels]), self.temperature) if self.loss == "supcon" else \
            simclr_loss(z, self.temperature)
        extra = self.ce_weight * ce_aug + self.lambda_ * con
        self.last = {"contrastive": float(con.detach()), "ce_augmented": float(ce_aug.detach())}
        pl_module.log("contrastive_loss", self.last["contrastive"])
        pl_module.log("train_loss_augmented", self.last["ce_augmented"])
        self._batch, self._emb = None, []
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        extra = (scaler.scale(extra) if scaler is not None else extra) / trainer.accumulate_grad_batches
        extra.backward(retain_graph=True)  # the originals' graph is still needed by Lightning's backward
