"""LoFiT (Yin et al., "LoFiT: Localized Fine-tuning on LLM Representations", NeurIPS'24; fc2869/lo-fit): select
attention heads, then learn offsets on the selected heads' outputs.

LoFiT edits the concatenated per-head attention output ``z`` before the output projection ``W_o``:
``z_h <- (1 + A_h) * z_h + v_h`` per head ``h``, then ``W_o``. Here the adapter sits on the output-projection Linear
(timm / open_clip ``attn.proj``, HF ``attention.output.dense``, diffusers ``to_out.0``) and acts on its input, split
into ``num_heads`` contiguous heads of ``in_features / num_heads`` features:

    ``y = W_o ((1 + a) * z + v) + b = W_o z + b + W_o diag(a) z + W_o v``.

So the scaling is the exact weight update ``ΔW = W_o diag(a)`` and the offset is an exact bias update
``Δb = W_o v``: both merge (weight and bias), and the model after merging is the base model with new ``W_o``, ``b_o``.
The offset is not a low-rank weight update, so a ``bias``-mode adapter cannot be exported as a PEFT LoRA (its own
format round-trips exactly; export refuses with a message). ``scale`` mode exports as a rank-``in`` LoRA
(``A = diag(a)``, ``B = W_o``).

The two steps (official recipe; ``mode``):

1. ``scale``: train only ``a`` (``lofit_A``, all heads, init ``N(0, init_std^2)``) with the L1 penalty
   ``l1 * sum |a|`` (the ``lofit`` companion in ``REGULARISERS``); then :func:`select_heads` ranks every head of every
   LoFiT layer by ``||a_h||_2`` and keeps the global top ``K``.
2. ``bias``: a fresh adapter with only ``v`` on the selected heads (:func:`bias_step_config` builds its config from
   the step-1 model), init ``N(0, init_std^2)``, no penalty. Only the selected heads' offsets exist as parameters
   (``lofit_v``: ``K_layer x head_dim``), not zero rows for the others; ``a`` is not used any more.

``two_step`` runs both steps in one fit (what a single task config can do): ``a`` and a full-width ``v`` (zero) exist
from the start; gradient masks make only ``a`` train (with the L1 penalty) until the ``lofit`` schedule (in
``SCHEDULES``) switches after ``select_fraction`` of the optimiser steps: it keeps the global top ``top_k`` heads by
``||a_h||_2``, sets ``a`` to zero for good and starts the selected heads' offsets from ``N(0, init_std^2)``; the other
offsets stay exactly zero. Differences from the official two runs: one optimiser (``a``'s moments are discarded by
resetting it to zero after every step; ``v``'s moments start clean because ``v`` had no gradient before), one
learning rate for both steps, and the unselected offsets are kept as zeros (``(in,)`` per layer instead of
``K_layer x head_dim``; :func:`bias_step_config` gives the compact form). The state is read back from the
parameters after a load or resume (``a == 0`` after the switch).

Official values (Llama-2-7B): step 1 lr 5e-3, ``l1 = 5e-4``, 5 epochs, keep 160 heads; step 2 lr 1e-2 on the top
16/32/48 of them; both inits ``N(0, 1e-3)`` (read here as standard deviation 1e-3 [code reading]). ``num_heads`` must
be given (ViT-B and BERT-base: 12, MiniLM-L6: 12). On a non-attention layer the same maths applies to groups of input
features (the invariant table uses that).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visadapt.adapters._registry import REGULARISERS, SCHEDULES, register_adapter
from visadapt.adapters.base import ADAPTER_CONTAINER, Adapter, AdapterConfig, AdapterLayer

NO_LOWRANK = (
    "LoFiT's bias step adds the output offset W_o v: it merges into the layer's bias, but it is not a low-rank weight "
    "update, so it has no PEFT LoRA form. Save it with save_adapter (visadapt's format)"
)


@dataclass
class LoFiTConfig(AdapterConfig):
    """LoFiT: per-head scaling (head selection step) or per-head offsets on selected heads, on the attention output."""

    target: str = r".*(attn\.proj|attention\.output\.dense|attn\.out_proj|to_out\.0)"
    """The attention output projections of the common families (the adapter acts on their input, the heads)."""
    num_heads: int = 12
    """Heads the targeted layer's input is split into (``in_features`` must be divisible by it)."""
    mode: Literal["scale", "bias", "two_step"] = "scale"
    """``scale``: step 1, learn ``a`` on every head (with the L1 penalty). ``bias``: step 2, learn ``v`` on the
    selected heads only. ``two_step``: both steps in one fit, switched by the ``lofit`` schedule after
    ``select_fraction`` of the optimiser steps (see the module docstring)."""
    select_fraction: float = 0.5
    """``two_step``: fraction of the optimiser steps spent on step 1 (head selection)."""
    top_k: int = 16
    """``two_step``: heads kept, over all layers of the adapter (official 16/32/48 for Llama-2-7B's 1024 heads)."""
    heads: dict[str, list[int]] = field(default_factory=dict)
    """``bias`` mode: module name (regular expression matched in full) -> selected head indices; a targeted module that
    no key matches gets every head. :func:`bias_step_config` fills it from a step-1 model."""
    init_std: float = 1e-3
    """Standard deviation of the normal init of ``a`` and ``v`` (official ``N(0, 1e-3)``); 0 starts at the identity."""
    l1: float = 5e-4
    """``scale`` mode: weight of the L1 penalty ``sum |a|`` (official 5e-4)."""
    layer: str = ""
    """Set by injection: the module this per-layer copy of the config belongs to (leave empty)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.num_heads, int) or self.num_heads < 1:
            raise ValueError(f"num_heads must be an integer >= 1, got {self.num_heads!r}")
        if self.mode not in ("scale", "bias", "two_step"):
            raise ValueError(f"mode must be 'scale', 'bias' or 'two_step', got {self.mode!r}")
        if not 0 < self.select_fraction < 1 or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"need 0 < select_fraction < 1 and top_k >= 1, got {self.select_fraction}, {self.top_k}")
        for key, heads in self.heads.items():
            re.compile(key)
            if not all(isinstance(h, int) and 0 <= h < self.num_heads for h in heads) or not heads:
                raise ValueError(f"heads[{key!r}] must be a non-empty list of head indices in [0, {self.num_heads})")
        if self.init_std < 0 or self.l1 < 0:
            raise ValueError(f"init_std and l1 must be >= 0, got {self.init_std}, {self.l1}")

    def for_module(self, module_name: str) -> LoFiTConfig:
        return replace(self, layer=module_name)

    def selected_heads(self) -> list[int]:
        """The heads of this layer that get an offset (``bias`` mode)."""
        found = next((h for k, h in self.heads.items() if re.fullmatch(k, self.layer)), None)
        return sorted(set(found)) if found is not None else list(range(self.num_heads))


@register_adapter("lofit")
class LoFiT(Adapter):
    """LoFiT: per-head scaling a (head selection) or per-head offsets v on selected heads, before the output proj."""

    config_class = LoFiTConfig
    identity_at_init = False  # official init N(0, 1e-3) for a and v (init_std=0 starts at the identity)
    lowrank_forward = False

    def __init__(self, weight: Tensor, config: LoFiTConfig, **context) -> None:
        super().__init__(weight, config, **context)
        kw = {"dtype": weight.dtype, "device": weight.device}
        if self.in_features % config.num_heads:
            raise ValueError(f"LoFiT: in_features={self.in_features} is not divisible by num_heads={config.num_heads}")
        self.mode, self.num_heads = config.mode, config.num_heads
        self.head_dim = self.in_features // config.num_heads
        # W_o itself: the contribution W_o (a * z + v) needs it, and merging must not change what unmerge subtracts
        self.register_buffer("lofit_W", weight.detach().clone(), persistent=False)
        self.heads: list[int] = list(range(config.num_heads))
        if config.mode in ("scale", "two_step"):
            self.lofit_A = nn.Parameter((torch.randn(self.in_features) * config.init_std).to(**kw))
        if config.mode == "bias":
            self.heads = config.selected_heads()
            self.lofit_v = nn.Parameter((torch.randn(len(self.heads), self.head_dim) * config.init_std).to(**kw))
        elif config.mode == "two_step":
            # all heads' offsets, zero until the switch; gradient masks decide what trains in each step
            self.lofit_v = nn.Parameter(torch.zeros(self.in_features, **kw))
            self.switched = False
            self._state_known = False
            self.register_buffer("mask_A", torch.ones(self.in_features, **kw), persistent=False)
            self.register_buffer("mask_v", torch.zeros(self.in_features, **kw), persistent=False)

    def offset(self) -> Tensor:
        """``v`` over the whole input (zeros on unselected heads), shape ``(in_features,)``."""
        if self.mode == "two_step":
            return self.lofit_v
        v = self.lofit_v.new_zeros(self.num_heads, self.head_dim)
        v = v.index_copy(0, torch.tensor(self.heads, device=v.device), self.lofit_v)
        return v.reshape(-1)

    def _trained(self, p: Tensor, mask: Tensor) -> Tensor:
        """``p`` in value; its gradient only where ``mask`` is 1 (``two_step``)."""
        return p.detach() + mask * (p - p.detach())

    def forward(self, x2d: Tensor) -> Tensor:
        """The contribution ``W_o (a * z + v)`` (``a`` absent in bias mode, ``v`` absent in scale mode)."""
        w = self.lofit_W.to(x2d.dtype)
        if self.mode == "scale":
            return F.linear(x2d * self.lofit_A.to(x2d.dtype), w)
        if self.mode == "bias":
            return F.linear(self.offset().to(x2d.dtype), w).expand(x2d.shape[0], -1)
        if self.training and not self._state_known:
            self._infer_state()
        a = self._trained(self.lofit_A, self.mask_A).to(x2d.dtype)
        v = self._trained(self.lofit_v, self.mask_v).to(x2d.dtype)
        return F.linear(x2d * a + v, w)

    @torch.no_grad()
    def _infer_state(self) -> None:
        """``two_step`` after a load or resume: the parameters tell the step (after the switch ``a`` is exactly zero
        and only the selected heads' offsets are non-zero)."""
        heads = self.lofit_v.view(self.num_heads, self.head_dim).ne(0).any(1)
        if not self.lofit_A.any() and (heads.any() or self.config.init_std > 0):  # type: ignore[attr-defined]
            self.switch([h for h in range(self.num_heads) if heads[h]], reinit=False)
        self._state_known = True

    @torch.no_grad()
    def switch(self, heads: list[int], reinit: bool = True) -> None:
        """``two_step``: end step 1. ``a`` becomes zero and stops training; the offsets of ``heads`` start training
        (re-initialised ``N(0, init_std^2)`` when ``reinit``), the other offsets stay exactly zero."""
        self.heads = sorted(heads)
        self.lofit_A.zero_()
        self.mask_A.zero_()
        self.mask_v.zero_()
        for h in self.heads:
            cols = slice(h * self.head_dim, (h + 1) * self.head_dim)
            self.mask_v[cols] = 1
            if reinit:
                self.lofit_v[cols] = torch.randn(self.head_dim).to(self.lofit_v) * self.config.init_std  # type: ignore
        self.switched, self._state_known = True, True

    @torch.no_grad()
    def enforce(self) -> None:
        """``two_step`` after the switch: undo what the optimiser's momentum and weight decay did to the frozen ``a``
        (its gradient is zero, Adam's moments are not)."""
        if self.switched:
            self.lofit_A.zero_()
            self.lofit_v.mul_(self.mask_v)

    def factors(self) -> tuple[Tensor, Tensor]:
        if self.mode != "scale":
            raise NotImplementedError(NO_LOWRANK)
        return torch.diag(self.lofit_A), self.lofit_W.to(self.lofit_A.dtype)

    def delta_weight(self) -> Tensor:
        if self.mode == "bias":
            return torch.zeros(self.out_features, self.in_features, device=self.lofit_W.device)
        return self.lofit_W.float() * self.lofit_A.float()

    def delta_bias(self) -> Tensor | None:
        if self.mode == "scale" or (self.mode == "two_step" and not self.lofit_v.detach().any()):
            return None
        return self.lofit_W.float() @ self.offset().float()

    def head_norms(self) -> Tensor:
        """``||a_h||_2`` per head (``scale`` mode): the selection score."""
        return self.lofit_A.detach().float().view(self.num_heads, self.head_dim).norm(dim=1)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, heads={len(self.heads)}/{self.num_heads}, " + super().extra_repr()


def _lofit_layers(model: nn.Module, name: str) -> list[tuple[str, LoFiT]]:
    found = []
    for module_name, layer in model.named_modules():
        if isinstance(layer, AdapterLayer) and name in layer.adapters:
            for core, rows in layer.parts(name):
                if isinstance(core, LoFiT):
                    if rows is not None:
                        raise ValueError(f"{module_name}: head selection needs LoFiT on whole layers, not qkv slices")
                    found.append((module_name, core))
    return found


def select_heads(model: nn.Module, top_k: int, name: str = "default") -> dict[str, list[int]]:
    """LoFiT step 1 -> 2: the global top-``top_k`` (layer, head) pairs by ``||a_h||_2`` over all ``scale``-mode LoFiT
    layers of adapter ``name``, as ``{module name: sorted head indices}`` (layers without a selected head left out)."""
    scored = []
    for module_name, core in _lofit_layers(model, name):
        if core.mode == "bias" or (core.mode == "two_step" and core.switched):
            raise ValueError(f"{module_name}: head selection needs a LoFiT adapter in step 1 (scale)")
        scored += [(float(s), module_name, h) for h, s in enumerate(core.head_norms())]
    if not scored:
        raise ValueError(f"no LoFiT adapter {name!r} in the model")
    if not 1 <= top_k <= len(scored):
        raise ValueError(f"top_k must be in [1, {len(scored)}] (the number of heads), got {top_k}")
    scored.sort(key=lambda t: -t[0])
    chosen: dict[str, list[int]] = {}
    for _, module_name, head in scored[:top_k]:
        chosen.setdefault(module_name, []).append(head)
    return {m: sorted(h) for m, h in chosen.items()}


def bias_step_config(model: nn.Module, top_k: int, name: str = "default", **overrides) -> LoFiTConfig:
    """The step-2 config: ``bias`` mode on exactly the layers holding the top-``top_k`` heads of the step-1 adapter
    ``name`` (same ``num_heads`` and ``init_std``), with ``heads`` filled in. Inject it into a fresh copy of the base
    model (or remove the step-1 adapter first)."""
    heads = select_heads(model, top_k, name)
    first = _lofit_layers(model, name)[0][1].config
    target = "|".join(re.escape(m) for m in heads)
    values = {"target": target, "num_heads": first.num_heads, "mode": "bias",
              "heads": {re.escape(m): h for m, h in heads.items()}, "init_std": first.init_std, "l1": 0.0}
    values.update(overrides)
    return LoFiTConfig(**values)


@REGULARISERS.register("lofit")
def lofit_l1(model: nn.Module) -> Tensor | None:
    """LoFiT step 1's L1 penalty l1·Σ|a| over the trainable LoFiT adapters in step 1 (None when there are none)."""
    total = None
    for name, module in model.named_modules():
        step1 = isinstance(module, LoFiT) and (module.mode == "scale" or (
            module.mode == "two_step" and not module.switched))
        if step1 and module.lofit_A.requires_grad and f".{ADAPTER_CONTAINER}." in f".{name}.":
            term = module.config.l1 * module.lofit_A.abs().sum()  # type: ignore[attr-defined]
            total = term if total is None else total + term
    return total


@SCHEDULES.register("lofit")
class LoFiTTwoStepSchedule:
    """LoFiT two_step: after select_fraction of the steps, keep the global top-k heads by ||a_h||, then train offsets."""

    def on_train_step_end(self, module: nn.Module, step: int, total_steps: int, lr: float) -> None:
        """Called after each optimiser step with ``step`` = optimiser steps done so far."""
        groups: dict[str, list[tuple[str, LoFiT]]] = {}
        for name, sub in module.named_modules():
            if isinstance(sub, LoFiT) and sub.mode == "two_step" and sub.lofit_A.requires_grad:
                adapter = f".{name}.".split(f".{ADAPTER_CONTAINER}.", 1)[-1].split(".", 1)[0]
                groups.setdefault(adapter, []).append((name, sub))
        for cores in groups.values():
            if any(core.switched for _, core in cores):  # (a resumed run infers it per layer)
                for _, core in cores:
                    if not core.switched:
                        core.switch([], reinit=False)
                for _, core in cores:
                    core.enforce()
                continue
            config = cores[0][1].config
            if step < math.ceil(config.select_fraction * total_steps):  # type: ignore[attr-defined]
                continue
            scored = sorted(((float(s), i, h) for i, (_, core) in enumerate(cores)
                             for h, s in enumerate(core.head_norms())), reverse=True)
            keep = scored[: config.top_k]  # type: ignore[attr-defined]
            for i, (_, core) in enumerate(cores):
                core.switch([h for _, j, h in keep if j == i])
