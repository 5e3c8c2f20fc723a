"""What Flexora and DiffoRA share: trainable per-group scales of the adapters' contribution, a held-out batch
stream, and writing the selected adapter layers as an inject config (a YAML adapter fragment ``fit`` accepts).

A scale ``s`` multiplies one adapter layer's contribution through a forward hook:
``out = base(x) + s * (adapted(x) - base(x))``, with ``base(x)`` recomputed by the frozen base layer. That is exact
for every variant (low-rank or not) and needs no change to the layers; it costs one more base-layer forward per
adapted layer, during the search only. The scales are leaf tensors held by the callback (not module parameters), so
the method's optimiser never sees them and checkpoints are unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from torch import nn

from visadapt.adapters import adapter_layers
from visadapt.adapters.targets import format_name, match_rules, parse_target
from visadapt.errors import UserError


class ScaledAdapters:
    """Forward hooks scaling each adapter layer's contribution by ``scale_of[layer name]()`` (a tensor)."""

    def __init__(self, layers: list[tuple[str, nn.Module]], scale_of: dict[str, Any]) -> None:
        self.handles = []
        for name, layer in layers:
            self.handles.append(layer.register_forward_hook(self._hook(scale_of[name])))

    @staticmethod
    def _hook(scale: Any):
        def hook(layer: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            if not layer.enabled or layer.merged or not layer.active:
                return out
            base = layer.base_layer(*args)
            return base + scale().to(out.dtype) * (out - base)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def cycle(loader: Any) -> Iterator[Any]:
    """Batches of ``loader`` forever (a fresh pass after each end)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise UserError("the held-out loader of the layer search is empty")


def held_out_loader(trainer: pl.Trainer, pl_module: pl.LightningModule, source: str) -> Any:
    """The loader the search's outer (selection) steps read: the datamodule's ``val`` loader, or ``train``."""
    owner = trainer.datamodule if trainer.datamodule is not None else pl_module
    name = "val_dataloader" if source == "val" else "train_dataloader"
    try:
        loader = getattr(owner, name)()
    except (AttributeError, NotImplementedError, TypeError, ValueError) as e:
        raise UserError(f"the layer search reads held-out batches from {type(owner).__name__}.{name}() ({e}); give "
                        "the data a validation split or set held_out: train") from None
    if loader is None or (isinstance(loader, (list, tuple)) and not loader):
        raise UserError(f"{type(owner).__name__}.{name}() returned no loader; set held_out: train")
    return loader[0] if isinstance(loader, (list, tuple)) else loader


def injection_root(pl_module: nn.Module) -> tuple[str, Any, list[tuple[str, nn.Module]]]:
    """``(prefix, config, layers)``: the module path the adapter was injected under (names in its ``target`` are
    relative to it), the config of the (single) adapter, and the adapter layers with their full names."""
    layers = adapter_layers(pl_module)
    if not layers:
        raise UserError(f"{type(pl_module).__name__} has no adapter layer: the layer search needs an adapter on "
                        "every candidate layer (set model.init_args.adapter)")
    configs = {id(c): c for _, layer in layers for c in layer.configs.values()}
    if len(configs) != 1:
        raise UserError("the layer search supports one adapter per model; found several adapter configs")
    config = next(iter(configs.values()))
    rules = parse_target(config.target)
    first = layers[0][0].split(".")
    for cut in range(len(first)):
        prefix = ".".join(first[:cut]) + ("." if cut else "")
        if all(n.startswith(prefix) and match_rules(rules, n[len(prefix):]) for n, _ in layers):
            return prefix, config, layers
    raise UserError(f"could not relate the adapter layers (e.g. {layers[0][0]}) to the target {config.target!r}")


def selection_fragment(pl_module: nn.Module, selected: list[str], header: str) -> tuple[str, dict[str, Any]]:
    """The YAML text of an adapter fragment whose ``target`` names exactly the ``selected`` adapter layers (full
    names in ``pl_module``), keeping every other setting of the searched adapter; and the dict it holds."""
    prefix, config, layers = injection_root(pl_module)
    by_name = dict(layers)
    if not selected:
        raise UserError("the layer search selected no layer")
    parts = []
    for name in selected:
        layer = by_name[name]
        slices = next(iter(layer.slices.values()))
        parts.append(re.escape(format_name(name[len(prefix):], tuple(slices) if slices else None)).replace(
            r"\[", "[").replace(r"\]", "]").replace(r"\,", ","))
    init_args = {**asdict(config), "target": "|".join(parts)}
    fragment = {"model": {"init_args": {"adapter": {
        "class_path": f"{type(config).__module__}.{type(config).__qualname__}", "init_args": init_args}}}}
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + yaml.safe_dump(fragment, sort_keys=False, width=100), fragment


def write_fragment(text: str, out: str | None, trainer: pl.Trainer, default_name: str) -> Path:
    """Write the fragment to ``out`` or, by default, into the run's log directory (else ``runs/``)."""
    path = Path(out) if out else Path(trainer.log_dir or trainer.default_root_dir or "runs") / default_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
