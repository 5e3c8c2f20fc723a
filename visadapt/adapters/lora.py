"""LoRA (Hu et al. 2021, arXiv 2106.09685): ``W x + s * B A drop(x)`` with ``B`` zero at init.

``A`` (``lora_A``, shape ``(r, in)``) is the down-projection and ``B`` (``lora_B``, shape ``(out, r)``) the
up-projection. ``s = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (Kalajdzievski 2023), which is what
CLIP-LoRA uses (``r=2, alpha=1``). Dropout is applied to the adapter branch's input only. The layout, the
scale and both inits match PEFT's ``LoraConfig`` so that files convert exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor, nn

from visadapt.adapters._registry import register_adapter
from visadapt.adapters.base import Adapter, AdapterConfig, init_down_projection, lora_scale


@dataclass
class LoRAConfig(AdapterConfig):
    """Low-rank adaptation: a rank-``r`` update ``s * B A`` per targeted layer (or fused-qkv slice)."""

    r: int = 8
    """Rank of the update."""
    alpha: float = 8.0
    """Scale numerator: the update is multiplied by ``alpha / r`` (``alpha / sqrt(r)`` with ``rslora``)."""
    dropout: float = 0.0
    """Dropout probability on the adapter branch's input only (the base layer sees the clean input)."""
    rslora: bool = False
    """Rank-stabilised scaling ``alpha / sqrt(r)`` instead of ``alpha / r``."""
    init: Literal["kaiming", "gaussian", "trunc_normal"] = "kaiming"
    """``kaiming``: ``A`` kaiming-uniform (``a=sqrt(5)``, as ``nn.Linear``); ``gaussian``: ``A ~ N(0, 1/r)``.
    ``B`` is zero in both, so the model is unchanged at injection. ``trunc_normal``: ``A`` *and* ``B`` truncated
    normal with std ``init_std`` (cut at +-2 absolute, as timm's ``trunc_normal_``): LoRAT's "bert" init; the model
    is then no longer unchanged at injection."""
    init_std: float = 0.02
    """Standard deviation of the ``trunc_normal`` init (unused by the others)."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank: regular expression (matched in full against the module name, without slice suffix) ->
    ``r``. The first matching entry wins; unmatched modules use ``r``."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module ``alpha``, matched like ``rank_pattern``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be an integer >= 1, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in ("kaiming", "gaussian", "trunc_normal"):
            raise ValueError(f"init must be 'kaiming', 'gaussian' or 'trunc_normal', got {self.init!r}")
        if not self.init_std > 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std!r}")
        for key, rank in self.rank_pattern.items():
            re.compile(key)
            if not isinstance(rank, int) or rank < 1:
                raise ValueError(f"rank_pattern[{key!r}] must be an integer >= 1, got {rank!r}")
        for key in self.alpha_pattern:
            re.compile(key)

    def for_module(self, module_name: str) -> LoRAConfig:
        rank = next((v for k, v in self.rank_pattern.items() if re.fullmatch(k, module_name)), self.r)
        alpha = next((v for k, v in self.alpha_pattern.items() if re.fullmatch(k, module_name)), self.alpha)
        if rank == self.r and alpha == self.alpha:
            return self
        return replace(self, r=rank, alpha=alpha, rank_pattern={}, alpha_pattern={})


@register_adapter("lora")
class LoRA(Adapter):
    """LoRA: ΔW = s·B·A, s = alpha/r or alpha/sqrt(r) (rsLoRA); kaiming or gaussian A, zero B (or both trunc-normal)."""

    config_class = LoRAConfig
    peft_native = True

    def __init__(self, weight: Tensor, config: LoRAConfig, **context) -> None:
        super().__init__(weight, config, **context)
        kw = {"dtype": weight.dtype, "device": weight.device}
        self.r = config.r
        self.scale = lora_scale(config.alpha, config.r, config.rslora)
        self.lora_A = nn.Parameter(torch.empty(config.r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.r, **kw))
        if config.init == "trunc_normal":  # LoRAT ("bert" init): both factors random, B @ A != 0 at injection
            with torch.no_grad():
                nn.init.trunc_normal_(self.lora_A, std=config.init_std)
                nn.init.trunc_normal_(self.lora_B, std=config.init_std)
        else:
            init_down_projection(self.lora_A, config.init, config.r)
        if config.dropout > 0:
            self.dropout = nn.Dropout(config.dropout)

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.lora_A, self.lora_B

    def extra_repr(self) -> str:
        return f"r={self.r}, " + super().extra_repr()
