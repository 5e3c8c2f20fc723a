"""LoRA-SB (Ponkshe, Singhal et al., "Initialization using Update Approximation is a Silver Bullet for Extreme Efficient
Low-Rank Fine-Tuning"; official code RaghavSinghal10/lora-sb): ``y = W x + s * B R A drop(x)`` with fixed ``A``
(``r x in``) and ``B`` (``out x r``) and only the ``r x r`` core ``R`` trained (the LoRA-XS architecture).

``A`` and ``B`` are not trained but are not functions of the frozen weight either once the data-driven init has run
(they come from the first-step gradient), so they are *persistent* buffers (``lora_A``, ``lora_B``): adapter files
(:func:`~visadapt.adapters.save_adapter`) store them with ``R``. Before any data init the layer holds LoRA-XS-style
bases, the top-``r`` singular vectors of the frozen weight (``B = U_r``, ``A = V_r^T``, both orthonormal like the
data init's), and ``R = 0``: the model starts unchanged and ``R`` already gets a gradient. The ``lora_sb``
initialiser (:mod:`visadapt.methods.companions.lora_sb`) replaces ``A``, ``B`` and ``R`` by the update-approximation
init (the truncated SVD of the simulated first Adam step ``-lr sign(G)``), after which the model starts at about
``W - lr sign(G)``, one simulated full fine-tuning step, not at ``W``.

``s = alpha / r``; the official code uses ``alpha = r`` (``s = 1``), which ``alpha = None`` (the default) gives. The
update is the rank-``r`` product ``B (R A)``, so merging is exact and a PEFT export is a plain rank-``r`` LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from visadapt.adapters._registry import register_adapter
from visadapt.adapters.base import Adapter, AdapterConfig


@dataclass
class LoRASBConfig(AdapterConfig):
    """LoRA-SB / LoRA-XS: ΔW = s·B·R·A with A and B fixed and only the r x r core R trained (r^2 per matrix)."""

    r: int = 8
    """Rank: the core ``R`` is ``r x r``; needs ``r <= min(out, in)`` of every adapted matrix (or fused-qkv slice)."""
    alpha: float | None = None
    """Scale numerator, ``s = alpha / r``; ``None`` gives ``s = 1`` (the official ``alpha = r``)."""
    dropout: float = 0.0
    """Dropout on the adapter branch's input only."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be an integer >= 1, got {self.r!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"alpha must be > 0 (or null for s = 1), got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")


@register_adapter("lora_sb")
class LoRASB(Adapter):
    """LoRA-SB: ΔW = s·B·R·A, A and B fixed (buffers), only the r×r R trains; LoRA-XS bases until the data init runs."""

    config_class = LoRASBConfig

    def __init__(self, weight: Tensor, config: LoRASBConfig, **context) -> None:
        super().__init__(weight, config, **context)
        r = config.r
        if r > min(self.out_features, self.in_features):
            raise ValueError(f"LoRA-SB needs r={r} <= min(out, in) of the {self.out_features}x{self.in_features} weight")
        self.r = r
        self.scale = 1.0 if config.alpha is None else config.alpha / r
        kw = {"dtype": weight.dtype, "device": weight.device}
        u, _, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
        self.register_buffer("lora_A", vh[:r].to(**kw).contiguous())
        self.register_buffer("lora_B", u[:, :r].to(**kw).contiguous())
        self.lora_R = nn.Parameter(torch.zeros(r, r, **kw))
        if config.dropout > 0:
            self.dropout = nn.Dropout(config.dropout)

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.lora_R @ self.lora_A, self.lora_B

    def extra_repr(self) -> str:
        return f"r={self.r}, " + super().extra_repr()
