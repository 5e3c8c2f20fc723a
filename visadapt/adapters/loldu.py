"""LoLDU: low-rank adaptation through a Lower-Diag-Upper decomposition (Shi et al., arXiv 2410.13618; official code
SKDDJ/LoLDU).

Init: the LU factorisation with partial pivoting of the frozen weight, ``W = P L U``, with a diagonal taken out of
``U`` (official: ``D = diag(U)``; default here: ``D`` = the row norms of ``U``, see below; ``U <- D^-1 U``), so
``W = P L diag(D) U``. The leading ``r`` pieces are kept:
``L_r = L[:, :r]``, ``z = D[:r]`` and ``U_r = U[:r, :]``. The official code moves them out of the weight
(``W_res = W - σ P L_r diag(z0) U_r``) and trains ``W_res + σ P L_r diag(z) U_r``; only ``z`` (``lora_z``, ``r`` values)
trains, the paper also trains the scalar ``σ`` (initial ``alpha / r``; ``train_scale``).

Here the frozen weight is never modified (visadapt's adapter contract): the same function is written as an update of
``W``, ``ΔW = P L_r diag(σ z - σ0 z0) U_r``, which is exactly zero at init (``σ = σ0``, ``z = z0``): the model starts
at the pretrained weights, bitwise. It is an exact rank-``r`` product (``B = P L_r``, ``A = diag(σ z - σ0 z0) U_r``),
so merging is exact and :func:`~visadapt.adapters.export_peft` writes a PEFT LoRA of rank ``r`` with identical
outputs.

Storage. Trainable: ``r`` values (``+ 1`` with ``train_scale``). ``L_r``, ``U_r``, ``z0`` and the permutation are
functions of the frozen weight, so they are non-persistent buffers rebuilt from it (never saved). The permutation is
kept as an index vector (``ldu_perm``, ``out`` integers, ``(P L)[i] = L[perm[i]]``), not as the dense ``out x out``
matrix the official code keeps (5.3M floats for a ViT-B qkv).

The diagonal (``normalize``). The official code takes ``D`` as LU's pivots and ``U`` with a unit diagonal
(``normalize = "unit_diagonal"``). A change ``δ`` of ``z_i`` then moves ``W`` by ``σ δ L_i U_i`` with
``|U_i| = |row i of LU's U| / |d_i|``: a tiny pivot makes the step huge. On the 69 adapted matrices of
``devise_effnet_minilm`` the smallest pivots are 4.6e-8 (``blocks.0.0.conv_pw``), 8e-8 (``blocks.5.3.conv_pwl``) and
2.5e-32 on the rank-deficient ``text_projection`` (cond 3e17), whose unit-diagonal ``U`` has rows of norm 9e31: one
step of ``± 1e-4`` on every ``z`` put entries of 5e24 into its ``ΔW``; the class text features' norms then overflow
float32 in ``F.normalize``, every class embedding becomes zero and the few-shot task tested at exactly chance (10.0 %)
even at lr 1e-4. The default
here, ``normalize = "row_norm"``, takes ``D`` as the row norms of LU's ``U`` (with the pivot's sign) and ``U`` with
unit-norm rows: the same ``W = P L diag(D) U``, the same ``r`` trainable values, and a step ``δ`` of every ``z``
moves ``W`` by at most ``σ δ Σ_i |L_i|`` (``|L| <= 1`` by partial pivoting). The same step then moves each matrix by
1.1e-5 (median) to 6.4e-5 of its norm at ``alpha = 1`` (LoRA r=8: 1.2e-3, at most 2.6e-3); the task fragment sets
``alpha = 64`` to come near LoRA's step.

Defaults follow the official code (except ``normalize``): ``alpha = 1`` (``σ = 1 / r``) and only ``z`` trains. The official default rank is
768 (full rank for ViT-B's 768-wide layers, still only ``r`` parameters); ``r`` here is capped at ``min(out, in)`` of
each matrix. Of the official ``z`` inits only ``lu`` (the default, ``z0 = D[:r]``) is offered: the others (uniform,
normal, ones, ...) would need the random start stored to keep the model at the pretrained weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from visadapt.adapters._registry import register_adapter
from visadapt.adapters.base import Adapter, AdapterConfig


@dataclass
class LoLDUConfig(AdapterConfig):
    """LoLDU: ΔW from the weight's own LDU factors; only the r diagonal values (and optionally a scale) train."""

    r: int = 8
    """Number of leading LDU components adapted per matrix (capped at ``min(out, in)``); the trainable count."""
    alpha: float = 1.0
    """The scale ``σ`` starts at ``alpha / r`` (official default ``alpha = 1``)."""
    train_scale: bool = False
    """Also train ``σ`` (the paper); the official code trains ``z`` only."""
    dropout: float = 0.0
    """Dropout probability on the adapter branch's input."""
    normalize: Literal["row_norm", "unit_diagonal"] = "row_norm"
    """How ``D`` is taken out of LU's ``U``: ``unit_diagonal`` = the official code (``D`` = the pivots, ``U`` with a
    unit diagonal; a tiny pivot makes a row of ``U`` huge, so a step on its ``z`` is amplified by ``1 / |pivot|``);
    ``row_norm`` (default) = ``D`` = the signed row norms of LU's ``U``, ``U`` with unit-norm rows: the same ``W``,
    the same trainable count, and a step of ``z`` moves ``ΔW`` by at most ``σ ‖L_i‖``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be an integer >= 1, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.normalize not in ("row_norm", "unit_diagonal"):
            raise ValueError(f"normalize must be 'row_norm' or 'unit_diagonal', got {self.normalize!r}")


def ldu(weight: Tensor, normalize: str = "unit_diagonal") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(perm, L, D, U)`` in float64 with ``W[i] == (L diag(D) U)[perm[i]]`` row by row, i.e. ``W = P L diag(D) U``.

    ``L`` is unit lower triangular (``out x k``), ``U`` upper triangular (``k x in``), ``k = min(out, in)``; the
    permutation comes from LAPACK's pivots as an index, never as a dense matrix. ``normalize``: ``unit_diagonal``
    (``D`` = the pivots, ``U`` with a unit diagonal) or ``row_norm`` (``D`` = LU's ``U`` row norms with the pivot's
    sign, ``U`` with unit-norm rows).
    """
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    lu, pivots = torch.linalg.lu_factor(w)
    _, lower, upper = torch.lu_unpack(lu, pivots, unpack_data=True, unpack_pivots=False)
    order = torch.arange(w.shape[0])  # rows of W in the order LAPACK's swaps leave them: W[order] = L U
    for i, j in enumerate((pivots - 1).tolist()):
        if i != j:
            order[[i, j]] = order[[j, i]]
    perm = torch.empty_like(order)
    perm[order] = torch.arange(w.shape[0])  # W[order[i]] = (L U)[i]  <=>  W[m] = (L U)[perm[m]]
    if normalize == "row_norm":
        d = upper.norm(dim=1) * torch.where(torch.diagonal(upper) < 0, -1.0, 1.0)
    else:
        d = torch.diagonal(upper).clone()
    safe = torch.where(d == 0, torch.ones_like(d), d)  # a zero pivot / row (singular W): keep that row of U unscaled
    return perm, lower, d, upper / safe[:, None]


