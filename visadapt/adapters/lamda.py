"""LaMDA and LaMDA++ (Azizi et al., EMNLP'24 Findings; ArminAzizi98/LaMDA): ``ΔW = s * B S A`` with a frozen
first projection ``A``, a trainable ``r x r`` core ``S`` and a second projection ``B`` that is frozen on a schedule.

* ``A`` (``r x in``): frozen. The official code keeps PEFT's kaiming-uniform ``lora_A`` and sets
  ``requires_grad=False`` (``a_init="kaiming"``, default); the paper's "projection matrix A" may also be SVD based
  (``a_init="svd"``: the top-``r`` right singular vectors of ``W``). Here ``A`` is a non-persistent buffer that is
  *recomputed* at injection, never stored: the kaiming draw comes from a generator seeded by ``seed`` and the block's
  shape and row offset, so saving, loading and resuming rebuild the same ``A`` without writing it.
* ``S`` (``lamda_S``, ``r x r``): trainable, the default ``nn.Linear(r, r, bias=False)`` init (kaiming-uniform with
  ``a = sqrt(5)``), as the official ``sigma``.
* ``B`` (``lora_B``, ``out x r``): zero at init (so the model is unchanged at injection), trainable at first and then
  frozen column by column: with training progress ``p = step / total_steps``, the first ``t = floor(p / eta)``
  columns are frozen (all of ``B`` once ``t >= r``). With the official ``eta = 0.3`` at most 3 columns are ever
  frozen in a run (``t <= 3``), much weaker than "gradually freeze B" suggests; ``eta`` is a config option.

The schedule is the ``lamda`` companion in ``SCHEDULES`` (run after each optimiser step by the methods). How a
column is frozen (``freeze``):

* ``exact`` (default, the paper's reading): a frozen column keeps the value it had when it was frozen; its gradient
  is zeroed and its value is restored after every optimiser step (momentum and decoupled weight decay would
  otherwise keep moving it).
* ``gradient`` (the official code): only the gradient of a frozen column is zeroed, so AdamW's momentum and weight
  decay still move it.

The remembered values live in the adapter, not in checkpoints: a run resumed after columns were frozen freezes them
again at the first optimiser step after the resume, at the values they have then (in ``exact`` mode the checkpoint
holds the frozen values, so only that one step can move them).

**LaMDA++** (``rank_allocation="energy"``): each matrix gets its own rank from the energy spectrum of its frozen
weight. The paper describes "normalised energy of the singular values" without the formula [paper-level reading];
chosen here: with ``e`` the fraction of ``sum sigma^2`` held by the top-``r`` singular values and ``e_flat = r / k``
(``k = min(in, out)``) the same fraction for a flat spectrum, ``r_layer = clip(round(r * (1 - e) / (1 - e_flat)),
r_min, r_max)``: a matrix whose energy is spread out (hard to compress) gets more rank than ``r``, one whose energy is
concentrated in few directions gets less. The rank is a function of the frozen weight only, so a reload recomputes it.

Parameters per matrix: ``r^2 + out * r`` while ``B`` trains (``r^2`` once it is frozen); ``A`` is never stored. The
update is exactly low-rank (``A_eff = S A``), so it merges and exports to PEFT as a rank-``r`` LoRA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from visadapt.adapters._registry import SCHEDULES, register_adapter
from visadapt.adapters.base import ADAPTER_CONTAINER, Adapter, lora_scale
from visadapt.adapters.lora import LoRAConfig


@dataclass
class LaMDAConfig(LoRAConfig):
    """LaMDA / LaMDA++: frozen A, trainable r×r core S, B frozen column by column during training."""

    freeze_eta: float = 0.3
    """``eta``: after a fraction ``p`` of training the first ``floor(p / eta)`` columns of ``B`` are frozen (official
    ``gradual_freeze_B`` with 0.3). ``0`` freezes ``B`` completely from the start."""
    freeze: Literal["exact", "gradient"] = "exact"
    """``exact``: frozen columns keep their values (gradient zeroed, value restored after each step). ``gradient``:
    only their gradient is zeroed (official code; momentum and weight decay still move them)."""
    a_init: Literal["kaiming", "svd"] = "kaiming"
    """Frozen ``A``: seeded kaiming-uniform (official, PEFT's LoRA init) or the top-``r`` right singular vectors of
    ``W`` (the paper's optional SVD-based projection)."""
    seed: int = 0
    """Seed of the kaiming draw of ``A`` (combined with each block's shape and row offset)."""
    rank_allocation: Literal["none", "energy"] = "none"
    """``energy``: LaMDA++, each matrix's rank from its weight's singular-value energy (see the module docstring)."""
    r_min: int = 1
    """LaMDA++: smallest rank a matrix may get."""
    r_max: int = 64
    """LaMDA++: largest rank a matrix may get (also capped at ``min(in, out)``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.freeze_eta < 0:
            raise ValueError(f"freeze_eta must be >= 0, got {self.freeze_eta!r}")
        if self.freeze not in ("exact", "gradient"):
            raise ValueError(f"freeze must be 'exact' or 'gradient', got {self.freeze!r}")
        if self.a_init not in ("kaiming", "svd"):
            raise ValueError(f"a_init must be 'kaiming' or 'svd', got {self.a_init!r}")
        if self.rank_allocation not in ("none", "energy"):
            raise ValueError(f"rank_allocation must be 'none' or 'energy', got {self.rank_allocation!r}")
        if not 1 <= self.r_min <= self.r_max:
            raise ValueError(f"need 1 <= r_min <= r_max, got r_min={self.r_min}, r_max={self.r_max}")


def energy_rank(weight: Tensor, r: int, r_min: int, r_max: int) -> int:
    """LaMDA++'s rank of one matrix (this module's reading): ``r (1 - e) / (1 - r / k)``, rounded and clipped."""
    s2 = torch.linalg.svdvals(weight.detach().to(device="cpu", dtype=torch.float64)).pow(2)
    k = s2.numel()
    if r >= k:
        return max(1, min(k, r_max))
    energy = float(s2[:r].sum() / s2.sum()) if float(s2.sum()) > 0 else r / k
    rank = round(r * (1.0 - energy) / (1.0 - r / k))
    return int(max(r_min, min(r_max, k, rank)))


@register_adapter("lamda")
class LaMDA(Adapter):
    """LaMDA / LaMDA++: ΔW = s·B·S·A, frozen A, trainable r×r core S, B frozen column by column on a schedule."""

    config_class = LaMDAConfig

    def __init__(
        self,
        weight: Tensor,
        config: LaMDAConfig,
        *,
        source: Tensor | None = None,
        rows: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(weight, config, source=source, rows=rows)
        kw = {"dtype": weight.dtype, "device": weight.device}
        r = config.r
        if config.rank_allocation == "energy":
            r = energy_rank(weight, config.r, config.r_min, config.r_max)
        self.r, self.eta, self.freeze = r, config.freeze_eta, config.freeze
        self.scale = lora_scale(config.alpha, r, config.rslora)
        if config.a_init == "svd":
            if r > min(self.in_features, self.out_features):
                raise ValueError(f"a_init='svd' needs r={r} <= min(in, out) of the {self.out_features}x"
                                 f"{self.in_features} weight")
            vh = torch.linalg.svd(weight.detach().to(device="cpu", dtype=torch.float64), full_matrices=False)[2]
            a = vh[:r]
        else:
            gen = torch.Generator().manual_seed(
                (config.seed * 1_000_003 + self.out_features * 7919 + self.in_features * 104_729
                 + (rows[0] if rows else 0)) % (2**63))
            a = torch.empty(r, self.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
        self.register_buffer("lamda_A", a.to(**kw), persistent=False)
        s = torch.empty(r, r)
        nn.init.kaiming_uniform_(s, a=math.sqrt(5))  # nn.Linear(r, r)'s default, as the official sigma
        self.lamda_S = nn.Parameter(s.to(**kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))
        self.frozen_columns = 0
        """Number of leading columns of ``B`` frozen so far (set by the ``lamda`` schedule)."""
        self._frozen_values: Tensor | None = None
        self._hook = None
        if config.dropout > 0:
            self.dropout = nn.Dropout(config.dropout)

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.lamda_S @ self.lamda_A.to(self.lamda_S.dtype), self.lora_B

    def columns_to_freeze(self, step: int, total_steps: int) -> int:
        """``min(r, floor(p / eta))`` with ``p = step / total_steps`` (all of ``r`` when ``eta == 0``)."""
        if self.eta == 0:
            return self.r
        return min(self.r, math.floor(step / max(1, total_steps) / self.eta + 1e-9))

    def freeze_columns(self, t: int) -> None:
        """Freeze the first ``t`` columns of ``B`` (never unfreezes): zero their gradient from now on and, in ``exact``
        mode, remember their values so that :meth:`restore_frozen` can put them back after each optimiser step."""
        if t <= self.frozen_columns:
            return
        with torch.no_grad():
            values = self.lora_B[:, :t].detach().clone()
            if self._frozen_values is not None:  # columns frozen earlier keep their remembered values
                values[:, : self.frozen_columns] = self._frozen_values
        self._frozen_values = values
        self.frozen_columns = t
        if self._hook is None:
            self._hook = self.lora_B.register_hook(self._zero_frozen_grad)

    def _zero_frozen_grad(self, grad: Tensor) -> Tensor:
        if not self.frozen_columns:
            return grad
        grad = grad.clone()
        grad[:, : self.frozen_columns] = 0
        return grad

    @torch.no_grad()
    def restore_frozen(self) -> None:
        """``exact`` mode: put the frozen columns back to the values they had when they were frozen."""
        if self.freeze == "exact" and self._frozen_values is not None:
            self.lora_B[:, : self.frozen_columns] = self._frozen_values

    def extra_repr(self) -> str:
        return f"r={self.r}, frozen_columns={self.frozen_columns}, " + super().extra_repr()


@SCHEDULES.register("lamda")
class LaMDAFreezeSchedule:
    """LaMDA's gradual freezing of B: after step s of T, the first floor((s/T)/eta) columns of every B are frozen."""

    def on_train_step_end(self, module: nn.Module, step: int, total_steps: int, lr: float) -> None:
        """Called after each optimiser step with ``step`` = optimiser steps done so far."""
        for name, sub in module.named_modules():
            if isinstance(sub, LaMDA) and f".{ADAPTER_CONTAINER}." in f".{name}." and sub.lora_B.requires_grad:
                sub.restore_frozen()  # undo what this step did to columns that were already frozen
                sub.freeze_columns(sub.columns_to_freeze(step, total_steps))
