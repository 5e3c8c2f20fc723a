"""ALLoRA (Huang, Balestriero et al., "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws", arXiv 2410.09692;
no official code known): an unscaled LoRA (``y = W x + B A x``: no ``alpha / r``, no dropout) whose parameters move
at a rate inversely proportional to their norm.

The rate. The reference notes' best reading of the paper is ``g <- g / sqrt(|theta|^2 + 1/eta^2)``: a step of about
``eta`` while the norm is about 0 (``B`` at init, which speeds its escape from 0), shrinking as ``1/|theta|`` as the
norm grows. The exact formula and the ``eta`` default are not confirmed from the paper's full text. Here ``eta`` is
the optimiser's current learning rate (or the ``eta`` option), and the coefficient

    c(theta) = 1 / sqrt(1 + eta^2 |theta|^2)        (so that lr * c = 1 / sqrt(|theta|^2 + 1/eta^2))

multiplies the optimiser's *update* of each vector (``theta_new = theta + c(theta) (step(theta) - theta)``, applied by
optimiser step hooks). With SGD this is exactly the gradient form above; with AdamW (the methods' default) scaling the
gradient would be undone by Adam's normalisation, so the coefficient acts where a learning rate acts. The norm is
taken per rank-one component (``granularity = "vector"``, default: each row of ``A`` and each column of ``B``, the
notes' "per row/vector"), per element, or per matrix.

No scaling and no dropout: a LoRA adapter with ``dropout > 0`` or a scale other than 1 (``alpha != r``, or rsLoRA with
``alpha != sqrt(r)``) is refused with a message saying what to set, unless ``allow_scaled: true`` (then the rate
applies on top of the scale and dropout, which is not ALLoRA). Plain LoRA pairs only.
"""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch
from torch import Tensor

from visadapt.adapters import OPTIMISERS
from visadapt.errors import UserError
from visadapt.methods.companions.lora_ga import plain_lora_parts

Granularity = Literal["vector", "element", "matrix"]


def allora_coefficient(theta: Tensor, eta: float, granularity: Granularity = "vector", axis: int = 1) -> Tensor:
    """``1 / sqrt(1 + eta^2 |theta|^2)``, broadcastable to ``theta``; the norm is over ``axis`` for ``vector``
    (``axis=1``: rows, for ``A``; ``axis=0``: columns, for ``B``), per element, or over the whole matrix."""
    t = theta.detach().float()
    if granularity == "vector":
        norm2 = t.pow(2).sum(dim=axis, keepdim=True)
    elif granularity == "element":
        norm2 = t.pow(2)
    elif granularity == "matrix":
        norm2 = t.pow(2).sum()
    else:
        raise ValueError(f"granularity must be vector, element or matrix, got {granularity!r}")
    return torch.rsqrt(1.0 + eta**2 * norm2)


@OPTIMISERS.register("allora")
class ALLoRA(pl.Callback):
    """ALLoRA: per-vector rates lr/sqrt(1 + lr²|θ|²) on an unscaled, dropout-free LoRA (applied to the optimiser's update).

    Args:
        eta: ``eta`` of the rate; ``None`` = each parameter group's current learning rate.
        granularity: Norm per rank-one component (``vector``: rows of A, columns of B), per ``element`` or ``matrix``.
        allow_scaled: Accept an adapter with dropout or a scale != 1 instead of refusing it (not ALLoRA any more).
        adapter: Adapter name; ``None`` = the model's only adapter (plain LoRA pairs only).
    """

    def __init__(self, eta: float | None = None, granularity: Granularity = "vector", allow_scaled: bool = False,
                 adapter: str | None = None) -> None:
        if eta is not None and not eta > 0:
            raise ValueError(f"eta must be > 0 (or null), got {eta}")
        if granularity not in ("vector", "element", "matrix"):
            raise ValueError(f"granularity must be vector, element or matrix, got {granularity!r}")
        self.eta, self.granularity, self.allow_scaled, self.adapter = eta, granularity, allow_scaled, adapter
        self._axes: dict[int, int] = {}  # id(parameter) -> norm axis (1 for A rows, 0 for B columns)
        self._before: dict[int, Tensor] = {}
        self._handles: list = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        parts = plain_lora_parts(pl_module, self.adapter, "ALLoRA", "sets the rates of the two factors of a LoRA update")
        if not self.allow_scaled:
            for part in parts:
                dropout = getattr(part.layer.configs[part.adapter], "dropout", 0.0)
                if dropout > 0 or abs(part.core.scale - 1.0) > 1e-12:
                    raise UserError(
                        f"ALLoRA trains an unscaled LoRA without dropout (its adaptive rate replaces alpha and dropout); "
                        f"the adapter on {part.key} has dropout={dropout} and scale {part.core.scale:g}. Set "
                        f"`dropout: 0.0` and `alpha` equal to `r` (rslora: false) in the adapter config, as "
                        "configs/companions/allora.yaml does, or set allow_scaled: true to keep them")
        self._axes = {}
        for part in parts:
            self._axes[id(part.core.lora_A)] = 1
            self._axes[id(part.core.lora_B)] = 0
        self._params = {id(p): p for part in parts for p in (part.core.lora_A, part.core.lora_B)}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        for optimizer in trainer.optimizers:
            self._handles.append(optimizer.register_step_pre_hook(self._pre_step))
            self._handles.append(optimizer.register_step_post_hook(self._post_step))

    def _pre_step(self, optimizer, args, kwargs) -> None:
        self._before = {id(p): p.detach().clone() for g in optimizer.param_groups for p in g["params"]
                        if id(p) in self._axes}

    @torch.no_grad()
    def _post_step(self, optimizer, args, kwargs) -> None:
        for group in optimizer.param_groups:
            eta = self.eta if self.eta is not None else float(group["lr"])
            for p in group["params"]:
                old = self._before.get(id(p))
                if old is None:
                    continue
                coef = allora_coefficient(old, eta, self.granularity, self._axes[id(p)]).to(p.dtype)
                p.copy_(old + coef * (p - old))
        self._before = {}

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()
