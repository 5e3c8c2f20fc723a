"""SLoRA / NLoRA / IntTune (Guo et al., arXiv 2502.14482; official code TracyGuo2001/NLoRA): an ``r x r`` core ``N``
between LoRA's factors, ``y = W x + s * B N A drop(x)``, ``s = alpha / r`` (``alpha / sqrt(r)`` with ``rslora``).

Three modes (``mode``):

* ``slora``: LoRA's init (``A`` kaiming-uniform or gaussian, ``B = 0``) and ``N`` kaiming-uniform (``a = sqrt(5)``, the
  ``nn.Linear(r, r)`` default; no bias). ``A``, ``B``, ``N`` train: ``r (in + out) + r^2`` parameters. The model starts
  unchanged.
* ``nlora``: Nyström initialisation from the frozen weight. With row indices ``I`` and column indices ``J`` (``select``:
  the first ``r``, as the official code, or the ``r`` of largest norm), ``A = W[I, :]``, ``B = W[:, J]`` and
  ``N = W[I, J]`` (``core = "raw"``, the default: the official code, whose ``pinv`` line is commented out) or
  ``N = W[I, J]^+`` (``core = "pinv"``: the paper's Nyström approximation ``C U^+ R`` of ``W``). ``A``, ``B``, ``N``
  train.
* ``inttune``: the ``nlora`` init with only ``N`` trainable (``r^2`` parameters). ``A`` and ``B`` stay at their
  initial values, so they are not parameters here but buffers rebuilt from the frozen weight (they are never saved):
  the stored form is just ``N``.

Starting at the pretrained function (``offset``, default on). The official code adds ``s B N A`` to ``W`` without
subtracting it, so its model starts at ``W + s C N R``, not at ``W`` (the reference notes flag this as a discrepancy
to resolve). The reading chosen here keeps the Nyström init and subtracts its initial product, as PEFT does for
PiSSA/LoRA-GA: ``ΔW = s (B N A - B0 N0 A0)`` with ``B0, N0, A0`` the initial values (buffers rebuilt from ``W``). The
model then equals the pretrained one at step 0, bitwise: the update is computed as the rank-``2r`` product
``[B - B0, B0] [N A; N A - N0 A0]``, both parts exactly zero at init. In ``inttune`` mode ``ΔW = s B0 (N - N0) A0``
has rank ``r``. ``offset = False`` gives the official code's start. The update is always an exact low-rank product
(rank ``r``, or ``2r`` for ``nlora`` with offset), so merging is exact and :func:`~visadapt.adapters.export_peft`
writes a PEFT LoRA of that rank with identical outputs.

Why the raw core is the default. With the offset the core does not change the starting function, only how a step
moves it: a change of ``A`` moves ``ΔW`` by ``s B N δA`` and ``s C U^+ δA`` can be huge. ``W[I, J]`` of a real weight
is often nearly singular: on the 69 adapted matrices of ``devise_effnet_minilm`` (EfficientNet-Lite0 1x1 convs +
MiniLM) ``cond(W[:8, :8])`` has median 29 but reaches 1.4e7 and 2.0e8 (``blocks.5.3`` conv_pw / conv_pwl), where
``|W[:8, :8]^+|`` is 4.6e7 and 9.7e8. One AdamW step (every entry ``± 1e-3``) then moved those weights by 1e6 times
their norm (LoRA r=8: 2.6e-3 at most), the features saturated and the few-shot task trained to chance (10.0 %). With the
raw core the same step moves each weight by at most 5.3e-3 of its norm (median 1.0e-3, LoRA's 1.2e-3). ``rcond``
bounds the pinv core (``|N| <= 1 / (rcond σ_max)``); at ``rcond = 1e-2`` with ``select = "norm"`` the step is still
0.05 (median) to 0.33 of the norm, so it is not the default. ``core = "pinv", rcond = 0`` is the paper's exact form.

Nyström modes need ``r <= min(out, in)`` of every adapted matrix (or fused-qkv slice). On a fused qkv "the first r
rows" are rows of the q part only; ``select = "norm"`` or slice targets (``qkv[q,k,v]``) avoid that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from visadapt.adapters._registry import register_adapter
from visadapt.adapters.base import Adapter, init_down_projection, lora_scale
from visadapt.adapters.lora import LoRAConfig


@dataclass
class NLoRAConfig(LoRAConfig):
    """SLoRA / NLoRA / IntTune: LoRA with a trainable r x r core N between B and A; Nyström init; core-only mode."""

    mode: Literal["slora", "nlora", "inttune"] = "nlora"
    """``slora``: LoRA init plus a kaiming core, all trained; ``nlora``: Nyström init, all trained; ``inttune``:
    Nyström init, only the core ``N`` trains."""
    core: Literal["pinv", "raw"] = "raw"
    """Nyström core: ``raw`` = ``W[I, J]`` (the official code, the default); ``pinv`` = ``W[I, J]^+`` (the paper's
    Nyström approximation ``C U^+ R``; ill-conditioned on real weights, see ``rcond``)."""
    rcond: float = 0.0
    """``pinv`` core only: singular values of ``W[I, J]`` below ``rcond * σ_max`` are dropped (``0``: the exact
    pseudo-inverse of the paper). Bounds the core's norm by ``1 / (rcond σ_max)``."""
    select: Literal["first", "norm"] = "first"
    """Rows ``I`` / columns ``J`` of the Nyström init: the first ``r`` (official code) or the ``r`` of largest norm."""
    offset: bool = True
    """Subtract the initial product so that the model starts at the pretrained weights (Nyström modes)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in ("slora", "nlora", "inttune"):
            raise ValueError(f"mode must be 'slora', 'nlora' or 'inttune', got {self.mode!r}")
        if self.core not in ("pinv", "raw"):
            raise ValueError(f"core must be 'pinv' or 'raw', got {self.core!r}")
        if self.select not in ("first", "norm"):
            raise ValueError(f"select must be 'first' or 'norm', got {self.select!r}")
        if not 0.0 <= self.rcond < 1.0:
            raise ValueError(f"rcond must be in [0, 1), got {self.rcond!r}")


def nystrom_factors(
    weight: Tensor, r: int, core: str = "raw", select: str = "first", rcond: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """``(A, N, B) = (W[I, :], W[I, J] or W[I, J]^+, W[:, J])`` in float64 (with ``pinv``, ``B N A`` is the Nyström
    approximation of ``W``); ``rcond``: the pinv's relative cutoff."""
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    if select == "first":
        rows, cols = torch.arange(r), torch.arange(r)
    else:
        rows = w.norm(dim=1).topk(r).indices.sort().values
        cols = w.norm(dim=0).topk(r).indices.sort().values
    u = w[rows][:, cols]
    if core == "raw":
        n = u.clone()
    else:  # rcond = 0: torch's default cutoff (eps * r, relative), i.e. the exact pseudo-inverse of the paper
        n = torch.linalg.pinv(u, rtol=rcond) if rcond > 0 else torch.linalg.pinv(u)
    return w[rows].clone(), n, w[:, cols].clone()


