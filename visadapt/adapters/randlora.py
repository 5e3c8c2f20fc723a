"""RandLoRA (Albert et al., ICLR'25, arXiv 2502.00987; official code PaulAlbert31/RandLoRA; PEFT ``randlora``).

A full-rank update from frozen random bases with trainable diagonal scalings. With ``d = min(out, in)``,
``D = max(out, in)`` and ``N = ceil(d / r)`` bases,

    ``ΔW = s * sum_{i=1..N} B_i diag(λ_i) A diag(γ_i)``          (written for ``in <= out``; transposed otherwise)

with ``B_i`` (``D x r``) and ``A`` (``r x d``) frozen random matrices and the trainable ``λ`` (``r x N``,
``lora_lambda``) and ``γ`` (``N x d``, ``lora_gamma``). ``s = alpha / r``. ``λ = 0`` at init (so the model is
unchanged) and ``γ = 1 / max(N, d)``. Trainable parameters per adapted matrix: ``N (r + d)`` — a smaller ``r``
means *more* bases and more parameters.

Reading chosen: PEFT 0.21's ``RandLoraConfig``, value for value, so that ``tests/adapters/test_randlora.py`` can check
same bases, same outputs and the same outputs after several optimiser steps against PEFT:

* one down basis ``A`` is shared by all ``N`` terms (PEFT stores ``randlora_A`` as ``(r, 1, d)``), only the up
  bases ``B_i`` differ. The reference sheet writes ``A_i``; PEFT and the paper's equation share one ``A``.
* the pairing of the rows of ``λ ⊙ A ⊙ γ`` with the columns of ``[B_1 ... B_N]`` follows PEFT's flattening (row
  ``k N + i`` of the scaled ``A`` meets column ``i r + k`` of the ``B`` stack). It is a fixed relabelling of random
  vectors, so it does not change the method, but it is what makes the values equal.
* the bases are drawn once per model from ``torch.Generator().manual_seed(seed)``: ``A`` kaiming-uniform
  (``a = sqrt(5)``) of shape ``(r, 1, d_max)``, then ``N_max`` kaiming-uniform ``(D_max, 1, r)`` blocks for ``B``,
  each in ``basis_dtype`` (PEFT uses bfloat16 where available), each tensor divided by its standard deviation. They
  are sized to the largest adapted layer (``basis_shape``) and every layer uses the leading slice. ``sparse`` and
  ``very_sparse`` give PEFT's ternary bases (``-1/0/1`` with probabilities ``1/(2k), 1 - 1/k, 1/(2k)``, ``k = 3`` or
  ``sqrt(d)``), also divided by their standard deviation.

Bases are not saved (non-persistent buffers rebuilt from the seed, as PEFT with ``save_projection=False``) and are one
shared tensor for all layers of the same size. visadapt builds each layer's adapter separately, so it cannot see the
largest layer: by default (``basis_shape = None``) each layer draws bases of its own size (shared between layers of
that size). Set ``basis_shape`` to ``[D_max, d_max]`` of the adapted layers (:func:`randlora_basis_shape`) to get
PEFT's exact bases.

The official code (and PEFT) implement the scaling through a memory-saving autograd function; here ``λ ⊙ A ⊙ γ``
is computed with ordinary autograd (the same gradients up to float rounding). The update has the exact low-rank form
``(B_stack) (λ ⊙ A ⊙ γ)`` of rank ``N r >= d``, so merging is exact and :func:`~visadapt.adapters.export_peft` writes a
PEFT LoRA of rank ``N r`` with identical outputs (it is full rank: the file is about as large as the weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch
from torch import Tensor, nn

from visadapt.adapters._registry import register_adapter
from visadapt.adapters.base import Adapter, AdapterConfig
from visadapt.adapters.targets import match_rules, parse_target, supported_kind

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class RandLoRAConfig(AdapterConfig):
    """RandLoRA: full-rank ΔW from frozen shared random bases; only diagonal scalings λ and γ train."""

    r: int = 32
    """Rank of each random basis. The number of bases per matrix is ``ceil(min(out, in) / r)``, so a smaller ``r``
    trains more parameters (``N (r + min(out, in))`` per matrix). PEFT default 32."""
    alpha: float = 640.0
    """Scale numerator: ``s = alpha / r``. PEFT default 640 ("typically 20 x r"; lower it or the learning rate if
    training is unstable)."""
    dropout: float = 0.0
    """Dropout probability on the adapter branch's input."""
    seed: int = 0
    """Seed of the random bases (PEFT's ``projection_prng_key``)."""
    projection: Literal["dense", "sparse", "very_sparse"] = "dense"
    """``dense``: kaiming-uniform bases; ``sparse`` / ``very_sparse``: PEFT's ternary bases (``k = 3`` / ``sqrt(d)``)."""
    basis_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Dtype the dense bases are drawn and normalised in before being cast to the layer's dtype. PEFT draws in
    bfloat16 where ``accelerate`` reports bfloat16 support (float16 otherwise)."""
    basis_shape: list[int] | None = None
    """``[D, d]``: size of the shared bases. PEFT uses ``D = max(O, I)``, ``d = min(O, I)`` with ``O``, ``I`` the
    largest output and input sizes over the adapted layers (:func:`randlora_basis_shape`). ``None``: each layer's own
    ``[max(out, in), min(out, in)]``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be an integer >= 1, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.projection not in ("dense", "sparse", "very_sparse"):
            raise ValueError(f"projection must be 'dense', 'sparse' or 'very_sparse', got {self.projection!r}")
        if self.basis_dtype not in _DTYPES:
            raise ValueError(f"basis_dtype must be one of {sorted(_DTYPES)}, got {self.basis_dtype!r}")
        if self.basis_shape is not None:
            shape = [int(v) for v in self.basis_shape]
            if len(shape) != 2 or shape[0] < shape[1] or shape[1] < 1:
                raise ValueError(f"basis_shape must be [max_dim, min_dim] with max_dim >= min_dim >= 1, got {shape}")
            self.basis_shape = shape


