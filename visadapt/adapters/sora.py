"""SoRA: sparse low-rank adaptation (Ding et al., EMNLP'23, arXiv 2311.11696; official code TsinghuaC3I/SoRA).

``y = W x + s * B (g ⊙ A drop(x))``: a LoRA with a gate vector ``g`` (``lora_gate``, ``r`` values) between the down-
and the up-projection, ``s = alpha / r``. Init as LoRA (``A`` kaiming-uniform, ``B = 0``, so the model is unchanged)
and ``g ~ N(0, 1)``. ``A``, ``B`` and ``g`` train; ``ΔW = s B diag(g) A`` is an exact rank-``r`` update (merge and PEFT
export as a LoRA with ``diag(g)`` folded into ``A``).

Sparsity comes from a proximal step on the gate after every optimiser step (:func:`soft_threshold`, the closed form
of the proximal operator of ``xi * |g|_1``): ``g <- sign(g) max(|g| - xi, 0)``. Companions, registered under
``sora`` and run by every :class:`~visadapt.methods.base.AdapterModule`:

* ``SCHEDULES["sora"]`` (:class:`SoRAProximal`): the proximal step, with ``xi`` taken as is (the official
  ``SparseAdamW``; ``xi_multiply_lr`` gives its ``_multiply_lr`` variant, ``xi * lr``) and optionally raised from
  ``xi`` to ``xi_max`` in ``xi_stages`` equal stages over training (the official "sparsifying scheduler", linear).
* ``REGULARISERS["sora"]`` (:func:`sora_l1`): ``l1_lambda * mean|g|`` added to the loss. The reference notes say the
  official trainer adds this term; its weight was not verified, so it is off (``0``) by default.

Differences from the official code: the official code steps the gate with its own Adam (``SparseAdamW``) and the
other parameters with AdamW (weight decay 0.1). Here the gate is one more trainable parameter of the method's one
optimiser; being 1-D, it lands in the no-weight-decay group of :meth:`AdapterModule.param_groups`, as the official gate
optimiser has no weight decay. The proximal step follows the optimiser step, as in ``SparseAdamW.step``.

After training, :func:`prune_sora` drops every rank component whose gate is exactly zero and replaces each SoRA
adapter with a plain :class:`~visadapt.adapters.LoRA` of rank ``r_eff`` (``B' = B[:, g != 0] diag(g_{!=0})``,
``A' = A[g != 0]``, same scale): identical outputs, ``r_eff (in + out)`` parameters, and a plain (PEFT-native) LoRA for
:func:`~visadapt.adapters.export_peft`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from visadapt.adapters._registry import REGULARISERS, SCHEDULES, register_adapter
from visadapt.adapters.base import Adapter, AdapterLayer, init_down_projection, lora_scale
from visadapt.adapters.inject import adapter_layers
from visadapt.adapters.lora import LoRA, LoRAConfig


@dataclass
class SoRAConfig(LoRAConfig):
    """SoRA: LoRA with a gate g between A and B, made sparse by a proximal L1 step; pruned to a plain LoRA after."""

    xi: float = 3e-4
    """Soft threshold of the proximal step applied to the gates after each optimiser step (the official
    ``sparse_lambda_2``; DeBERTaV3 GLUE scripts: 3e-4)."""
    xi_multiply_lr: bool = False
    """Use ``xi * lr`` (the current learning rate of the first parameter group) as the threshold."""
    xi_max: float | None = None
    """With ``xi_stages``: raise the threshold linearly from ``xi`` to ``xi_max`` in equal stages over training."""
    xi_stages: int = 1
    """Number of stages of the sparsifying schedule (1: a constant ``xi``)."""
    l1_lambda: float = 0.0
    """Weight of the extra loss term ``l1_lambda * mean|g|`` (off by default; see the module docstring)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.xi < 0 or (self.xi_max is not None and self.xi_max < 0) or self.l1_lambda < 0:
            raise ValueError("xi, xi_max and l1_lambda must be >= 0")
        if not isinstance(self.xi_stages, int) or self.xi_stages < 1:
            raise ValueError(f"xi_stages must be an integer >= 1, got {self.xi_stages!r}")

    def threshold(self, step: int, total_steps: int, lr: float) -> float:
        """The soft threshold after optimiser step ``step`` (1-based) of ``total_steps``."""
        xi = self.xi
        if self.xi_max is not None and self.xi_stages > 1:
            stage = min(self.xi_stages - 1, (max(step, 1) - 1) * self.xi_stages // max(total_steps, 1))
            xi = self.xi + (self.xi_max - self.xi) * stage / (self.xi_stages - 1)
        return xi * lr if self.xi_multiply_lr else xi


@register_adapter("sora")
class SoRA(Adapter):
    """SoRA: ΔW = s·B·diag(g)·A with a gate g ~ N(0, 1) soft-thresholded after each step; prunes to a plain LoRA."""

    config_class = SoRAConfig

    def __init__(self, weight: Tensor, config: SoRAConfig, **context) -> None:
        super().__init__(weight, config, **context)
        kw = {"dtype": weight.dtype, "device": weight.device}
        self.r = config.r
        self.scale = lora_scale(config.alpha, config.r, config.rslora)
        self.lora_A = nn.Parameter(torch.empty(config.r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.r, **kw))
        self.lora_gate = nn.Parameter(torch.randn(config.r, **kw))
        init_down_projection(self.lora_A, config.init, config.r)
        if config.dropout > 0:
            self.dropout = nn.Dropout(config.dropout)

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.lora_gate[:, None] * self.lora_A, self.lora_B

    def effective_rank(self) -> int:
        """Number of gates that are not exactly zero."""
        return int((self.lora_gate != 0).sum())

    def extra_repr(self) -> str:
        return f"r={self.r}, " + super().extra_repr()


def soft_threshold(g: Tensor, xi: float) -> Tensor:
    """``sign(g) * max(|g| - xi, 0)``: the proximal operator of ``xi * |g|_1``."""
    return torch.sign(g) * torch.clamp(g.abs() - xi, min=0)


def sora_cores(model: nn.Module, name: str | None = None) -> Iterator[tuple[str, AdapterLayer, SoRA]]:
    """``(module name, layer, core)`` for every SoRA adapter (of ``name``, or of any name) in the model."""
    for module_name, layer in adapter_layers(model):
        for adapter_name in layer.adapters:
            if name is not None and adapter_name != name:
                continue
            for core, _ in layer.parts(adapter_name):
                if isinstance(core, SoRA):
                    yield module_name, layer, core


@torch.no_grad()
def proximal_step(model: nn.Module, step: int = 1, total_steps: int = 1, lr: float = 1.0) -> None:
    """Soft-threshold every trainable SoRA gate in place with its config's threshold at ``step``."""
    for _, _, core in sora_cores(model):
        if core.lora_gate.requires_grad:
            core.lora_gate.copy_(soft_threshold(core.lora_gate, core.config.threshold(step, total_steps, lr)))


@SCHEDULES.register("sora")
class SoRAProximal:
    """SoRA's proximal L1 step on the gates after every optimiser step (with the optional sparsifying schedule)."""

    def on_train_step_end(self, model: nn.Module, step: int, total_steps: int, lr: float) -> None:
        proximal_step(model, step, total_steps, lr)


@REGULARISERS.register("sora")
def sora_l1(model: nn.Module) -> Tensor | None:
    """SoRA's ``l1_lambda * mean|g|`` over each trainable SoRA adapter's gates (``None`` when every weight is 0)."""
    terms: dict[int, list[Tensor]] = {}
    weights: dict[int, float] = {}
    for _, _, core in sora_cores(model):
        if core.config.l1_lambda > 0 and core.lora_gate.requires_grad:
            key = id(core.config)
            terms.setdefault(key, []).append(core.lora_gate.abs().float())
            weights[key] = core.config.l1_lambda
    if not terms:
        return None
    return sum(weights[k] * torch.cat(v).mean() for k, v in terms.items())


@torch.no_grad()
def prune_sora(model: nn.Module, name: str = "default") -> dict[str, int]:
    """Replace SoRA adapter ``name`` by a plain LoRA holding only the rank components with a non-zero gate.

    Outputs are unchanged (the dropped components contribute exactly zero). Each module gets rank ``r_eff``, the
    number of non-zero gates (the largest over its fused-qkv slices, the others padded with zero components; at least
    1, a zero update when every gate is zero); the scale stays ``s``. The new config carries the per-module ranks and
    alphas in ``rank_pattern`` / ``alpha_pattern``, so :func:`~visadapt.adapters.save_adapter` and
    :func:`~visadapt.adapters.export_peft` write it as any LoRA. Returns module name -> ``r_eff``.
    """
    plan = {}
    for module_name, layer in adapter_layers(model):
        if name not in layer.adapters:
            continue
        parts = layer.parts(name)
        if not all(isinstance(core, SoRA) for core, _ in parts):
            raise TypeError(f"adapter {name!r} on {module_name} is not a SoRA adapter")
        plan[module_name] = (layer, parts, max(1, max(core.effective_rank() for core, _ in parts)), parts[0][0].scale)
    if not plan:
        raise KeyError(f"no SoRA adapter {name!r} in this model")
    first = next(iter(plan.values()))
    old: SoRAConfig = first[1][0][0].config
    r, scale = first[2], first[3]
    new = LoRAConfig(
        target=old.target,
        r=r,
        alpha=scale * r,
        dropout=old.dropout,
        rank_pattern={re.escape(m): p[2] for m, p in plan.items() if p[2] != r},
        alpha_pattern={re.escape(m): p[3] * p[2] for m, p in plan.items() if p[3] * p[2] != scale * r},
    )
    for module_name, (layer, parts, rank, _) in plan.items():
        trainable = parts[0][0].lora_A.requires_grad
        training = parts[0][0].training
        folded = []
        for core, _ in parts:
            keep = core.lora_gate != 0
            a = torch.zeros(rank, core.in_features, dtype=core.lora_A.dtype, device=core.lora_A.device)
            b = torch.zeros(core.out_features, rank, dtype=core.lora_B.dtype, device=core.lora_B.device)
            n = int(keep.sum())
            a[:n] = core.lora_A[keep]
            b[:, :n] = core.lora_B[:, keep] * core.lora_gate[keep]
            folded.append((a, b))
        slices = layer.slices.pop(name)
        del layer.adapters[name]
        del layer.configs[name]
        layer.add_adapter(name, LoRA, new.for_module(module_name), slices)
        for (core, _), (a, b) in zip(layer.parts(name), folded):
            assert isinstance(core, LoRA) and abs(core.scale - parts[0][0].scale) <= 1e-12 * core.scale
            core.lora_A.copy_(a)
            core.lora_B.copy_(b)
            core.lora_A.requires_grad_(trainable)
            core.lora_B.requires_grad_(trainable)
        layer.adapters[name].train(training)
    return {m: p[2] for m, p in plan.items()}
