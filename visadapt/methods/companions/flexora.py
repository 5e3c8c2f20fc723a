"""Flexora (Flexible Low-Rank Adaptation, ACL'25, arXiv 2408.10774): layer selection as hyperparameter optimisation,
solved by unrolled differentiation; the chosen layers come out as an inject config.

Search run (this callback, on a fit whose adapter covers every candidate layer):

1. **Init:** a scalar ``alpha_l`` per layer multiplies the contribution of every adapter in that layer (a layer is
   a block of the model's layer stack, timm ``blocks.N`` / open_clip ``resblocks.N`` / HF ``encoder.layer.N``;
   an adapted module outside any stack is a layer of its own); ``alpha_l = 1`` at the start (plain LoRA).
2. **Selection:** the method's optimiser trains the adapters on training batches as usual (inner problem); every
   ``every`` steps ``alpha`` takes one Adam step (``alpha_lr``) on the gradient of the held-out loss through one
   unrolled inner step (outer problem), ``d/d alpha L_val(w - xi grad_w L_train(w, alpha), alpha)``:

   ``grad_alpha L_val(w', alpha) - xi * [grad_alpha L_train(w+, alpha) - grad_alpha L_train(w-, alpha)] / (2 eps)``

   with ``w' = w - xi grad_w L_train``, ``w+- = w +- eps grad_w' L_val(w', alpha)`` and ``eps = fd_eps / |grad_w'|``:
   the second-order term's Hessian-vector product by central differences (DARTS, Liu et al. 2019, eq. 7-8), which
   needs first-order gradients only (the adapter layers' fused kernels have no double backward). ``xi`` is the
   optimiser's current learning rate unless ``unroll_lr`` is set. Losses are the method's ``training_step``.
3. **Output:** layers ranked by ``alpha``; kept: those with ``alpha`` above the mean (the count chosen
   automatically; ``top_k`` fixes it). A YAML adapter fragment naming their adapted modules in ``target`` (every
   other adapter setting kept) is written to ``out`` (default ``<log dir>/flexora_selection.yaml``); the
   fine-tuning stage is a normal fit with it::

       python -m visadapt fit -c tasks/clip_fewshot.yaml -c configs/companions/flexora.yaml   # search
       python -m visadapt fit -c tasks/clip_fewshot.yaml -c runs/clip_fewshot/version_N/flexora_selection.yaml

Unverified in the paper's public material (best readings, config options): whether alpha is normalised (here it is
a raw scale, initialised at 1) and the exact threshold (here: above the mean of alpha).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch

from visadapt.adapters import SCHEDULES
from visadapt.methods.companions._extra_pass import require_automatic_optimisation, step_loss, trainable
from visadapt.methods.companions._selection import (
    ScaledAdapters,
    cycle,
    held_out_loader,
    injection_root,
    selection_fragment,
    write_fragment,
)
from visadapt.methods.companions.lisa import STACK_NAMES
from visadapt.rng import capture_rng_states, restore_rng_states


def unrolled_hypergradient(train_loss: Callable[[], torch.Tensor], val_loss: Callable[[], torch.Tensor],
                           weights: list[torch.Tensor], hyper: list[torch.Tensor], lr: float,
                           fd_eps: float = 0.01) -> list[torch.Tensor]:
    """``d/d hyper L_val(w - lr grad_w L_train(w, hyper), hyper)`` with the Hessian-vector product by central
    differences (DARTS eq. 7-8). ``weights`` are leaf tensors, moved in place and restored exactly; the losses are
    closures that read them."""
    saved = [w.detach().clone() for w in weights]
    g_train = torch.autograd.grad(train_loss(), weights, allow_unused=True)
    try:
        with torch.no_grad():
            for w, g in zip(weights, g_train):
                if g is not None:
                    w.sub_(lr * g)
        grads = torch.autograd.grad(val_loss(), [*hyper, *weights], allow_unused=True)
        d_hyper = [torch.zeros_like(h) if g is None else g for h, g in zip(hyper, grads[: len(hyper)])]
        d_w = [torch.zeros_like(w) if g is None else g for w, g in zip(weights, grads[len(hyper):])]
        norm = torch.sqrt(sum((g.float() ** 2).sum() for g in d_w))
        if not torch.isfinite(norm) or norm == 0:
            return d_hyper
        eps = fd_eps / norm
        second = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for w, s, g in zip(weights, saved, d_w):
                    w.copy_(s + sign * eps * g)
            g_h = torch.autograd.grad(train_loss(), hyper, allow_unused=True)
            second.append([torch.zeros_like(h) if g is None else g for h, g in zip(hyper, g_h)])
        return [d - lr * (p - m) / (2 * eps) for d, p, m in zip(d_hyper, *second)]
    finally:
        with torch.no_grad():
            for w, s in zip(weights, saved):
                w.copy_(s)


def select_above_mean(scores: list[float], top_k: int | None = None) -> list[int]:
    """Indices kept: ``top_k`` highest (ties by position) or, when ``None``, those strictly above the mean."""
    if top_k is not None:
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        return sorted(order[:top_k])
    mean = sum(scores) / len(scores)
    kept = [i for i, s in enumerate(scores) if s > mean]
    return kept or [max(range(len(scores)), key=lambda i: (scores[i], -i))]


def layer_groups(pl_module: pl.LightningModule, stack: str | None) -> dict[str, list[str]]:
    """Layer name -> full names of its adapter layers (the block of a layer stack containing it, else itself)."""
    import re

    from visadapt.adapters import adapter_layers

    pattern = re.compile(rf"({stack or STACK_NAMES})\.\d+")
    groups: dict[str, list[str]] = {}
    for name, _ in adapter_layers(pl_module):
        parts, key = name.split("."), name
        for cut in range(len(parts) - 1, 0, -1):  # the longest prefix that is a numbered block of a stack
            if pattern.fullmatch(".".join(parts[:cut])):
                key = ".".join(parts[:cut])
                break
        groups.setdefault(key, []).append(name)
    return groups


@SCHEDULES.register("flexora")
class Flexora(pl.Callback):
    """Flexora: per-layer scales learnt by unrolled differentiation on held-out batches; kept layers -> inject config.

    Args:
        every: Optimiser steps between two alpha steps.
        alpha_lr: Adam learning rate of alpha.
        unroll_lr: Learning rate of the unrolled virtual SGD step; ``None`` = the optimiser's current rate.
        fd_eps: Relative step of the finite-difference Hessian-vector product.
        top_k: Keep this many layers; ``None`` keeps those with alpha above the mean.
        stack: Regular expression of the layer containers (default: timm / open_clip / HF stacks).
        held_out: Where the outer batches come from: ``val`` (the datamodule's validation loader) or ``train``.
        out: Path of the YAML fragment; ``None`` = ``flexora_selection.yaml`` in the run's log directory.
    """

    def __init__(self, every: int = 1, alpha_lr: float = 0.05, unroll_lr: float | None = None, fd_eps: float = 0.01,
                 top_k: int | None = None, stack: str | None = None, held_out: str = "val",
                 out: str | None = None) -> None:
        if held_out not in ("val", "train"):
            raise ValueError(f"Flexora.held_out must be 'val' or 'train', got {held_out!r}")
        self.every, self.alpha_lr, self.unroll_lr, self.fd_eps = every, alpha_lr, unroll_lr, fd_eps
        self.top_k, self.stack, self.held_out, self.out = top_k, stack, held_out, out
        self.groups: dict[str, list[str]] = {}
        self.alpha: torch.Tensor | None = None
        self.selected: list[str] = []
        self.fragment: dict[str, Any] | None = None
        self.path = None
        self._hooks: ScaledAdapters | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        require_automatic_optimisation(pl_module, "flexora")
        injection_root(pl_module)  # one adapter, related to its target: fail before training
        self.groups = layer_groups(pl_module, self.stack)
        names = list(self.groups)
        self.alpha = torch.ones(len(names), device=pl_module.device, requires_grad=True)
        self.alpha_opt = torch.optim.Adam([self.alpha], lr=self.alpha_lr)
        index = {m: names.index(g) for g, ms in self.groups.items() for m in ms}
        from visadapt.adapters import adapter_layers

        scale_of = {m: (lambda i=i: self.alpha[i]) for m, i in index.items()}
        self._hooks = ScaledAdapters(adapter_layers(pl_module), scale_of)
        self._held_out = cycle(held_out_loader(trainer, pl_module, self.held_out))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch, self._batch_idx = batch, batch_idx

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if int(trainer.global_step) % self.every:
            return
        val = trainer.strategy.batch_to_device(next(self._held_out))
        lr = self.unroll_lr if self.unroll_lr is not None else float(trainer.optimizers[0].param_groups[0]["lr"])
        rng = capture_rng_states()

        def on(batch: Any, idx: int) -> Callable[[], torch.Tensor]:
            def loss() -> torch.Tensor:
                restore_rng_states(rng)  # every pass of the unroll sees the same dropout masks
                return step_loss(pl_module, batch, idx)
            return loss

        with torch.enable_grad():
            grad = unrolled_hypergradient(on(self._batch, self._batch_idx), on(val, 0), trainable(pl_module),
                                          [self.alpha], lr, self.fd_eps)[0]
        restore_rng_states(rng)
        self.alpha_opt.zero_grad()
        self.alpha.grad = grad.detach()
        self.alpha_opt.step()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        names = list(self.groups)
        scores = [float(a) for a in self.alpha.detach().cpu()]
        kept = select_above_mean(scores, self.top_k)
        self.selected = [m for i in kept for m in self.groups[names[i]]]
        ranking = sorted(zip(names, scores), key=lambda t: -t[1])
        rule = f"top {self.top_k}" if self.top_k else "alpha above the mean"
        header = ("Flexora layer selection (visadapt.methods.companions.flexora): adapter target = the kept layers\n"
                  f"kept {len(kept)} of {len(names)} layers ({rule})\n"
                  + "alpha: " + json.dumps({n: round(s, 4) for n, s in ranking}))
        text, self.fragment = selection_fragment(pl_module, self.selected, header)
        self.path = write_fragment(text, self.out, trainer, "flexora_selection.yaml")
        self.scores = dict(zip(names, scores))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
