"""LoRA-GA (Wang et al., "LoRA-GA: Low-Rank Adaptation with Gradient Approximation", arXiv 2407.05000; official code
Outsider565/LoRA-GA; PEFT ``init_lora_weights="lora_ga"``): initialise LoRA's ``A`` and ``B`` from the SVD of the
full-weight gradient on a few training batches, so that the first LoRA steps follow full fine-tuning.

Per adapted matrix (or fused-qkv slice) with the averaged full-weight gradient ``G = U S V^T`` (``svd_lowrank``,
``q = min(4r, min(out, in))``, 4 iterations, as both implementations):

* ``direction`` picks ``r`` of the first ``2r`` singular pairs for each factor. Default ``ArB2r``: ``A = V^T[:r]``,
  ``B = U[:, r:2r]`` (``A2rBr``, ``ArBr`` interleaved, and ``random`` are the alternatives).
* ``convention = "peft"`` (default, parity-tested against peft 0.21): ``B`` is multiplied by ``diag(S)`` of its
  singular values, and the ``stable`` factor ``out^(1/4) / sqrt(gamma)`` multiplies ``B`` only.
  ``convention = "official"`` (the paper's code, per the reference notes): no singular values, and ``stable``
  multiplies both ``A`` and ``B``. The two differ in the initial ``|B A|`` by about ``S_i sqrt(gamma) / out^(1/4)``,
  a real semantic difference; the choice is recorded in the run's config.
* ``scale``: ``stable`` (default, gamma 16), ``gd_scale`` (both factors divided by ``s = alpha / r``), ``unit``
  (nothing), ``weight_svd`` (PEFT only: ``B`` times ``sigma_1(W) / S_B[0]``).
* ``offset`` (default on, as both implementations): the base weight becomes ``W - s B0 A0`` so the model's function
  is unchanged at step 0. With the offset a merged or exported adapter is only right on the offset base; the offset
  factors are kept in the callback's checkpoint state and re-applied when a ``fit`` resumes (see docs/companions.md).

The initialiser is a Lightning callback (``trainer.callbacks``) that runs at ``on_train_start``, after the method's
``on_fit_start`` (so the CLIP task's frozen baselines are measured on the untouched weights), on ``batches`` batches
of the trainer's own training loader, with the method's own loss (``training_step``), under a forked RNG so that the
training that follows draws the same shuffles and dropout masks as without it. It needs plain LoRA pairs (the
layer's update is ``s B A`` with ``A``, ``B`` its own parameters) and refuses anything else, and it refuses to run
when the gradient at the adapted weights is exactly zero (a zero-initialised head), saying how to fix it.

This module also holds the helpers the other gradient-based companions share (:func:`plain_lora_parts`,
:func:`estimate_full_gradients`, :func:`refuse_zero_gradients`, :func:`training_loss`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor

from visadapt.adapters import INITIALISERS, adapter_layers, adapter_names, variant_name
from visadapt.adapters.base import Adapter, AdapterLayer
from visadapt.errors import UserError

log = logging.getLogger(__name__)

# --- shared helpers ------------------------------------------------------------------------------------------------


@dataclass
class Part:
    """One adapter block: the layer it sits in, its output rows there (``None``: all rows), and the adapter."""

    layer_name: str
    layer: AdapterLayer
    rows: tuple[int, int] | None
    core: Adapter
    adapter: str

    @property
    def key(self) -> str:
        return self.layer_name if self.rows is None else f"{self.layer_name}[{self.rows[0]}:{self.rows[1]}]"

    def base_block(self) -> Tensor:
        """The frozen base weight's 2-D view of this block (a view: writing to it edits the base weight)."""
        w = self.layer.base_weight
        w2d = w.view(w.shape[0], -1)
        return w2d if self.rows is None else w2d[self.rows[0] : self.rows[1]]


def resolve_adapter(module: torch.nn.Module, adapter: str | None, who: str) -> str:
    """The adapter a companion works on: ``adapter`` if given, else the model's only adapter."""
    names = adapter_names(module)
    if not names:
        raise UserError(f"{who}: the model has no adapter; set model.init_args.adapter")
    if adapter is None:
        if len(names) > 1:
            raise UserError(f"{who}: the model has several adapters {names}; name one with `adapter: <name>`")
        return names[0]
    if adapter not in names:
        raise UserError(f"{who}: adapter {adapter!r} not found; the model has {names}")
    return adapter