@register_adapter("loldu")
class LoLDU(Adapter):
    """LoLDU: ΔW = P·L_r·diag(σz − σ0z0)·U_r from the weight's LDU factors; trains r values (+ the scale σ)."""

    config_class = LoLDUConfig

    def __init__(self, weight: Tensor, config: LoLDUConfig, **context) -> None:
        super().__init__(weight, config, **context)
        kw = {"dtype": weight.dtype, "device": weight.device}
        r = self.r = min(config.r, self.out_features, self.in_features)
        perm, lower, d, upper = ldu(weight, config.normalize)
        self.register_buffer("ldu_perm", perm.to(weight.device), persistent=False)
        self.register_buffer("ldu_L", lower[:, :r].to(**kw), persistent=False)
        self.register_buffer("ldu_U", upper[:r].to(**kw), persistent=False)
        self.register_buffer("ldu_z0", d[:r].to(**kw), persistent=False)
        self.sigma0, self.normalize = config.alpha / r, config.normalize
        self.register_buffer("ldu_sigma0", torch.tensor(self.sigma0, **kw), persistent=False)
        self.lora_z = nn.Parameter(d[:r].to(**kw))
        self.lora_sigma = nn.Parameter(self.ldu_sigma0.clone()) if config.train_scale else None
        if config.dropout > 0:
            self.dropout = nn.Dropout(config.dropout)

    def factors(self) -> tuple[Tensor, Tensor]:
        if self.lora_sigma is None:
            diag = (self.lora_z - self.ldu_z0) * self.sigma0
        else:
            diag = self.lora_sigma * self.lora_z - self.ldu_sigma0 * self.ldu_z0
        return diag[:, None] * self.ldu_U, self.ldu_L[self.ldu_perm]

    def extra_repr(self) -> str:
        return f"r={self.r}, sigma0={self.sigma0:.4g}, normalize={self.normalize}, " + super().extra_repr()
