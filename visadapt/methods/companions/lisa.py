"""LISA (Layerwise Importance Sampled AdamW, arXiv 2403.17919) as a callback for any method.

Full-parameter training of a few layers at a time: the parameters that already train (embeddings, head, adapters
outside the layer stack: the "always on" part) keep training, and of the transformer layers only ``n_layers``
sampled ones are unfrozen; every ``interval`` optimiser steps the sample is drawn again, uniformly without
replacement, from the layer stack (the "middle" layers between embeddings and head). Defaults are ms-swift's and
LMFlow's: ``n_layers=2``, ``interval=20``.

Layers are found by name, the way each library keeps its blocks: timm ``blocks.N`` (an ``nn.Sequential``, which
"the first ModuleList" heuristics miss), open_clip ``transformer.resblocks.N`` (both towers of a CLIP model),
HuggingFace ``encoder.layer.N`` / ``layers.N`` / GPT-2's ``h.N``; ``stack`` (a regular expression matched in full
against the container's name) restricts or overrides the choice.

Optimiser state (LMFlow #729/#768, ms-swift PR #10140):

* every layer's parameters are made trainable in ``setup``, so they are all in the optimiser when Lightning builds
  it (layers frozen before that would never train later);
* during each step only the sampled layers have ``requires_grad``; the others get no gradient, and torch's
  optimisers skip a parameter without a gradient (no update, no weight decay);
* ``state="drop"`` (default) deletes the optimiser state (Adam moments) of layers that leave the sample, which is
  where LISA's memory saving comes from (LMFlow keeps it, and so keeps full-model Adam memory); a layer sampled
  again starts with fresh moments. ``state="keep"`` keeps them (LMFlow's behaviour).

Between steps (where checkpoints are written) every layer of the stack is trainable, so a checkpoint holds every
layer LISA may have changed. The sampling uses its own generator (``seed``), so it is reproducible and leaves the
global random stream (dropout masks, augmentation) untouched; its state is saved with the callback for resuming.
Under DDP, parameters that get no gradient need ``strategy: ddp_find_unused_parameters_true``.
"""

from __future__ import annotations

import re
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from visadapt.adapters import SCHEDULES, is_adapter_param
from visadapt.errors import UserError

STACK_NAMES = r"(.*\.)?(blocks|resblocks|layer|layers|h)"
"""Containers of transformer layers in timm (``blocks``), open_clip (``transformer.resblocks``), HF (``encoder.layer``,
``layers``, GPT-2 ``h``)."""


def find_layers(model: nn.Module, stack: str | None = None) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every layer in the model's layer stacks, in module order.

    A stack is an ``nn.Sequential`` or ``nn.ModuleList`` whose name matches ``stack`` (default: :data:`STACK_NAMES`)
    in full; its numbered children are the layers. Raises ``UserError`` when none is found.
    """
    pattern = re.compile(stack or STACK_NAMES)
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Sequential, nn.ModuleList)) and name and pattern.fullmatch(name):
            layers += [(f"{name}.{child}", sub) for child, sub in module.named_children() if child.isdigit()]
    if not layers:
        stacks = [n for n, m in model.named_modules() if isinstance(m, (nn.Sequential, nn.ModuleList)) and n]
        raise UserError(f"LISA found no layer stack matching {pattern.pattern!r} in {type(model).__name__}; "
                        f"containers present: {', '.join(stacks[:12]) or 'none'}. Set the callback's `stack`")
    return layers


@SCHEDULES.register("lisa")
class Lisa(pl.Callback):
    """LISA: train ``n_layers`` randomly sampled layers (plus what already trains), resampled every ``interval`` steps.

    Args:
        n_layers: Layers unfrozen at a time (gamma; ms-swift's default 2).
        interval: Optimiser steps between resamplings (K; LMFlow / ms-swift default 20).
        stack: Regular expression (full match) naming the layer containers; ``None`` finds timm / open_clip / HF
            stacks (:data:`STACK_NAMES`).
        train: ``full``: every parameter of a sampled layer (LISA); ``adapters``: only the adapter parameters in it.
        state: ``drop`` the optimiser state of layers leaving the sample (default) or ``keep`` it.
        seed: Seed of the sampling generator (independent of the global random state).
    """

    def __init__(self, n_layers: int = 2, interval: int = 20, stack: str | None = None, train: str = "full",
                 state: str = "drop", seed: int = 0) -> None:
        if n_layers < 1 or interval < 1:
            raise ValueError(f"Lisa needs n_layers >= 1 and interval >= 1, got {n_layers}, {interval}")
        if train not in ("full", "adapters"):
            raise ValueError(f"Lisa.train must be 'full' or 'adapters', got {train!r}")
        if state not in ("drop", "keep"):
            raise ValueError(f"Lisa.state must be 'drop' or 'keep', got {state!r}")
        self.n_layers, self.interval, self.stack = n_layers, interval, stack
        self.train, self.state, self.seed = train, state, seed
        self.generator = torch.Generator().manual_seed(seed)
        self.layer_names: list[str] = []
        self.params: list[list[nn.Parameter]] = []
        self.active: list[int] = []
        self.history: list[tuple[int, list[int]]] = []
        """(global step, sampled layer indices) at every resampling."""
        self._loaded: dict[str, Any] | None = None

    # -- setup ------------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        layers = find_layers(pl_module, self.stack)
        if self.n_layers > len(layers):
            raise UserError(f"Lisa.n_layers={self.n_layers} but the model has {len(layers)} layers "
                            f"({layers[0][0]} ... {layers[-1][0]})")
        self.layer_names = [n for n, _ in layers]
        self.params = []
        for name, layer in layers:
            ps = [p for n, p in layer.named_parameters() if self.train == "full" or is_adapter_param(n)]
            if not ps:
                raise UserError(f"Lisa(train={self.train!r}): layer {name} has no such parameter")
            self.params.append(ps)
        self._set_all(True)  # in the optimiser from the start (it is built after setup)

    def _set_all(self, flag: bool) -> None:
        for ps in self.params:
            for p in ps:
                p.requires_grad_(flag)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._loaded is not None:  # resuming: the saved sample and generator position
            self.generator.set_state(self._loaded["generator"])
            self.active, self.history = list(self._loaded["active"]), [tuple(h) for h in self._loaded["history"]]
            self._loaded = None

    def _resample(self, step: int) -> None:
        order = torch.randperm(len(self.params), generator=self.generator)
        self.active = sorted(int(i) for i in order[: self.n_layers])
        self.history.append((step, list(self.active)))

    # -- every step -------------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = int(trainer.global_step)
        if step % self.interval == 0 and (not self.history or self.history[-1][0] != step):
            before = set(self.active)
            self._resample(step)
            if self.state == "drop":  # Adam moments of layers leaving the sample go (LISA's memory saving)
                for i in before - set(self.active):
                    for opt in trainer.optimizers:
                        for p in self.params[i]:
                            opt.state.pop(p, None)
        active = set(self.active)
        for i, ps in enumerate(self.params):
            for p in ps:
                p.requires_grad_(i in active)
        pl_module.train(pl_module.training)  # visadapt modules keep frozen parts in eval mode: refresh

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._set_all(True)  # between steps every layer counts as trained (checkpoints keep them all)

    # -- resuming ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "active": list(self.active),
                "history": [list(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict)