@register_adapter("nlora")
class NLoRA(Adapter):
    """SLoRA / NLoRA / IntTune: ΔW = s·B·N·A with an r×r core N; Nyström init offset to start at W; core-only mode."""

    config_class = NLoRAConfig

    def __init__(self, weight: Tensor, config: NLoRAConfig, **context) -> None:
        super().__init__(weight, config, **context)
        kw = {"dtype": weight.dtype, "device": weight.device}
        r, self.r, self.mode = config.r, config.r, config.mode
        self.offset = config.offset and config.mode != "slora"
        self.scale = lora_scale(config.alpha, r, config.rslora)
        if config.mode == "slora":
            self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))
            self.lora_N = nn.Parameter(torch.empty(r, r, **kw))
            init_down_projection(self.lora_A, config.init, r)
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.lora_N, a=math.sqrt(5))
        else:
            if r > min(self.out_features, self.in_features):
                raise ValueError(f"the Nyström init needs r={r} <= min(out, in) of the "
                                 f"{self.out_features}x{self.in_features} weight")
            a0, n0, b0 = (t.to(**kw) for t in nystrom_factors(weight, r, config.core, config.select,
                                                                          config.rcond))
            self.lora_N = nn.Parameter(n0.clone())
            if config.mode == "nlora":
                self.lora_A = nn.Parameter(a0.clone())
                self.lora_B = nn.Parameter(b0.clone())
            # the initial factors are a function of the frozen weight: rebuilt, never saved
            self.register_buffer("nys_A0", a0, persistent=False)
            self.register_buffer("nys_B0", b0, persistent=False)
            if self.offset:
                self.register_buffer("nys_N0", n0, persistent=False)
        if config.dropout > 0:
            self.dropout = nn.Dropout(config.dropout)

    def factors(self) -> tuple[Tensor, Tensor]:
        if self.mode == "inttune":
            n = self.lora_N - self.nys_N0 if self.offset else self.lora_N
            return n @ self.nys_A0, self.nys_B0
        na = self.lora_N @ self.lora_A
        if not self.offset:
            return na, self.lora_B
        # B N A - B0 N0 A0 = (B - B0) N A + B0 (N A - N0 A0): both terms exactly zero at init
        a = torch.cat([na, na - self.nys_N0 @ self.nys_A0])
        b = torch.cat([self.lora_B - self.nys_B0, self.nys_B0], dim=1)
        return a, b

    def extra_repr(self) -> str:
        return f"r={self.r}, mode={self.mode}, offset={self.offset}, " + super().extra_repr()