def num_bases(min_dim: int, r: int) -> int:
    """``ceil(min_dim / r)``: enough rank-``r`` terms for a full-rank update."""
    return -(-min_dim // r)


def _kaiming(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    return nn.init.kaiming_uniform_(torch.empty(shape, dtype=dtype), a=math.sqrt(5), generator=generator)


@lru_cache(maxsize=16)
def _bases_cpu(seed: int, r: int, max_dim: int, min_dim: int, projection: str, basis_dtype: str) -> tuple[Tensor, Tensor]:
    """The shared bases ``A`` ``(r, 1, min_dim)`` and ``B`` ``(max_dim, N, r)`` in PEFT's order of draws."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = num_bases(min_dim, r)
    with torch.no_grad():
        if projection == "dense":
            dtype = _DTYPES[basis_dtype]
            a = _kaiming((r, 1, min_dim), gen, dtype)
            b = torch.cat([_kaiming((max_dim, 1, r), gen, dtype) for _ in range(n)], dim=1)
        else:
            k = 3.0 if projection == "sparse" else math.sqrt(min_dim)
            raw_a = torch.rand((r, 1, min_dim), generator=gen)
            raw_b = torch.rand((max_dim, n, r), generator=gen)
            a, b = torch.zeros(raw_a.shape), torch.zeros(raw_b.shape)
            for raw, out in ((raw_a, a), (raw_b, b)):
                out[raw < 1 / (2 * k)] = -1
                out[raw > 1 - 1 / (2 * k)] = 1
        return a / a.std(), b / b.std()


_SHARED: dict[tuple, tuple[Tensor, Tensor]] = {}


def shared_bases(config: RandLoRAConfig, max_dim: int, min_dim: int, dtype: torch.dtype, device) -> tuple[Tensor, Tensor]:
    """The bases for ``config`` at size ``(max_dim, min_dim)`` in ``dtype`` on ``device``; one tensor pair per key."""
    key = (config.seed, config.r, max_dim, min_dim, config.projection, config.basis_dtype, dtype, str(device))
    if key not in _SHARED:
        if len(_SHARED) > 32:
            _SHARED.clear()
        a, b = _bases_cpu(config.seed, config.r, max_dim, min_dim, config.projection, config.basis_dtype)
        _SHARED[key] = (a.to(dtype=dtype, device=device), b.to(dtype=dtype, device=device))
    return _SHARED[key]


def randlora_basis_shape(model: nn.Module, target: str) -> list[int]:
    """``[D, d]`` as PEFT sizes the shared bases: with ``O`` and ``I`` the largest output and input sizes over the
    modules ``target`` adapts, ``D = max(O, I)`` and ``d = min(O, I)``. A fused-qkv slice counts its slice's rows."""
    from visadapt.adapters.targets import slice_bounds

    rules = parse_target(target)
    out_max, in_max = 0, 0
    for name, module in model.named_modules():
        rule = match_rules(rules, name) if name else None
        if rule is None or supported_kind(module) is None:
            continue
        out_f, in_f = module.weight.shape[:2]
        if rule.slices is not None:
            out_f = max(b - a for a, b in slice_bounds(out_f, rule.slices, name).values())
        out_max, in_max = max(out_max, out_f), max(in_max, in_f)
    if not out_max:
        raise ValueError(f"target {target!r} matches no nn.Linear / 1x1 nn.Conv2d module")
    return [max(out_max, in_max), min(out_max, in_max)]


@register_adapter("randlora")
class RandLoRA(Adapter):
    """RandLoRA: ΔW = s·Σ_i B_i·diag(λ_i)·A·diag(γ_i), frozen shared random bases, trainable λ (r×N) and γ (N×d)."""

    config_class = RandLoRAConfig

    def __init__(self, weight: Tensor, config: RandLoRAConfig, **context) -> None:
        super().__init__(weight, config, **context)
        kw = {"dtype": weight.dtype, "device": weight.device}
        out_f, in_f = self.out_features, self.in_features
        self.r, self.min_dim, self.max_dim = config.r, min(out_f, in_f), max(out_f, in_f)
        self.n = num_bases(self.min_dim, config.r)
        big, small = config.basis_shape or (self.max_dim, self.min_dim)
        if big < self.max_dim or small < self.min_dim:
            raise ValueError(
                f"basis_shape={[big, small]} is smaller than this {out_f}x{in_f} weight needs "
                f"([{self.max_dim}, {self.min_dim}]); use randlora_basis_shape(model, target)")
        a, b = shared_bases(config, big, small, weight.dtype, weight.device)
        self.register_buffer("basis_A", a, persistent=False)  # (r, 1, d_max), shared by every layer
        self.register_buffer("basis_B", b, persistent=False)  # (D_max, N_max, r)
        self.scale = config.alpha / config.r
        self.lora_lambda = nn.Parameter(torch.zeros(config.r, self.n, **kw))
        self.lora_gamma = nn.Parameter(torch.full((self.n, self.min_dim), 1.0 / max(self.n, self.min_dim), **kw))
        if config.dropout > 0:
            self.dropout = nn.Dropout(config.dropout)

    def factors(self) -> tuple[Tensor, Tensor]:
        a = self.basis_A[:, :, : self.min_dim]  # (r, 1, d), broadcast over the N bases
        scaled = (self.lora_lambda[:, :, None] * a * self.lora_gamma[None]).flatten(end_dim=1)  # (r N, d)
        stack = self.basis_B[: self.max_dim, : self.n, :].flatten(start_dim=1)  # (D, N r), often a view
        if not torch.is_grad_enabled() and stack.untyped_storage().data_ptr() == self.basis_B.untyped_storage().data_ptr():
            # outside autograd (inference, merge, export) hand out a copy: the shared bases must not leak into files
            # (safetensors refuses tensors that share memory); the copy is small next to the forward's GEMMs
            stack = stack.clone()
        if self.min_dim == self.in_features:
            return scaled, stack
        return stack.t(), scaled.t()

    def extra_repr(self) -> str:
        return f"r={self.r}, bases={self.n}, " + super().extra_repr()
