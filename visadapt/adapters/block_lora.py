"""Block-LoRA ("One Head Eight Arms", Zhou et al., arXiv 2501.16720): one shared down-projection, n summed ups.

Reading (reference note ``clip_fewshot.md`` §3.2; the paper's full text and code were not available): the
rank-``r`` factors are split along the rank into ``n`` blocks, ``A = [A_1 | ... | A_n]`` and
``B = [B_1; ...; B_n]``, so that ``B A = sum_i B_i A_i``. Sharing every down-projection block, ``A_i = A_s``,
gives ``ΔW = s * (sum_i B_i) A_s``. The forward uses the cheap order the paper describes: one
``(r/n) x in`` product for the shared head, a sum of ``n`` small ``out x (r/n)`` matrices (the "matrix
addition"), then one ``out x (r/n)`` product; it never forms ``ΔW``.

* ``A_s`` is ``lora_A`` with shape ``(r/n, in)``; the arms ``B_i`` are ``lora_B.0 ... lora_B.{n-1}``, each
  ``(out, r/n)``. They stay separate parameters as the reference note asks: mathematically the model is a
  rank-``r/n`` LoRA whose ``B`` gets an ``n``-times larger step (every arm receives the same gradient), but
  AdamW normalisation and weight decay act per arm, so a single-``B`` shortcut would not train the same way.
* Trainable parameters per adapted matrix: ``(r/n) * in + r * out``, against ``r * (in + out)`` for LoRA at
  the same ``r`` (a saving of at most 50% on square matrices).
* Unknown in the reading and therefore configurable: ``n_blocks`` (the title suggests 8), and whether the
  scale divides by the total rank ``r`` or the block rank ``r/n`` (``scale_rank``). The init follows LoRA:
  ``A_s`` kaiming (or gaussian), every ``B_i`` zero, so the model is unchanged at injection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from visadapt.adapters._registry import register_adapter
from visadapt.adapters.base import Adapter, init_down_projection, lora_scale
from visadapt.adapters.lora import LoRAConfig


@dataclass
class BlockLoRAConfig(LoRAConfig):
    """Block-LoRA: LoRA whose rank is split into ``n_blocks`` blocks sharing one down-projection."""

    n_blocks: int = 8
    """Number of blocks (up-projection "arms") the rank ``r`` is split into; must divide ``r`` (and every
    ``rank_pattern`` value). Unknown in the paper's reading; "Eight Arms" suggests 8."""
    scale_rank: Literal["rank", "block"] = "rank"
    """Rank used in the scale: ``rank`` gives ``alpha / r`` (as LoRA at the same ``r``), ``block`` gives
    ``alpha / (r / n_blocks)``. Unknown in the paper's reading."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.n_blocks, int) or self.n_blocks < 1:
            raise ValueError(f"n_blocks must be an integer >= 1, got {self.n_blocks!r}")
        for where, rank in [("r", self.r)] + [(f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items()]:
            if rank % self.n_blocks:
                raise ValueError(f"n_blocks={self.n_blocks} must divide {where}={rank}")
        if self.scale_rank not in ("rank", "block"):
            raise ValueError(f"scale_rank must be 'rank' or 'block', got {self.scale_rank!r}")


@register_adapter("block_lora")
class BlockLoRA(Adapter):
    """Block-LoRA: ΔW = s·(Σ_i B_i)·A_s, one shared down-projection and n up-projection blocks."""

    config_class = BlockLoRAConfig

    def __init__(self, weight: Tensor, config: BlockLoRAConfig, **context) -> None:
        super().__init__(weight, config, **context)
        kw = {"dtype": weight.dtype, "device": weight.device}
        self.r, self.n_blocks = config.r, config.n_blocks
        block = config.r // config.n_blocks
        self.scale = lora_scale(config.alpha, config.r if config.scale_rank == "rank" else block, config.rslora)
        self.lora_A = nn.Parameter(torch.empty(block, self.in_features, **kw))
        self.lora_B = nn.ParameterList(
            [nn.Parameter(torch.zeros(self.out_features, block, **kw)) for _ in range(config.n_blocks)]
        )
        init_down_projection(self.lora_A, config.init, block)
        if config.dropout > 0:
            self.dropout = nn.Dropout(config.dropout)

    def factors(self) -> tuple[Tensor, Tensor]:
        arms = list(self.lora_B)
        b = arms[0] if len(arms) == 1 else torch.stack(arms).sum(0)
        return self.lora_A, b

    def extra_repr(self) -> str:
        return f"r={self.r}, n_blocks={self.n_blocks}, " + super().extra_repr()
