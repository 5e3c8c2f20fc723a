"""LoRA-GGPO (Chang, Guo, Chang, Wu, "LoRA-GGPO: Mitigating Double Descent in LoRA Fine-Tuning via Gradient-Guided
Perturbation Optimization", arXiv 2502.14538 v1; code llm172/LoRA-GGPO, not checked): train on the loss at a
randomly perturbed merged weight, ``min E_eps L(W0 + s B A + eps)``, with the perturbation's size set per output row
by the row's weight norm and gradient norm, so that the adapter seeks flat minima (an implicit, noise-smoothing
regulariser) without SAM's second forward and backward pass.

The perturbation. The paper's summary gives a Gaussian ``eps ~ N(0, Sigma)`` whose covariance combines the norms of
the merged weight's rows and of their gradients; the exact weighting is not confirmed from the full text (reference
notes: "unverified"). The reading implemented, with every coefficient a config option:

    eps_ij ~ N(0, sigma_i^2),   sigma_i^2 = sigma^2 (alpha |W'_i|^2 + beta |G_i|^2) / in_features

so that ``E |eps_i|^2 = sigma^2 (alpha |W'_i|^2 + beta |G_i|^2)``: a relative perturbation of size ``sigma`` of each row.
``W' = W0 + s B A`` is the merged weight of the adapted rows and ``G`` the previous step's equivalent gradient
``s (B g_A + g_B A)`` (LoRA's first-order change of ``W'``: the full gradient is not computed in LoRA training; zero
at the first step). The noise comes from the callback's own generator (``seed``), so the training's dropout and
shuffling streams are the ones a run without GGPO draws.

The step. ``on_train_batch_start`` adds ``eps`` to the frozen base weight of every adapted block (the merged weight is
perturbed, the adapter factors are not), keeping an exact copy of the base; ``on_after_backward`` puts the copy back
bit for bit, before the optimiser steps, and records ``|G_i|`` for the next step. The gradient the optimiser uses is
the one at ``W' + eps``.

Registered in ``REGULARISERS``: what GGPO changes is the objective (the expected loss under the perturbation), not
the optimiser's update rule nor a schedule over time; as a callback it needs no loss term from the method. Plain LoRA
pairs only (the gradient-guided term needs ``g_A``, ``g_B`` of a pair ``s B A``), refused otherwise.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from visadapt.adapters import REGULARISERS
from visadapt.methods.companions.lora_ga import Part, plain_lora_parts


def ggpo_row_std(merged: Tensor, grad_row_norm: Tensor, sigma: float, alpha: float, beta: float) -> Tensor:
    """Per-row standard deviation ``sigma sqrt((alpha |W'_i|^2 + beta |G_i|^2) / in_features)`` (float32, ``(rows,)``)."""
    w2 = merged.float().pow(2).sum(dim=1)
    return sigma * torch.sqrt((alpha * w2 + beta * grad_row_norm.float().pow(2)) / merged.shape[1])


def ggpo_perturbation(merged: Tensor, grad_row_norm: Tensor, sigma: float, alpha: float, beta: float,
                      generator: torch.Generator | None = None) -> Tensor:
    """One draw of ``eps`` (float32, the block's shape): standard normal noise times each row's ``ggpo_row_std``."""
    noise = torch.randn(merged.shape, generator=generator, device=merged.device, dtype=torch.float32)
    return noise * ggpo_row_std(merged, grad_row_norm, sigma, alpha, beta)[:, None]


@REGULARISERS.register("ggpo")
class GGPO(pl.Callback):
    """LoRA-GGPO: each step's loss and gradient at W0 + sBA + ε, ε Gaussian with row std from weight and gradient norms.

    Args:
        sigma: Relative size of the perturbation of each row.
        alpha: Weight of the row's weight norm ``|W'_i|^2`` in the variance.
        beta: Weight of the row's previous equivalent-gradient norm ``|G_i|^2`` in the variance.
        seed: Seed of the callback's own noise generator.
        adapter: Adapter name; ``None`` = the model's only adapter (plain LoRA pairs only).
    """

    def __init__(self, sigma: float = 0.05, alpha: float = 1.0, beta: float = 1.0, seed: int = 0,
                 adapter: str | None = None) -> None:
        for name, value in (("sigma", sigma), ("alpha", alpha), ("beta", beta)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.sigma, self.alpha, self.beta, self.seed, self.adapter = sigma, alpha, beta, seed, adapter
        self._parts: list[Part] = []
        self._grad_norms: dict[str, Tensor] = {}
        self._saved: list[tuple[Tensor, Tensor]] = []  # (base weight, exact copy) while perturbed
        self._generator: torch.Generator | None = None
        self.last_perturbation: dict[str, Tensor] = {}
        """Block key -> the ``eps`` added at the current step (kept for inspection and tests)."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._parts = plain_lora_parts(pl_module, self.adapter, "LoRA-GGPO",
                                       "perturbs the merged weight of a LoRA update s*B*A using its gradients")
        self._generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        self._grad_norms = {}

    @torch.no_grad()
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._restore()
        self.last_perturbation = {}
        if self.sigma == 0:
            return
        saved = {}
        for part in self._parts:
            w = part.layer.base_weight
            if id(w) not in saved:
                saved[id(w)] = (w, w.detach().clone())
            block = part.base_block()
            merged = block.float() + part.core.delta_weight()
            grad_norm = self._grad_norms.get(part.key, torch.zeros(block.shape[0], device=block.device))
            eps = ggpo_perturbation(merged, grad_norm, self.sigma, self.alpha, self.beta, self._generator)
            block.add_(eps.to(block.dtype))
            self.last_perturbation[part.key] = eps
        self._saved = list(saved.values())

    @torch.no_grad()
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()
        for part in self._parts:
            core = part.core
            if core.lora_A.grad is None or core.lora_B.grad is None:
                continue
            a, b = core.lora_A.float(), core.lora_B.float()
            g = core.scale * (b @ core.lora_A.grad.float() + core.lora_B.grad.float() @ a)
            self._grad_norms[part.key] = g.norm(dim=1)

    def _restore(self) -> None:
        with torch.no_grad():
            for w, copy in self._saved:
                w.copy_(copy)
        self._saved = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._restore()  # a step without backward (skipped loss) must not leave the weights perturbed

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()
