"""Block-LoRA ("One Head Eight Arms", Zhou et al., arXiv 2501.16720): one shared down-projection, n summed ups.

Reading (reference note ``clip_fewshot.md`` §3.2; the paper's full text and code were not available): the
rank-``r`` factors are split along the rank into ``n`` blocks, ``A = [A_1 | ... | A_n]`` and
``B = [B_1; ...; B_n]``, so that ``B A = sum_i B_i A_i``. Sharing every down-projection block, ``A_i = A_s``,
gives ``ΔW = s * (sum_i B_i) A_s`` with ``A_s`` of shape ``(r/n, in)`` and each arm ``B_i`` of shape
``(out, r/n)``.

**The arms are redundant.** ``ΔW`` depends on the arms only through their sum, so every ``B_i`` receives the same
gradient ``G``, and from the zero initialisation they stay bitwise identical under any optimiser that acts element
by element (SGD, Adam, AdamW, weight decay coupled or decoupled): ``sum_i B_i = n B_1`` for the whole run. A
non-zero initialisation does not help: the arms keep their initial differences (shrunk by weight decay) and the
model still equals a single ``B`` started at the sum. In plain-LoRA terms Block-LoRA(r, n) with scale ``s`` is a
rank-``r/n`` LoRA with scale ``n s`` whose ``B`` gets ``1/n`` of the true gradient: under Adam/AdamW that factor
only rescales Adam's ``eps`` (to ``eps / n``), under SGD it divides ``B``'s step by ``n``.

Two forms (``form``):

* ``shared`` (default): ``A_s`` (``lora_A``, ``(r/n, in)``) and one up-projection ``lora_B`` (``(out, r/n)``)
  standing for the ``n`` tied arms: forward uses ``n * lora_B`` (the sum of the arms) with scale ``s``, and the
  gradient ``lora_B`` receives is one arm's (the gradient of the sum, not multiplied by ``n``). It is the literal
  form exactly, optimiser state included, with ``(r/n) (in + out)`` trainable parameters per adapted matrix
  (``1/n`` of LoRA's at the same ``r``) and a rank-``r/n`` forward (``tests/adapters/test_block_lora.py``: equal
  outputs after 200 AdamW steps with weight decay, and after SGD). Only rules that look at all parameters at once
  see a difference: a global gradient norm (clipping, SAM's radius) counts the arm once instead of ``n`` times.
* ``arms``: the literal reading, ``lora_B.0 ... lora_B.{n-1}`` summed in forward; ``(r/n) in + r out``
  parameters. With ``arm_dropout`` each arm draws its own dropout mask on the input (``sum_i B_i A_s drop_i(x)``,
  ``n`` down-projection GEMMs): the one reading found under which the arms receive different gradients and
  really differ. It is offered as an option, not as the paper's method.

Unknown in the reading and therefore configurable: ``n_blocks`` (the title suggests 8), and whether ``s`` divides by
the total rank ``r`` or the block rank ``r/n`` (``scale_rank``). The init follows LoRA: ``A_s`` kaiming (or
gaussian), ``B`` zero, so the model is unchanged at injection.
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
    """Rank used in the scale ``s``: ``rank`` gives ``alpha / r`` (as LoRA at the same ``r``), ``block`` gives
    ``alpha / (r / n_blocks)`` (``sqrt`` of either with ``rslora``). Unknown in the paper's reading."""
    form: Literal["shared", "arms"] = "shared"
    """``shared``: one ``(out, r/n)`` up-projection standing for the ``n_blocks`` tied arms (forward uses their sum,
    the gradient is one arm's): the literal form exactly, with ``(r/n) (in + out)`` parameters. ``arms``: the
    literal ``n_blocks`` arms summed in forward (``(r/n) in + r out`` parameters; they stay identical unless
    ``arm_dropout``)."""
    arm_dropout: bool = False
    """``arms`` form only: each arm draws its own dropout mask on the input, so the arms get different gradients
    (costs ``n_blocks`` down-projection GEMMs in training). Without it all arms share the one mask."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.n_blocks, int) or self.n_blocks < 1:
            raise ValueError(f"n_blocks must be an integer >= 1, got {self.n_blocks!r}")
        for where, rank in [("r", self.r)] + [(f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items()]:
            if rank % self.n_blocks:
                raise ValueError(f"n_blocks={self.n_blocks} must divide {where}={rank}")
        if self.scale_rank not in ("rank", "block"):
            raise ValueError(f"scale_rank must be 'rank' or 'block', got {self.scale_rank!r}")
        if self.form not in ("shared", "arms"):
            raise ValueError(f"form must be 'shared' or 'arms', got {self.form!r}")
        if self.arm_dropout and (self.form != "arms" or self.dropout == 0):
            raise ValueError("arm_dropout needs form='arms' and dropout > 0")


@register_adapter("block_lora")
class BlockLoRA(Adapter):
    """Block-LoRA: ΔW = s·(Σ_i B_i)·A_s, one shared down-projection; by default one tied B for the n equal arms."""

    config_class = BlockLoRAConfig

    def __init__(self, weight: Tensor, config: BlockLoRAConfig, **context) -> None:
        super().__init__(weight, config, **context)
        kw = {"dtype": weight.dtype, "device": weight.device}
        self.r, self.n_blocks, self.form = config.r, config.n_blocks, config.form
        self.arm_dropout = config.arm_dropout
        block = config.r // config.n_blocks
        self.scale = lora_scale(config.alpha, config.r if config.scale_rank == "rank" else block, config.rslora)
        self.lora_A = nn.Parameter(torch.empty(block, self.in_features, **kw))
        init_down_projection(self.lora_A, config.init, block)
        if config.form == "shared":
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, block, **kw))
        else:
            self.lora_B = nn.ParameterList(
                [nn.Parameter(torch.zeros(self.out_features, block, **kw)) for _ in range(config.n_blocks)]
            )
        if config.dropout > 0:
            self.dropout = nn.Dropout(config.dropout)

    def factors(self) -> tuple[Tensor, Tensor]:
        if self.form == "shared":
            return self.lora_A, _TiedArms.apply(self.lora_B, self.n_blocks)
        arms = list(self.lora_B)
        b = arms[0] if len(arms) == 1 else torch.stack(arms).sum(0)
        return self.lora_A, b

    def branches(self) -> list[tuple[Tensor, Tensor]]:
        if self.form == "arms" and self.arm_dropout:
            return [(self.lora_A, b) for b in self.lora_B]
        return [self.factors()]

    def extra_repr(self) -> str:
        return f"r={self.r}, n_blocks={self.n_blocks}, form={self.form}, " + super().extra_repr()


class _TiedArms(torch.autograd.Function):
    """``n * B`` forward (the sum of ``n`` arms that all equal ``B``); backward passes one arm's gradient."""

    @staticmethod
    def forward(ctx, b: Tensor, n: int) -> Tensor:
        return b * n

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None
