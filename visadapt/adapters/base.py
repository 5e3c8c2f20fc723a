"""The adapter contract: the config base class, the per-target adapter base class, and the layer wrapper.

Three pieces, read top to bottom:

* :class:`AdapterConfig`: a plain dataclass with the one target rule; variants extend it with their knobs.
* :class:`Adapter`: one adapter on one dense ``(out_features, in_features)`` block of a frozen weight (a whole
  Linear, a 1x1 conv viewed as a matrix, or one q/k/v slice of a fused qkv Linear). A low-rank variant only
  implements :meth:`Adapter.factors`; forward, ``delta_weight`` and export follow from it.
* :class:`AdapterLayer`: wraps one base layer (``self.base_layer``, frozen and untouched) and holds any number
  of named adapters under ``self.adapters`` (so every adapter parameter name contains ``.adapters.``).
  It computes ``base(x) + sum_i w_i * delta_i(x)`` without materialising any ``delta_i`` as a matrix, merges
  and unmerges, and can be disabled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visadapt.adapters.targets import parse_target

ADAPTER_CONTAINER = "adapters"
"""Attribute of :class:`AdapterLayer` that holds the adapters: every adapter parameter name contains it."""

_LOW_PRECISION = (torch.bfloat16, torch.float16)

DEFAULT_TARGET = r".*\.(qkv|q_proj|k_proj|v_proj|query|key|value|to_q|to_k|to_v)"


@dataclass
class AdapterConfig:
    """Fields every adapter variant shares."""

    target: str = DEFAULT_TARGET
    """Regular expression matched in full against module names (``blocks\\.\\d+\\.attn\\.qkv``). A trailing
    ``[q,v]``-style suffix on an alternative selects slices of a fused qkv Linear instead of the whole layer
    (``.*attn\\.qkv[q,v]|.*attn\\.proj``). The default selects the attention q, k, v projections of the
    common families (timm/open_clip fused ``qkv`` as one layer, HF, diffusers)."""

    def __post_init__(self) -> None:
        parse_target(self.target)  # raises with a message naming the target

    def for_module(self, module_name: str) -> AdapterConfig:
        """The config that applies to one module (variants with per-module patterns override this)."""
        return self


class Adapter(nn.Module):
    """Base class of one adapter on one dense ``(out_features, in_features)`` block of a frozen weight.

    Subclasses set ``config_class`` and implement :meth:`factors`, returning ``(A, B)`` with
    ``delta_weight() == scale * B @ A``. They keep their trainable tensors in parameters named ``lora_*`` and
    read-only helpers in non-persistent buffers, create them with the dtype and device of ``weight``, and store
    the scalar ``scale`` and the input ``dropout`` module.
    """

    config_class: ClassVar[type[AdapterConfig]] = AdapterConfig
    identity_at_init: ClassVar[bool] = True
    """True when a freshly injected adapter leaves the model's outputs unchanged."""
    peft_native: ClassVar[bool] = False
    """True when the parameters map one-to-one onto a PEFT LoRA with the same ``r`` and ``alpha``."""
    lowrank_forward: ClassVar[bool] = True
    """False for a variant whose contribution is not ``scale * B A x`` (input-dependent routing, an output offset):
    the layer then adds ``adapter(x2d)`` (the adapter's own ``forward``, ``(tokens, out_features)``) instead."""

    scale: float = 1.0

    def __init__(
        self,
        weight: Tensor,
        config: AdapterConfig,
        *,
        source: Tensor | None = None,
        rows: tuple[int, int] | None = None,
    ) -> None:
        """``weight`` is the frozen 2-D block to adapt; ``source`` the base layer's weight parameter it was taken
        from and ``rows`` its output row range there (for variants that analyse or cache by the base weight)."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.config = config
        self.dropout: nn.Module = nn.Identity()

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(A, B)``, shapes ``(rank, in_features)`` and ``(out_features, rank)``, without the scale."""
        raise NotImplementedError(f"{type(self).__name__} has no low-rank factorisation")

    def branches(self) -> list[tuple[Tensor, Tensor]]:
        """``(A_j, B_j)`` pairs with ``delta_weight() == scale * sum_j B_j @ A_j``, each of which draws its own
        dropout mask in training. Default: the one pair :meth:`factors`. A variant whose sub-branches must see
        independent masks (Block-LoRA's ``arm_dropout``) returns several; with dropout inactive the layer uses
        :meth:`factors` alone."""
        return [self.factors()]

    def delta_weight(self) -> Tensor:
        """The full update ``scale * B @ A`` of this block, in float32 (used for merging and checks only)."""
        a, b = self.factors()
        return (b.float() @ a.float()) * self.scale

    def delta_bias(self) -> Tensor | None:
        """An input-independent output offset (float32, ``(out_features,)``) that merging adds to the base bias, or
        ``None`` (every low-rank variant)."""
        return None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, scale={self.scale:.4g}"


