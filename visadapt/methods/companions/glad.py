"""GLAD as a companion any method can use: the plain gradient steered by the sharpness-aware (SAM) gradient.

GLAD ("Generalizable LoRA tuning with RegulArized GraDient", arXiv 2507.13089) uses the SAM gradient as a reference
that steers the plain gradient. The rules (``project``, the default: ProGrad's projection with the SAM gradient as
reference; ``mix``; ``decompose``), their defaults and the pure functions live in :mod:`visadapt.methods.glad`; this
callback runs them inside Lightning's automatic optimisation, so CLIP few-shot, FSCIL, tracking or any other
method gets GLAD without code of its own::

    python -m visadapt fit -c tasks/clip_fewshot.yaml -c configs/companions/glad.yaml

One step (in ``on_after_backward``, after Lightning's backward of the method's loss):

1. ``g`` = the gradient Lightning just computed (under gradient accumulation: this batch's share, the gradient
   before the backward is remembered in ``on_before_backward``);
2. trainable parameters move by ``rho * g / ||g||``; the method's ``training_step`` runs again on the **same batch
   with the same dropout mask** (the random state captured in ``on_train_batch_start`` is restored); its gradient
   ``g_sam`` is taken with ``torch.autograd.grad`` (``.grad`` untouched); the parameters move back;
3. ``.grad`` becomes ``combine(g, g_sam)``; Lightning then clips (if asked) and steps the optimiser as usual.

Under fp16 mixed precision the SAM loss is scaled by the same loss scale (every rule is homogeneous in (g, g_sam));
a non-finite ``g`` skips the perturbation so that the scaler skips the step. Under DDP ``g_sam`` is averaged over
processes like ``g``. The extra pass does not log (``train_loss`` is the plain loss); ``train_loss_sam`` and
``glad_cos`` (cosine of g and g_sam) are logged.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from visadapt.adapters import REGULARISERS
from visadapt.methods.companions._extra_pass import require_automatic_optimisation, step_loss, trainable
from visadapt.methods.glad import GladConfig, combine, cosine, perturbation
from visadapt.rng import capture_rng_states, restore_rng_states


@REGULARISERS.register("glad")
class Glad(pl.Callback):
    """GLAD: the method's gradient combined with the SAM gradient of the same batch (two passes per step).

    Args:
        rho: SAM neighbourhood radius (perturbation norm).
        rule: ``project`` (ProGrad's projection, default), ``mix`` or ``decompose`` (see :mod:`visadapt.methods.glad`).
        alpha: Coefficient of the rule; ``None`` = the rule's default (project 0, mix 0.5, decompose 0.5).
        granularity: Inner products per parameter tensor (``tensor``, ProGrad's) or over one flat vector (``flat``).
    """

    def __init__(self, rho: float = 0.05, rule: str = "project", alpha: float | None = None,
                 granularity: str = "tensor") -> None:
        self.config = GladConfig(rho=rho, rule=rule, alpha=alpha, granularity=granularity)
        self._batch: Any = None
        self._rng: dict[str, Any] | None = None
        self._before: list[torch.Tensor | None] | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        require_automatic_optimisation(pl_module, "glad")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                              batch_idx: int) -> None:
        self._batch, self._batch_idx = batch, batch_idx
        self._rng = capture_rng_states()  # the SAM pass replays this batch's dropout masks

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        # gradient accumulation: what earlier micro-batches left in .grad is not this batch's gradient
        grads = [p.grad for p in trainable(pl_module)]
        self._before = None if all(g is None for g in grads) else [
            None if g is None else g.detach().clone() for g in grads]

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._batch is None:
            return
        params = trainable(pl_module)
        before = self._before or [None] * len(params)
        g = [torch.zeros_like(p) if p.grad is None else (p.grad.detach() if b is None else p.grad.detach() - b)
             for p, b in zip(params, before)]
        eps = perturbation(g, self.config.rho)
        after_first = capture_rng_states()
        with torch.no_grad():
            for p, e in zip(params, eps):
                p.add_(e)
        try:
            restore_rng_states(self._rng)
            with torch.enable_grad():
                loss_sam = step_loss(pl_module, self._batch, self._batch_idx)
                scaler = getattr(trainer.precision_plugin, "scaler", None)
                scaled = scaler.scale(loss_sam) if scaler is not None else loss_sam
                scaled = scaled / trainer.accumulate_grad_batches  # as Lightning normalises the plain loss
                g_sam = torch.autograd.grad(scaled, params, allow_unused=True)
        finally:
            with torch.no_grad():
                for p, e in zip(params, eps):
                    p.sub_(e)
            restore_rng_states(after_first)
        g_sam = [torch.zeros_like(p) if x is None else x for p, x in zip(params, g_sam)]
        if trainer.world_size > 1:
            g_sam = [trainer.strategy.reduce(x, reduce_op="mean") for x in g_sam]
        cfg = self.config
        with torch.no_grad():
            for p, b, d in zip(params, before, combine(g, g_sam, cfg.rule, cfg.alpha, cfg.granularity)):
                p.grad = d if b is None else b + d
        n = _batch_size(self._batch)
        pl_module.log("train_loss_sam", loss_sam.detach(), batch_size=n)
        pl_module.log("glad_cos", cosine(g, g_sam), batch_size=n)
        self._batch = self._before = None


def _batch_size(batch: Any) -> int | None:
    """Size of a dict / tuple / tensor batch, for logging (``None`` lets Lightning infer it)."""
    first = batch.get("label", next(iter(batch.values()), None)) if isinstance(batch, dict) else (
        batch[0] if isinstance(batch, (list, tuple)) and batch else batch)
    return len(first) if isinstance(first, torch.Tensor) and first.ndim > 0 else None