def adapter_parts(module: torch.nn.Module, adapter: str) -> list[Part]:
    """Every block of adapter ``adapter`` in model order (one per layer, or one per fused-qkv slice)."""
    parts = []
    for layer_name, layer in adapter_layers(module):
        if adapter in layer.adapters:
            if layer.merged:
                raise UserError(f"{layer_name} has merged adapters; unmerge them before training")
            parts.extend(Part(layer_name, layer, rows, core, adapter) for core, rows in layer.parts(adapter))
    return parts


def is_plain_pair(core: Adapter) -> bool:
    """True when the block's update is exactly ``scale * B @ A`` with ``A``, ``B`` its own trainable parameters."""
    a, b = core.factors()
    return (a is getattr(core, "lora_A", None) and b is getattr(core, "lora_B", None)
            and isinstance(a, torch.nn.Parameter) and isinstance(b, torch.nn.Parameter))


def plain_lora_parts(module: torch.nn.Module, adapter: str | None, who: str, why: str) -> list[Part]:
    """The blocks of the adapter, refused with a clear message unless each is a plain LoRA pair (``s B A``)."""
    name = resolve_adapter(module, adapter, who)
    parts = adapter_parts(module, name)
    bad = [p for p in parts if not is_plain_pair(p.core)]
    if bad:
        variant = variant_name(bad[0].layer.configs[name])
        raise UserError(
            f"{who} {why}; the {variant!r} adapter on {bad[0].key} is not such a pair (its update is not "
            f"scale * lora_B @ lora_A of two trained matrices). Use a plain LoRA adapter "
            f"(class_path: visadapt.adapters.LoRAConfig), as configs/companions/ does")
    return parts


@contextmanager
def _muted_logging(module: pl.LightningModule) -> Iterator[None]:
    """``self.log`` becomes a no-op inside (a gradient probe outside a training step must not log metrics)."""
    module.log = lambda *args, **kwargs: None  # instance attributes shadow the methods
    module.log_dict = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del module.log, module.log_dict


def training_loss(module: pl.LightningModule, batch: Any, batch_idx: int, who: str) -> Tensor:
    """The method's own training loss on ``batch``: ``training_step`` (logging muted), which every visadapt method
    returns under automatic optimisation."""
    if not module.automatic_optimization:
        raise UserError(f"{who} needs a method whose training_step returns its loss (automatic optimisation); "
                        f"{type(module).__name__} optimises by hand here")
    with _muted_logging(module):
        out = module.training_step(batch, batch_idx)
    loss = out["loss"] if isinstance(out, dict) else out
    if not isinstance(loss, Tensor) or not loss.requires_grad:
        raise UserError(f"{who}: {type(module).__name__}.training_step returned no differentiable loss")
    return loss


def estimate_full_gradients(module: torch.nn.Module, parts: list[Part], batches: Iterable[Any],
                            loss_fn: Callable[[Any, int], Tensor]) -> dict[str, Tensor]:
    """The full-weight gradient of each block, averaged over ``batches`` (float32, ``(rows, in)``).

    Only the adapted layers' base weights require grad meanwhile (as PEFT's ``estimate_gradients``); every
    ``requires_grad`` flag and ``.grad`` is restored afterwards.
    """
    states = [(p, p.requires_grad, p.grad) for p in module.parameters()]
    layers = {id(p.layer): p.layer for p in parts}
    try:
        for p, _, _ in states:
            p.requires_grad_(False)
            p.grad = None
        for layer in layers.values():
            layer.base_weight.requires_grad_(True)
        n = 0
        with torch.enable_grad():
            for i, batch in enumerate(batches):
                loss_fn(batch, i).backward()
                n += 1
        if n == 0:
            raise UserError("no training batch to estimate the gradient on (the training loader is empty)")
        grads = {}
        for part in parts:
            w = part.layer.base_weight
            g = torch.zeros_like(w, dtype=torch.float32) if w.grad is None else w.grad.detach().float() / n
            g2d = g.view(g.shape[0], -1)
            grads[part.key] = (g2d if part.rows is None else g2d[part.rows[0] : part.rows[1]]).clone()
        return grads
    finally:
        for layer in layers.values():
            layer.base_weight.grad = None
        for p, flag, grad in states:
            p.requires_grad_(flag)
            p.grad = grad


def refuse_zero_gradients(grads: dict[str, Tensor], who: str) -> None:
    """Refuse a gradient-based init when no gradient (or none at some layers) reaches the adapted weights."""
    zero = [k for k, g in grads.items() if not torch.any(g)]
    if len(zero) == len(grads):
        raise UserError(
            f"{who}: the loss gradient is exactly zero at all {len(grads)} adapted weights, so there is nothing to "
            "initialise from. This is what a zero-initialised classification head does (dL/dh = W_head^T (p - y) = 0 "
            "for every feature h). Initialise the head before this companion runs: from the class means of the "
            "training features, from text embeddings (the CLIP few-shot task's classifier is its text tower, never "
            "zero), or by a linear probe; then train with the adapter")
    if zero:
        raise UserError(f"{who}: no gradient reaches {len(zero)} of the {len(grads)} adapted weights (e.g. "
                        f"{', '.join(zero[:3])}): the loss does not depend on them. Narrow the adapter target to "
                        "layers the loss uses")


