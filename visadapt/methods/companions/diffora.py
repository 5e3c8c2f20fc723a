"""DiffoRA (arXiv 2502.08905): module selection with a Differential Adaptation Matrix (DAM), continuous relaxation
and discretisation; the kept modules come out as an inject config.

Search run (this callback, on a fit whose adapter covers every candidate module, e.g. qkv, proj, fc1, fc2 of every
block):

1. **DAM, relaxed:** each adapted module ``i`` gets a logit ``beta_i``; its adapter's contribution is multiplied by
   ``gamma_i = sigmoid(beta_i)``, the continuous relaxation of the binary keep/drop entry (a softmax over the two
   choices {keep, drop} with logits ``(beta_i, 0)`` is the same number). ``beta = 0`` at the start (``gamma = 0.5``).
2. **Alternating (DARTS-style) optimisation:** the method's optimiser trains the adapter weights on training batches;
   every ``every`` steps ``beta`` takes one Adam step on the held-out loss (first-order: the gradient at the current
   weights).
3. **Discretisation:** keep the ``ceil(keep_ratio * N)`` modules with the largest ``gamma`` (ties by module order),
   written as a YAML adapter fragment whose ``target`` names them (``out``, default
   ``<log dir>/diffora_selection.yaml``); fine-tune with it::

       python -m visadapt fit -c tasks/clip_fewshot.yaml -c configs/companions/diffora.yaml   # search
       python -m visadapt fit -c tasks/clip_fewshot.yaml -c runs/clip_fewshot/version_N/diffora_selection.yaml

Unverified in the paper's public material (best readings, config options): the relaxation (sigmoid here), the keep
ratio (0.5) and the schedule (first-order alternation every step). The paper's weight sharing (re-using the search's
adapter weights for the kept modules) is not done: the fine-tuning fit starts from a fresh adapter.
"""

from __future__ import annotations

import json
import math
from typing import Any

import lightning.pytorch as pl
import torch

from visadapt.adapters import SCHEDULES, adapter_layers
from visadapt.methods.companions._extra_pass import require_automatic_optimisation, step_loss
from visadapt.methods.companions._selection import (
    ScaledAdapters,
    cycle,
    held_out_loader,
    injection_root,
    selection_fragment,
    write_fragment,
)
from visadapt.rng import capture_rng_states, restore_rng_states


def discretise(gammas: list[float], keep_ratio: float) -> list[int]:
    """Indices of the ``ceil(keep_ratio * N)`` largest ``gammas`` (ties: the earlier module), in module order."""
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    k = max(1, math.ceil(keep_ratio * len(gammas) - 1e-9))
    order = sorted(range(len(gammas)), key=lambda i: (-gammas[i], i))
    return sorted(order[:k])


@SCHEDULES.register("diffora")
class DiffoRA(pl.Callback):
    """DiffoRA: a sigmoid-relaxed keep/drop scale per adapted module learnt on held-out data; top ones -> inject config.

    Args:
        keep_ratio: Fraction of the adapted modules kept by the discretisation.
        every: Optimiser steps between two DAM steps.
        dam_lr: Adam learning rate of the DAM logits.
        held_out: Where the DAM batches come from: ``val`` (the datamodule's validation loader) or ``train``.
        out: Path of the YAML fragment; ``None`` = ``diffora_selection.yaml`` in the run's log directory.
    """

    def __init__(self, keep_ratio: float = 0.5, every: int = 1, dam_lr: float = 0.05, held_out: str = "val",
                 out: str | None = None) -> None:
        discretise([0.0], keep_ratio)  # validates keep_ratio
        if held_out not in ("val", "train"):
            raise ValueError(f"DiffoRA.held_out must be 'val' or 'train', got {held_out!r}")
        self.keep_ratio, self.every, self.dam_lr, self.held_out, self.out = keep_ratio, every, dam_lr, held_out, out
        self.names: list[str] = []
        self.beta: torch.Tensor | None = None
        self.selected: list[str] = []
        self.fragment: dict[str, Any] | None = None
        self.path = None
        self._hooks: ScaledAdapters | None = None

    def gammas(self) -> list[float]:
        """The relaxed DAM entries ``sigmoid(beta)``, one per adapted module."""
        return [float(g) for g in torch.sigmoid(self.beta.detach()).cpu()]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        require_automatic_optimisation(pl_module, "diffora")
        injection_root(pl_module)
        layers = adapter_layers(pl_module)
        self.names = [n for n, _ in layers]
        self.beta = torch.zeros(len(layers), device=pl_module.device, requires_grad=True)
        self.dam_opt = torch.optim.Adam([self.beta], lr=self.dam_lr)
        scale_of = {n: (lambda i=i: torch.sigmoid(self.beta[i])) for i, n in enumerate(self.names)}
        self._hooks = ScaledAdapters(layers, scale_of)
        self._held_out = cycle(held_out_loader(trainer, pl_module, self.held_out))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if int(trainer.global_step) % self.every:
            return
        val = trainer.strategy.batch_to_device(next(self._held_out))
        rng = capture_rng_states()
        with torch.enable_grad():
            grad = torch.autograd.grad(step_loss(pl_module, val, 0), [self.beta], allow_unused=True)[0]
        restore_rng_states(rng)  # the DAM step leaves the training stream's random state as it was
        if grad is None:
            return
        self.dam_opt.zero_grad()
        self.beta.grad = grad.detach()
        self.dam_opt.step()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        gammas = self.gammas()
        kept = discretise(gammas, self.keep_ratio)
        self.selected = [self.names[i] for i in kept]
        header = ("DiffoRA module selection (visadapt.methods.companions.diffora): adapter target = the kept modules\n"
                  f"kept {len(kept)} of {len(gammas)} modules (keep_ratio {self.keep_ratio})\n"
                  + "gamma: " + json.dumps({n: round(g, 4) for n, g in zip(self.names, gammas)}))
        text, self.fragment = selection_fragment(pl_module, self.selected, header)
        self.path = write_fragment(text, self.out, trainer, "diffora_selection.yaml")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
