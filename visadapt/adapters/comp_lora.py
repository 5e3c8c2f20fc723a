"""Comp-LoRA (Wang et al., arXiv 2501.15040): a low-rank update confined to the complementary subspace of the
frozen weight's top singular directions.

Reading (reference note ``clip_fewshot.md`` §4.2; the paper's full text and code were not available): take
the SVD ``W = U S V^T`` of the frozen weight once, at injection, in float64. With ``U_k`` and ``V_k`` its top-``k``
left and right singular vectors and ``U_c``, ``V_c`` orthonormal bases of their complements,

    ``y = W x + s * U_c B A V_c^T drop(x)``,   ``ΔW = s * U_c B A V_c^T``,

with trainable ``A`` (``r x (in - k)``) and ``B`` (``(out - k) x r``) living inside the complement. Then
``U_k^T ΔW = 0`` and ``ΔW V_k = 0``: the update neither reads the top-``k`` input directions of ``W`` nor writes
into its top-``k`` output directions. Trainable parameters: ``r * (in + out - 2k)``, slightly fewer than LoRA's.

Implementation choices (exact, and documented because the paper's are unknown):

* The complement bases are never stored as ``d x (d - k)`` matrices. ``V_c`` is the trailing part of the
  Householder completion ``Q = I - Y T Y^T`` of ``V_k`` (``Q[:, :k] = V_k`` up to signs), kept in compact WY
  form (``Y``: ``d x k``, ``T``: ``k x k``). Forward folds the bases into the factors,
  ``A_eff = A V_c^T`` and ``B_eff = U_c B``, at ``O(d k r)`` cost per step, then runs the usual low-rank
  path ``x -> x A_eff^T -> . B_eff^T`` per token; ``ΔW`` is never formed.
* The complement basis is a deterministic, smooth function of ``V_k``; singular-vector signs are fixed (largest
  entry positive) so that recomputing the SVD on another machine gives the same basis, and saved ``A``/``B``
  keep their meaning. (Exactly tied singular values would still make the choice arbitrary.)
* The SVD is computed once per layer (per fused-qkv slice) and cached per weight tensor, so a second Comp-LoRA
  adapter or a reload on the same model reuses it. The bases are non-persistent buffers: they are rebuilt
  from the base weights, never saved.

Unknown in the reading and therefore configurable: ``protected`` (``k``), which side(s) are protected
(``side``), and the parametrisation (``basis`` as above; ``projector`` keeps full-size ``A`` and ``B`` and uses
``A (I - V_k V_k^T)`` and ``(I - U_k U_k^T) B``, the note's alternative (a): the same subspace, LoRA's
parameter count). The init follows LoRA (kaiming or gaussian ``A``, zero ``B``): the model is unchanged at
injection.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visadapt.adapters._registry import register_adapter
from visadapt.adapters.base import Adapter, init_down_projection, lora_scale
from visadapt.adapters.lora import LoRAConfig


@dataclass
class CompLoRAConfig(LoRAConfig):
    """Comp-LoRA: LoRA confined to the complement of the frozen weight's top-``protected`` singular directions."""

    protected: int = 8
    """Number ``k`` of top singular directions of each frozen weight (or fused-qkv slice) that the update may
    not touch; must be smaller than both dimensions of every adapted matrix."""
    side: Literal["both", "input", "output"] = "both"
    """Protect the top input directions (``ΔW V_k = 0``), the top output directions (``U_k^T ΔW = 0``), or
    both. Unknown in the paper's reading."""
    parametrization: Literal["basis", "projector"] = "basis"
    """``basis``: ``A`` and ``B`` in complement coordinates (the reading; ``r (in + out - 2k)`` parameters).
    ``projector``: full-size ``A``/``B`` projected onto the complement in forward (same subspace, LoRA's count)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.protected, int) or self.protected < 0:
            raise ValueError(f"protected must be an integer >= 0, got {self.protected!r}")
        if self.side not in ("both", "input", "output"):
            raise ValueError(f"side must be 'both', 'input' or 'output', got {self.side!r}")
        if self.parametrization not in ("basis", "projector"):
            raise ValueError(f"parametrization must be 'basis' or 'projector', got {self.parametrization!r}")


# id(weight parameter) -> (weak reference, {row range: (version, U_k, V_k)}); entries go when the weight does
_SVD_CACHE: dict[int, tuple[weakref.ref, dict]] = {}


def top_singular_vectors(weight: Tensor, k: int, rows: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """Top-``k`` left and right singular vectors (float64 on the CPU, signs fixed) of ``weight[rows]``, cached.

    ``weight`` is the base layer's weight (the cache key; a 1x1 conv kernel is read as a matrix); ``rows``
    selects a fused-qkv slice. The cache entry is recomputed when the weight was modified in place since.
    """
    slot = _SVD_CACHE.get(id(weight))
    if slot is None or slot[0]() is not weight:
        slot = (weakref.ref(weight), {})
        _SVD_CACHE[id(weight)] = slot
        weakref.finalize(weight, _SVD_CACHE.pop, id(weight), None)
    entry = slot[1].get(rows)
    if entry is None or entry[0] != weight._version or entry[1].shape[1] < k:
        block = weight.detach().reshape(weight.shape[0], -1)
        if rows is not None:
            block = block[rows[0] : rows[1]]
        u, _, vh = torch.linalg.svd(block.to(device="cpu", dtype=torch.float64), full_matrices=False)
        u, v = _fix_signs(u), _fix_signs(vh.T)
        entry = (weight._version, u[:, :k].clone(), v[:, :k].clone())
        slot[1][rows] = entry
    return entry[1][:, :k], entry[2][:, :k]


def _fix_signs(vectors: Tensor) -> Tensor:
    """Flip each column so that its largest-magnitude entry is positive."""
    idx = vectors.abs().argmax(0)
    signs = torch.sign(vectors[idx, torch.arange(vectors.shape[1])])
    signs[signs == 0] = 1
    return vectors * signs


def householder_completion(basis: Tensor) -> tuple[Tensor, Tensor]:
    """Compact WY form ``(Y, T)`` of the orthogonal ``Q = I - Y T Y^T`` whose first ``k`` columns span ``basis``.

    ``basis`` is ``d x k`` with orthonormal columns; ``Q[:, k:]`` is then an orthonormal basis of the complement.
    """
    k = basis.shape[1]
    a, tau = torch.geqrf(basis)
    y = a.tril(-1)
    y[:k, :k] += torch.eye(k, dtype=a.dtype)
    t = torch.zeros(k, k, dtype=a.dtype)
    for i in range(k):  # LAPACK dlarft, forward direction, column-wise storage
        t[i, i] = tau[i]
        if i:
            t[:i, i] = -tau[i] * (t[:i, :i] @ (y[:, :i].T @ y[:, i]))
    return y, t


@register_adapter("comp_lora")
class CompLoRA(Adapter):
    """Comp-LoRA: ΔW = s·U_c·B·A·V_cᵀ in the complement of the frozen weight's top-k singular directions."""

    config_class = CompLoRAConfig

    def __init__(
        self,
        weight: Tensor,
        config: CompLoRAConfig,
        *,
        source: Tensor | None = None,
        rows: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(weight, config, source=source, rows=rows)
        k, out_f, in_f = config.protected, self.out_features, self.in_features
        if k >= min(out_f, in_f):
            raise ValueError(f"protected={k} must be smaller than both dimensions of the {out_f}x{in_f} weight")
        kw = {"dtype": weight.dtype, "device": weight.device}
        self.r, self.k, self.side, self.param = config.r, k, config.side, config.parametrization
        self.protect_in = k > 0 and config.side in ("both", "input")
        self.protect_out = k > 0 and config.side in ("both", "output")
        self.scale = lora_scale(config.alpha, config.r, config.rslora)
        u_k, v_k = top_singular_vectors(source, k, rows) if source is not None else top_singular_vectors(weight, k)
        basis = self.param == "basis"
        self.lora_A = nn.Parameter(torch.empty(config.r, in_f - (k if basis and self.protect_in else 0), **kw))
        self.lora_B = nn.Parameter(torch.zeros(out_f - (k if basis and self.protect_out else 0), config.r, **kw))
        init_down_projection(self.lora_A, config.init, config.r)
        for side, protect, vecs in (("in", self.protect_in, v_k), ("out", self.protect_out, u_k)):
            if not protect:
                continue
            if basis:
                y, t = householder_completion(vecs)
                self.register_buffer(f"comp_Y_{side}", y.to(**kw), persistent=False)
                self.register_buffer(f"comp_T_{side}", t.to(**kw), persistent=False)
            else:
                self.register_buffer(f"comp_U_{side}", vecs.to(**kw), persistent=False)
        if config.dropout > 0:
            self.dropout = nn.Dropout(config.dropout)

    def protected_directions(self) -> tuple[Tensor | None, Tensor | None]:
        """``(U_k, V_k)`` of the protected output / input directions (``None`` for an unprotected side)."""
        if self.param == "projector":
            return getattr(self, "comp_U_out", None), getattr(self, "comp_U_in", None)
        eye_out = torch.eye(self.out_features, dtype=self.lora_B.dtype, device=self.lora_B.device)
        eye_in = torch.eye(self.in_features, dtype=self.lora_A.dtype, device=self.lora_A.device)
        u = self._complete("out", eye_out)[:, : self.k] if self.protect_out else None
        v = self._complete("in", eye_in)[:, : self.k] if self.protect_in else None
        return u, v

    def _complete(self, side: str, m: Tensor) -> Tensor:
        """``Q @ m`` for the side's orthogonal completion ``Q = I - Y T Y^T`` (basis parametrisation only)."""
        y, t = getattr(self, f"comp_Y_{side}"), getattr(self, f"comp_T_{side}")
        return m - y @ (t @ (y.T @ m))

    def factors(self) -> tuple[Tensor, Tensor]:
        a, b, k = self.lora_A, self.lora_B, self.k
        if self.param == "basis":
            # A_eff = A V_c^T with V_c = Q[:, k:] = P - Y T Y[k:]^T and P = [0; I]:  A_eff = [0, A] - A Y[k:] T^T Y^T
            if self.protect_in:
                y, t = self.comp_Y_in, self.comp_T_in
                a = F.pad(a, (k, 0)) - ((a @ y[k:]) @ t.T) @ y.T
            if self.protect_out:
                y, t = self.comp_Y_out, self.comp_T_out
                b = F.pad(b, (0, 0, k, 0)) - y @ (t @ (y[k:].T @ b))
        else:
            if self.protect_in:
                v = self.comp_U_in
                a = a - (a @ v) @ v.T
            if self.protect_out:
                u = self.comp_U_out
                b = b - u @ (u.T @ b)
        return a, b

    def extra_repr(self) -> str:
        return f"r={self.r}, protected={self.k}, side={self.side}, {self.param}, " + super().extra_repr()