def average_over_processes(trainer: pl.Trainer, grads: dict[str, Tensor]) -> dict[str, Tensor]:
    """The gradients averaged over the processes of a distributed run (each saw its own batches), so that every
    process initialises the same factors; unchanged in a single process."""
    if trainer.world_size <= 1:
        return grads
    return {k: trainer.strategy.reduce(g, reduce_op="mean") for k, g in grads.items()}


def training_batches(trainer: pl.Trainer, module: pl.LightningModule, count: int) -> Iterator[Any]:
    """``count`` batches of the trainer's training loader (cycled when shorter), moved to the module's device."""
    loader = trainer.train_dataloader
    if loader is None:
        raise UserError("the trainer has no training loader to estimate the gradient on")
    it, produced = iter(loader), 0
    while produced < count:
        try:
            batch = next(it)
        except StopIteration:
            if produced == 0:
                raise UserError("the training loader is empty") from None
            it = iter(loader)
            continue
        yield trainer.strategy.batch_to_device(batch, module.device)
        produced += 1


@contextmanager
def forked_rng(module: torch.nn.Module) -> Iterator[None]:
    """Random draws inside (shuffles, dropout, randomised SVD) leave the training's RNG streams untouched."""
    devices = [module.device] if getattr(module, "device", torch.device("cpu")).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


# --- LoRA-GA math --------------------------------------------------------------------------------------------------

Direction = Literal["ArB2r", "A2rBr", "ArBr", "random"]
Scale = Literal["stable", "gd_scale", "unit", "weight_svd"]


def lora_ga_factors(grad: Tensor, r: int, lora_scale: float, direction: Direction = "ArB2r",
                    scale: Scale = "stable", stable_gamma: float = 16.0, convention: str = "peft",
                    weight: Tensor | None = None, niter: int = 4) -> tuple[Tensor, Tensor]:
    """LoRA-GA's ``(A, B)`` (float32, ``(r, in)`` and ``(out, r)``) from the full-weight gradient ``grad`` (out x in).

    ``lora_scale`` is the adapter's ``s`` (used by ``gd_scale``); ``weight`` the frozen weight (``weight_svd`` only).
    The randomised SVD draws from torch's global RNG (seed it for reproducibility).
    """
    if convention not in ("peft", "official"):
        raise ValueError(f"convention must be 'peft' or 'official', got {convention!r}")
    g = grad.float()
    out_features = g.shape[0]
    if 2 * r > min(g.shape):
        raise ValueError(f"LoRA-GA needs 2r = {2 * r} <= min(out, in) of the {tuple(g.shape)} block")
    u, s, v = torch.svd_lowrank(g, q=min(4 * r, min(g.shape)), niter=niter)
    vh, u, s = v.t()[: 2 * r], u[:, : 2 * r], s[: 2 * r]
    if direction == "ArB2r":
        idx_a, idx_b = torch.arange(r), torch.arange(r, 2 * r)
    elif direction == "A2rBr":
        idx_a, idx_b = torch.arange(r, 2 * r), torch.arange(r)
    elif direction == "ArBr":
        idx_a, idx_b = torch.arange(1, 2 * r, 2), torch.arange(0, 2 * r, 2)
    elif direction == "random":
        idx_a = idx_b = torch.randperm(2 * r)[:r]
    else:
        raise ValueError(f"direction must be ArB2r, A2rBr, ArBr or random, got {direction!r}")
    a, b, s_b = vh[idx_a], u[:, idx_b], s[idx_b]
    if convention == "peft":
        b = b @ torch.diag(s_b)
    if scale == "stable":
        factor = out_features**0.25 / stable_gamma**0.5
        b = b * factor
        if convention == "official":
            a = a * factor
    elif scale == "gd_scale":
        a, b = a / lora_scale, b / lora_scale
    elif scale == "weight_svd":
        if convention != "peft" or weight is None:
            raise ValueError("scale='weight_svd' exists in the PEFT convention only and needs the frozen weight")
        _, w_s, _ = torch.svd_lowrank(weight.float(), q=r, niter=niter)
        if s_b[0] > 0:
            b = b * (w_s[0] / s_b[0])
    elif scale != "unit":
        raise ValueError(f"scale must be stable, gd_scale, unit or weight_svd, got {scale!r}")
    return a.contiguous(), b.contiguous()


