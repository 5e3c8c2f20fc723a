"""KaSA (Wang et al., "Knowledge-aware Singular-value Adaptation", arXiv 2412.06071; juyongjiang/KaSA; PEFT 0.21
``LoraConfig(kasa_config=KasaConfig())``): drop the ``r`` smallest singular components of the frozen weight, then
learn ``ΔW = s * B diag(δ) A``.

With ``W = U Σ V^T`` and ``W_min = U_min Σ_min V_min^T`` the ``r`` smallest components,

    ``y = (W - W_min) x + s * B diag(δ) A drop(x)``.

``A`` (``r x in``) kaiming-uniform, ``B`` (``out x r``) zero and ``δ`` (``lora_diag``, ``r`` values) ``N(0, 1)``, as
PEFT and the official code: the update is zero at injection, but the truncation is not, so the model is *not*
unchanged at injection (``identity_at_init = False``).

**The base weight is never modified.** PEFT and the official code truncate ``W`` in place (destructive: PEFT's
unmerge returns to ``W - W_min``). Here the truncation is part of the adapter: the fixed rank-``r`` term
``-W_min`` (its factors ``U_min Σ_min`` and ``V_min^T`` are non-persistent buffers, recomputed from the base weight
at injection, in float64) is stacked with the trainable factors into one exact rank-``2r`` low-rank form,
``ΔW_total = s * [B | -U_min Σ_min / s] [diag(δ) A ; V_min^T]``. Consequences: disabling or removing the adapter gives
the pretrained model back exactly, KaSA combines with any other adapter, merge adds ``ΔW_total`` (so the merged
weight equals PEFT's truncated-and-merged weight) and unmerge restores ``W``, and the PEFT export is a plain
rank-``2r`` LoRA on the untouched base (PEFT's own KaSA cannot be converted to a LoRA). The forward costs a
rank-``2r`` LoRA's.

Regularisers (``kasa`` in ``REGULARISERS``, added to the training loss by the methods):
``β ||δ||² + γ (||B^T B - I||_F + ||A A^T - I||_F)`` per adapted matrix, summed over layers (PEFT's
``_get_kasa_loss``, the paper's r x r Gram form). Differences, each a config option:

* ``truncation``: PEFT keeps ``min(in, out) - r`` components (``min``, default); the official code keeps
  ``in_features - r`` (``in_features``), which for a wide weight (``in > out``, e.g. ViT ``fc2``) keeps everything
  and truncates nothing.
* ``ortho``: PEFT and the paper use r x r Grams (``rank``, default); the official trainer uses ``A^T A`` (in x in)
  and ``B B^T`` (out x out) against full-size identities (``full``).
* ``reg_reduction``: PEFT sums over layers (``sum``, default); the official trainer divides by the number of
  adapted layers (``mean``).

Fused-qkv slices each get their own truncation (of their block of rows); PEFT cannot adapt slices. Every part of the
forward is exact against PEFT (``tests/adapters/test_kasa.py``: same values, same outputs, same outputs after AdamW
steps on task loss + regulariser).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from visadapt.adapters._registry import REGULARISERS, register_adapter
from visadapt.adapters.base import ADAPTER_CONTAINER, Adapter, init_down_projection, lora_scale
from visadapt.adapters.lora import LoRAConfig


@dataclass
class KaSAConfig(LoRAConfig):
    """KaSA: truncate the r smallest singular components of W, learn s·B·diag(δ)·A (plus two regularisers)."""

    alpha: float = 16.0
    """Scale numerator (official GLUE scripts: r = 8, alpha = 16)."""
    beta: float = 1e-4
    """Weight of the singular-value penalty ``||δ||²`` (PEFT / official default)."""
    gamma: float = 1e-3
    """Weight of the orthogonality penalty ``||B^T B - I||_F + ||A A^T - I||_F`` (PEFT / official default)."""
    truncation: Literal["min", "in_features"] = "min"
    """Components kept: ``min(in, out) - r`` (PEFT, default) or ``in - r`` (official code; nothing is dropped when
    ``in - r >= min(in, out)``)."""
    ortho: Literal["rank", "full"] = "rank"
    """Orthogonality Grams: ``rank`` (``B^T B``, ``A A^T``, r x r: paper and PEFT) or ``full`` (``A^T A`` and
    ``B B^T`` against full-size identities: official trainer)."""
    reg_reduction: Literal["sum", "mean"] = "sum"
    """Sum the per-layer regularisers (PEFT) or average them over adapted layers (official trainer)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init != "kaiming":
            raise ValueError("KaSA initialises A kaiming-uniform (PEFT and the official code); init must be 'kaiming'")
        if self.alpha == 0:
            raise ValueError("alpha must be non-zero (the truncation term is stored relative to the scale)")
        for key, allowed in (("truncation", ("min", "in_features")), ("ortho", ("rank", "full")),
                             ("reg_reduction", ("sum", "mean"))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if self.beta < 0 or self.gamma < 0:
            raise ValueError(f"beta and gamma must be >= 0, got {self.beta}, {self.gamma}")


def minor_components(weight: Tensor, r: int, truncation: str = "min") -> tuple[Tensor, Tensor]:
    """``(U_min Σ_min, V_min^T)`` (float64) of the singular components KaSA drops from ``weight`` (``out x in``).

    ``min``: the ``r`` smallest of the ``min(out, in)`` components. ``in_features``: the components after the first
    ``in - r`` (none when ``in - r >= min(out, in)``; the official code's rule).
    """
    out_f, in_f = weight.shape
    k = min(out_f, in_f)
    if r >= k:
        raise ValueError(
            f"KaSA needs r={r} < min(in, out)={k} so that the {out_f}x{in_f} weight keeps at least one component"
        )
    keep = k - r if truncation == "min" else min(in_f - r, k)
    u, s, vh = torch.linalg.svd(weight.detach().to(device="cpu", dtype=torch.float64), full_matrices=False)
    return u[:, keep:] * s[keep:], vh[keep:]


@register_adapter("kasa")
class KaSA(Adapter):
    """KaSA: W − W_min + s·B·diag(δ)·A; the r smallest singular components are dropped (non-destructively)."""

    config_class = KaSAConfig
    identity_at_init = False  # the truncation changes the function; the trainable update starts at zero

    def __init__(self, weight: Tensor, config: KaSAConfig, **context) -> None:
        super().__init__(weight, config, **context)
        kw = {"dtype": weight.dtype, "device": weight.device}
        self.r = config.r
        self.scale = lora_scale(config.alpha, config.r, config.rslora)
        self.lora_A = nn.Parameter(torch.empty(config.r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.r, **kw))
        self.lora_diag = nn.Parameter(torch.randn(config.r, **kw))
        init_down_projection(self.lora_A, "kaiming", config.r)
        us, vh = minor_components(weight.float(), config.r, config.truncation)
        # stored divided by -s so that the stacked form shares the adapter's scale
        self.register_buffer("minor_B", (us / -self.scale).to(**kw), persistent=False)
        self.register_buffer("minor_A", vh.to(**kw), persistent=False)
        if config.dropout > 0:
            self.dropout = nn.Dropout(config.dropout)

    def factors(self) -> tuple[Tensor, Tensor]:
        """The exact rank-``2r`` form ``[diag(δ) A ; V_min^T]``, ``[B | -U_min Σ_min / s]``."""
        a = torch.cat([self.lora_diag[:, None] * self.lora_A, self.minor_A.to(self.lora_A.dtype)])
        b = torch.cat([self.lora_B, self.minor_B.to(self.lora_B.dtype)], dim=1)
        return a, b

    def trainable_delta_weight(self) -> Tensor:
        """``s * B diag(δ) A`` alone (float32): the learned update, without the truncation term."""
        return (self.lora_B.float() * self.lora_diag.float()) @ self.lora_A.float() * self.scale

    def truncation_weight(self) -> Tensor:
        """``W_min`` (float32): what the adapter removes from the base weight."""
        return -(self.minor_B.float() * self.scale) @ self.minor_A.float()

    def regularisation(self) -> Tensor:
        """``β ||δ||² + γ (ortho(B) + ortho(A))`` of this matrix, in float32."""
        cfg: KaSAConfig = self.config  # type: ignore[assignment]
        a, b, d = self.lora_A.float(), self.lora_B.float(), self.lora_diag.float()
        if cfg.ortho == "rank":
            grams = (b.T @ b, a @ a.T)
        else:
            grams = (b @ b.T, a.T @ a)
        ortho = sum(torch.linalg.norm(g - torch.eye(g.shape[0], device=g.device)) for g in grams)
        return cfg.beta * d.pow(2).sum() + cfg.gamma * ortho

    def extra_repr(self) -> str:
        return f"r={self.r}, dropped={self.minor_A.shape[0]}, " + super().extra_repr()


@REGULARISERS.register("kasa")
def kasa_regularisation(model: nn.Module) -> Tensor | None:
    """KaSA's β‖δ‖² + γ·(‖BᵀB − I‖ + ‖AAᵀ − I‖), over the model's trainable KaSA adapters (None when there are none).

    Each adapter uses its own config's ``beta``, ``gamma``, ``ortho`` and ``reg_reduction``; ``mean`` divides each
    adapter's sum by its number of adapted matrices (the official trainer).
    """
    groups: dict[int, tuple[KaSAConfig, list[Tensor]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, KaSA) and module.lora_A.requires_grad and f".{ADAPTER_CONTAINER}." in f".{name}.":
            groups.setdefault(id(module.config), (module.config, []))[1].append(module.regularisation())
    loss = None
    for config, terms in groups.values():
        part = torch.stack(terms).sum()
        if config.reg_reduction == "mean":
            part = part / len(terms)
        loss = part if loss is None else loss + part
    return loss