class AdapterLayer(nn.Module):
    """Wraps one base layer (``nn.Linear`` or 1x1 ``nn.Conv2d``) and holds named adapters.

    Attributes not found on the wrapper are read from the base layer (``weight``, ``in_features``, ...), so code
    that inspects the layer keeps working. Base parameters live under ``base_layer.`` and are never modified
    except by :meth:`merge` / :meth:`unmerge`.
    """

    def __init__(self, base_layer: nn.Module, kind: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.kind = kind  # 'linear' or 'conv'
        self.adapters = nn.ModuleDict()
        self.slices: dict[str, dict[str, tuple[int, int]] | None] = {}
        """Adapter name -> slice name -> output row range, or ``None`` when the adapter covers the layer."""
        self.configs: dict[str, AdapterConfig] = {}
        self.active: dict[str, float] = {}
        """Adapter name -> weight of the adapters that take part in forward."""
        self.merged: dict[str, float] = {}
        """Adapter name -> weight of the adapters currently merged into the base weight."""
        self.enabled = True
        self._premerge: tuple[Tensor, Tensor | None, int] | None = None
        """A low-precision base's weight and bias before the first merge, and the weight's version counter after
        the last merge: :meth:`unmerge` restores them bit for bit (see :meth:`merge`)."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "adapters"):
                raise
            return getattr(self.base_layer, name)

    @property
    def base_weight(self) -> Tensor:
        return self.base_layer.weight

    def _weight2d(self) -> Tensor:
        w = self.base_layer.weight
        return w if self.kind == "linear" else w.view(w.shape[0], w.shape[1])

    # --- building -----------------------------------------------------------------------------------------

    def add_adapter(
        self, name: str, adapter_cls: type[Adapter], config: AdapterConfig, slices: dict[str, tuple[int, int]] | None
    ) -> None:
        """Create adapter ``name`` of class ``adapter_cls`` on the whole layer or on the given row slices."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if self.merged:
            raise RuntimeError("cannot add an adapter to a layer with merged adapters; unmerge first")
        w, source = self._weight2d().detach(), self.base_layer.weight
        if slices is None:
            self.adapters[name] = adapter_cls(w, config, source=source)
        else:
            self.adapters[name] = nn.ModuleDict(
                {s: adapter_cls(w[a:b], config, source=source, rows=(a, b)) for s, (a, b) in slices.items()}
            )
        self.slices[name] = slices
        self.configs[name] = config

    def parts(self, name: str) -> list[tuple[Adapter, tuple[int, int] | None]]:
        """The adapters of ``name`` with their output row range (``None``: all rows)."""
        entry, slices = self.adapters[name], self.slices[name]
        if slices is None:
            return [(entry, None)]
        return [(entry[s], bounds) for s, bounds in slices.items()]

    def num_parameters(self, name: str | None = None) -> int:
        """Adapter parameters of ``name`` (all adapters when ``None``)."""
        names = [name] if name is not None else list(self.adapters)
        return sum(core.num_parameters() for n in names for core, _ in self.parts(n))

    # --- weights ----------------------------------------------------------------------------------------------

    def delta_weight(self, name: str | None = None) -> Tensor:
        """The update of adapter ``name`` in the base weight's shape and dtype (scale included, combination
        weight not); with ``name=None`` the weighted sum over the active adapters."""
        delta = self._delta2d({name: 1.0} if name is not None else self.active)
        return delta.to(self.base_weight.dtype).view_as(self.base_weight)

    def _delta2d(self, weights: dict[str, float]) -> Tensor:
        w = self._weight2d()
        delta = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        for name, coef in weights.items():
            for core, rows in self.parts(name):
                target = delta if rows is None else delta[rows[0] : rows[1]]
                target.add_(core.delta_weight(), alpha=coef)
        return delta

    @torch.no_grad()
    def merge(self) -> None:
        """Add the active adapters (with their weights) into the base weight; a no-op when already merged.

        The update is summed in float32 and added to the base in float32, then rounded to the base's dtype once, so
        a bf16 / fp16 base holds the correctly rounded ``W + delta``. Such a base also keeps its pre-merge weight
        (and bias) aside, for :meth:`unmerge` to restore exactly: subtracting the delta again would leave the
        rounding of both steps in the weight (about 2^-8 relative in bf16) and drift with every merge cycle.
        """
        todo = {n: c for n, c in self.active.items() if n not in self.merged}
        if not todo:
            return
        w = self.base_weight
        delta, bias = self._delta2d(todo).view_as(w), self._delta_bias(todo)
        b = getattr(self.base_layer, "bias", None)
        if not self.merged and w.dtype in _LOW_PRECISION:
            self._premerge = (w.detach().clone(), None if b is None else b.detach().clone(), -1)
        w.copy_((w.float() + delta).to(w.dtype))
        if bias is not None:
            b.copy_((b.float() + bias).to(b.dtype))
        if self._premerge is not None:
            self._premerge = (*self._premerge[:2], w._version)
        self.merged.update(todo)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract what :meth:`merge` added; a no-op when nothing is merged.

        A float32 base is restored by a float32 subtraction, to within a few ulp of its value before the merge. A
        bf16 / fp16 base gets its pre-merge tensors back bit for bit, unless the weight was written since the merge
        (its version counter moved): then the delta is subtracted in float32 and rounded once.
        """
        if not self.merged:
            return
        w = self.base_weight
        saved, self._premerge = self._premerge, None
        if saved is not None and saved[2] == w._version:
            w.copy_(saved[0])
            if saved[1] is not None:
                self.base_layer.bias.copy_(saved[1])
            self.merged = {}
            return
        bias = self._delta_bias(self.merged)
        w.copy_((w.float() - self._delta2d(self.merged).view_as(w)).to(w.dtype))
        if bias is not None:
            b = self.base_layer.bias
            b.copy_((b.float() - bias).to(b.dtype))
        self.merged = {}

    def _delta_bias(self, weights: dict[str, float]) -> Tensor | None:
        """The weighted sum of the adapters' :meth:`Adapter.delta_bias` offsets (``None`` when no adapter has one)."""
        total = None
        for name, coef in weights.items():
            for core, rows in self.parts(name):
                offset = core.delta_bias()
                if offset is None:
                    continue
                if getattr(self.base_layer, "bias", None) is None:
                    raise NotImplementedError(
                        f"{type(core).__name__} adds an output offset, and this layer has no bias to merge it into")
                if total is None:
                    total = torch.zeros(self.base_weight.shape[0], dtype=torch.float32, device=offset.device)
                (total if rows is None else total[rows[0] : rows[1]]).add_(offset.float(), alpha=coef)
        return total

    # --- forward ---------------------------------------------------------------------------------------------

    def lowrank(self, name: str) -> tuple[Tensor, Tensor, float]:
        """``(A, B, scale)`` over the whole layer with ``delta_weight(name) == scale * B @ A`` (2-D, differentiable).

        An adapter on fused-qkv slices stacks the slices' ``A`` and places each slice's ``B`` in its output rows
        of a zero-padded ``B`` (the rows of unadapted slices stay exactly zero). Raises ``NotImplementedError``
        for a variant without a low-rank form.
        """
        parts = self.parts(name)
        factors = [core.factors() for core, _ in parts]
        scale = parts[0][0].scale
        if parts[0][1] is None:
            return factors[0][0], factors[0][1], scale
        a = torch.cat([f[0] for f in factors])
        b = factors[0][1].new_zeros(self.base_weight.shape[0], a.shape[0])
        col = 0
        for (core, rows), (_, b_part) in zip(parts, factors):
            rank = b_part.shape[1]
            b[rows[0] : rows[1], col : col + rank] = b_part if core.scale == scale else b_part * (core.scale / scale)
            col += rank
        return a, b, scale

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if not self.enabled or self.merged or not self.active:
            return out
        if self.kind == "linear":
            if not out.is_contiguous():
                out = out.contiguous()
            x2d = x.reshape(-1, x.shape[-1])
            for name, coef in self.active.items():
                out = self._add_delta_(name, coef, x2d, out)
            return out
        # 1x1 conv: the same maps over channels; reproduce the base layer's padding and stride on the input
        conv = self.base_layer
        padding = (0, 0) if isinstance(conv.padding, str) else conv.padding
        if any(padding):
            x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
        if tuple(conv.stride) != (1, 1):
            x = x[..., :: conv.stride[0], :: conv.stride[1]]
        x_last = x.movedim(-3, -1)
        x2d = x_last.reshape(-1, x_last.shape[-1])
        for name, coef in self.active.items():
            delta = self._add_delta_(name, coef, x2d, x2d.new_zeros(x2d.shape[0], self.base_weight.shape[0]))
            # added in the base output's memory layout, so that what follows sees the layout it would see unadapted
            out = out.add(delta.view(*x_last.shape[:-1], -1).movedim(-1, -3).to(out.dtype))
        return out

    def _add_delta_(self, name: str, coef: float, x2d: Tensor, out: Tensor) -> Tensor:
        """``out += coef * delta_name(x)`` in the low-rank order, in place on ``out`` (the base layer's output).

        Each slice (and each branch, see :meth:`Adapter.branches`) draws its own dropout mask, as separate q, k, v
        Linears with their own LoRA would. When no dropout is active (``dropout=0`` or eval mode) all slices share
        one down-projection GEMM (their ``A`` stacked). Each up-projection is then accumulated into its own output
        columns by :class:`_AddUpProjection`: no full-size temporary, no ``cat``/``clone`` of the output, and no
        FLOPs spent on unadapted slices.
        """
        parts = self.parts(name)
        if not parts[0][0].lowrank_forward:  # input-dependent variants compute their own contribution
            delta = x2d.new_zeros(x2d.shape[0], out.shape[-1]) if parts[0][1] is not None else None
            for core, bounds in parts:
                piece = core(x2d) * coef
                if bounds is None:
                    delta = piece
                else:
                    delta[:, bounds[0] : bounds[1]] = piece
            return out + delta.to(out.dtype).view(out.shape)
        rows, alphas, ups, pieces = [], [], [], []
        if any(_dropout_active(core.dropout) for core, _ in parts):
            for core, bounds in parts:
                for a, b in core.branches():  # one mask per slice and per branch
                    pieces.append(F.linear(core.dropout(x2d), a.to(x2d.dtype)))
                    rows.append(bounds or (0, out.shape[-1]))
                    alphas.append(core.scale * coef)
                    ups.append(b.to(out.dtype))
            h = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        else:
            downs = []
            for core, bounds in parts:
                a, b = core.factors()
                downs.append(a)
                rows.append(bounds or (0, out.shape[-1]))
                alphas.append(core.scale * coef)
                ups.append(b.to(out.dtype))
            a = downs[0] if len(downs) == 1 else torch.cat(downs)
            h = F.linear(x2d, a.to(x2d.dtype))
        h = h.to(out.dtype)
        cols, col = [], 0
        for b in ups:
            cols.append((col, col + b.shape[1]))
            col += b.shape[1]
        return _AddUpProjection.apply(out, h, tuple(rows), tuple(cols), tuple(alphas), *ups)

    def extra_repr(self) -> str:
        state = "merged" if self.merged else ("enabled" if self.enabled else "disabled")
        active = ", ".join(f"{n}={c:g}" for n, c in self.active.items()) or "none"
        return f"kind={self.kind}, active=[{active}], {state}"


class _AddUpProjection(torch.autograd.Function):
    """``out[..., r0:r1] += alpha_i * h[:, c0:c1] @ B_i^T`` for each part ``i``, in place on ``out``.

    ``out`` is the base layer's freshly computed output (nothing saved it for backward), so updating it in place is
    safe; doing it inside one autograd function (``mark_dirty``) keeps autograd from recording the slice writes as
    view updates, whose backward would copy the whole output gradient once per slice. Backward: the output
    gradient passes through unchanged, plus two small GEMMs per part. Only ``h`` and the ``B_i`` are saved.
    """

    @staticmethod
    def forward(ctx, out: Tensor, h: Tensor, rows: tuple, cols: tuple, alphas: tuple, *ups: Tensor) -> Tensor:
        out2d = out.view(-1, out.shape[-1])
        for (r0, r1), (c0, c1), alpha, b in zip(rows, cols, alphas, ups):
            out2d[:, r0:r1].addmm_(h[:, c0:c1], b.t(), alpha=alpha)
        ctx.mark_dirty(out)
        ctx.save_for_backward(h, *ups)
        ctx.rows, ctx.cols, ctx.alphas = rows, cols, alphas
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        h, *ups = ctx.saved_tensors
        g2d = grad.reshape(-1, grad.shape[-1])
        parts = list(zip(ctx.rows, ctx.cols, ctx.alphas))
        grad_h = None
        if ctx.needs_input_grad[1]:
            pieces = [(g2d[:, r0:r1] @ b).mul_(alpha) for ((r0, r1), _, alpha), b in zip(parts, ups)]
            grad_h = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        grad_ups = [
            (g2d[:, r0:r1].t() @ h[:, c0:c1]).mul_(alpha) if ctx.needs_input_grad[5 + i] else None
            for i, ((r0, r1), (c0, c1), alpha) in enumerate(parts)
        ]
        return (grad, grad_h, None, None, None, *grad_ups)


def _dropout_active(module: nn.Module) -> bool:
    """True when ``module`` would change its input now (a training-mode dropout with ``p > 0``)."""
    return not isinstance(module, nn.Identity) and module.training and getattr(module, "p", 1.0) > 0


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    """``alpha / r`` (Hu et al. 2021, §4.1) or ``alpha / sqrt(r)`` (rsLoRA, Kalajdzievski 2023)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def init_down_projection(a: Tensor, init: str, rank: int) -> None:
    """Initialise a down-projection ``(rank, in)`` in place as PEFT does.

    ``kaiming``: kaiming-uniform with ``a=sqrt(5)`` (the ``nn.Linear`` default); ``gaussian``: N(0, 1/r).
    """
    with torch.no_grad():
        if init == "kaiming":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(a, std=1.0 / rank)
        else:
            raise ValueError(f"init must be 'kaiming' or 'gaussian', got {init!r}")


# --- frozen low-precision base ---------------------------------------------------------------------------------------

_CAST_KINDS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def cast_frozen_base(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Store the frozen matmul weights of ``model`` in ``dtype``; adapters, heads and every trained tensor stay fp32.

    Cast: the weight and bias of every ``nn.Linear`` / ``nn.Conv{1,2,3}d`` (the base layers inside adapter layers
    included) none of whose own parameters requires grad. Left alone: modules with a trainable parameter, norms,
    embeddings, adapters, buffers, and the ``out_proj`` of an ``nn.MultiheadAttention`` (which reads its weight
    directly rather than calling the module). The weights take half the memory, and under bf16 autocast the frozen
    weights are no longer cast again on every forward (autocast caches only the casts of trainable leaves).

    Outside autocast (evaluation passes a method runs in its own hooks, a script) a cast module still accepts
    float32 inputs: a forward pre-hook casts the input to ``dtype`` and a forward hook casts the output back, so the
    module computes in ``dtype`` and what follows sees its usual dtype. Returns the names of the cast modules.
    """
    if dtype not in _LOW_PRECISION:
        raise ValueError(f"dtype must be torch.bfloat16 or torch.float16, got {dtype}")
    skip = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    names = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if (not isinstance(module, _CAST_KINDS) or id(module) in skip or not own or any(p.requires_grad for p in own)
                or getattr(module, "_visadapt_cast", None) is not None):
            continue
        for p in own:
            p.data = p.data.to(dtype)
        hooked = hasattr(module, "_visadapt_cast")  # cast before, then upcast: the hooks are still there
        module._visadapt_cast = dtype
        if not hooked:
            module.register_forward_pre_hook(_cast_input)
            module.register_forward_hook(_cast_output_back)
        names.append(name)
    return names


def upcast_trainable(model: nn.Module) -> list[str]:
    """Undo :func:`cast_frozen_base` on the modules that have since become trainable (a method that unfreezes layers
    mid-run): their parameters go back to float32, in place (same ``Parameter`` objects, so an optimiser holding
    them keeps working), and their hooks stop casting. Their values keep the bf16 rounding. Returns their names."""
    names = []
    for name, module in model.named_modules():
        if getattr(module, "_visadapt_cast", None) is None:
            continue
        own = list(module.parameters(recurse=False))
        if any(p.requires_grad for p in own):
            for p in own:
                p.data = p.data.float()
            module._visadapt_cast = None
            names.append(name)
    return names


def _cast_input(module: nn.Module, args: tuple) -> tuple | None:
    x = args[0] if args else None
    cast = module._visadapt_cast
    if cast is None or not torch.is_tensor(x) or x.dtype == cast or not x.is_floating_point():
        module._visadapt_out = None
        return None
    if torch.is_autocast_enabled(x.device.type):  # autocast casts the matmul's operands itself
        module._visadapt_out = None
        return None
    module._visadapt_out = x.dtype
    return (x.to(module._visadapt_cast), *args[1:])


def _cast_output_back(module: nn.Module, args: tuple, out: Tensor) -> Tensor | None:
    dtype, module._visadapt_out = module._visadapt_out, None
    return out.to(dtype) if dtype is not None and torch.is_tensor(out) else None