@torch.no_grad()
def offset_base(part: Part, a: Tensor, b: Tensor, lora_scale: float) -> None:
    """``W <- W - s B A`` on the block's rows, in float32 then cast back (as PEFT)."""
    block = part.base_block()
    a, b = a.to(block.device, torch.float32), b.to(block.device, torch.float32)
    block.copy_((block.float() - lora_scale * (b @ a)).to(block.dtype))


@INITIALISERS.register("lora_ga")
class LoraGA(pl.Callback):
    """LoRA-GA: A, B from the SVD of the full-weight gradient on a few batches; base offset keeps the start at W.

    Args:
        batches: Training batches the full-weight gradient is averaged over (the official default is 128 samples:
            4 batches of 32).
        direction: Which singular pairs go to ``A`` and ``B`` (``ArB2r``: A the first r, B the next r).
        scale: ``stable`` (factor ``out^(1/4)/sqrt(stable_gamma)``), ``gd_scale``, ``unit`` or ``weight_svd``.
        stable_gamma: The ``stable`` scale's gamma (16 in both implementations).
        convention: ``peft`` (B times diag(S); stable on B only; parity-tested) or ``official`` (no S; stable on both).
        offset: Subtract ``s B0 A0`` from the base weight so the model starts unchanged (both implementations do).
        adapter: Adapter name to initialise; ``None`` = the model's only adapter.
        seed: Seed of the randomised SVD (drawn in a forked RNG: the training's random streams are untouched).
    """

    def __init__(self, batches: int = 4, direction: Direction = "ArB2r", scale: Scale = "stable",
                 stable_gamma: float = 16.0, convention: Literal["peft", "official"] = "peft", offset: bool = True,
                 adapter: str | None = None, seed: int = 0) -> None:
        if batches < 1:
            raise ValueError(f"batches must be >= 1, got {batches}")
        if convention not in ("peft", "official"):
            raise ValueError(f"convention must be 'peft' or 'official', got {convention!r}")
        if scale == "weight_svd" and convention != "peft":
            raise ValueError("scale='weight_svd' exists in the PEFT convention only")
        self.batches, self.direction, self.scale, self.stable_gamma = batches, direction, scale, stable_gamma
        self.convention, self.offset, self.adapter, self.seed = convention, offset, adapter, seed
        self._init: dict[str, dict[str, Tensor]] | None = None  # block key -> {"A0", "B0"} (the offset factors)
        self._restored = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        who = "LoRA-GA"
        parts = plain_lora_parts(pl_module, self.adapter, who, "initialises the two factors of a LoRA update s*B*A")
        if self._restored:  # a resumed fit: A and B come from the checkpoint, the base offset from our state
            if self.offset:
                for part in parts:
                    state = self._init[part.key]
                    offset_base(part, state["A0"], state["B0"], part.core.scale)
            self._restored = False
            return
        if trainer.global_step > 0:  # resumed from a checkpoint written without this companion
            log.warning("visadapt: LoRA-GA skipped: the fit resumes at step > 0 from a checkpoint without its state")
            return
        with forked_rng(pl_module):
            grads = estimate_full_gradients(
                pl_module, parts, training_batches(trainer, pl_module, self.batches),
                lambda batch, i: training_loss(pl_module, batch, i, who))
            grads = average_over_processes(trainer, grads)
            refuse_zero_gradients(grads, who)
            torch.manual_seed(self.seed)
            self._init = {}
            for part in parts:
                core = part.core
                a, b = lora_ga_factors(grads[part.key], core.lora_A.shape[0], core.scale, self.direction, self.scale,
                                       self.stable_gamma, self.convention, weight=part.base_block())
                a, b = a.to(core.lora_A.dtype), b.to(core.lora_B.dtype)
                with torch.no_grad():
                    core.lora_A.copy_(a)
                    core.lora_B.copy_(b)
                if self.offset:
                    offset_base(part, a, b, core.scale)
                self._init[part.key] = {"A0": a.detach().cpu(), "B0": b.detach().cpu()}
        if trainer.is_global_zero:
            log.info(f"visadapt: LoRA-GA initialised {len(parts)} adapter blocks from {self.batches} batches "
                     f"({self.convention} convention, direction {self.direction}, scale {self.scale}, "
                     f"offset {'on' if self.offset else 'off'})")

    def state_dict(self) -> dict[str, Any]:
        return {"init": self._init, "offset": self.offset}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._init = state_dict.get("init")
        self._restored = self._init is not None
