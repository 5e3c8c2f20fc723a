"""Attention normalisation: fused ``in_proj_weight`` parameters become a ``qkv`` Linear and a ``proj`` Linear.

open_clip keeps the query, key and value projections of every transformer block in one fused *parameter*,
``in_proj_weight`` (``nn.MultiheadAttention`` in open_clip <= 3.3.0, open_clip's own ``Attention`` on its main
branch). Adapter layers wrap ``nn.Linear`` modules, so they cannot reach that parameter. :func:`normalize_attention`
swaps each such module for :class:`FusedQKVAttention`, which holds the same numbers in two Linears laid out as in
timm (``attn.qkv`` with ``3 * dim`` outputs, ``attn.proj``). Outputs match the original module to float rounding
(tested within 1e-6 in fp32), so every adapter applies the same way to open_clip, timm and the other families.

The replacement mimics the calling convention of the module it replaces:

* ``nn.MultiheadAttention``: ``attn(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None)``
  returning ``(output, weights_or_None)``, sequence-first unless ``batch_first``; boolean masks mark the
  positions that are *not* attended.
* open_clip ``Attention``: ``attn(x, attn_mask=None)`` (3.3.0) or ``attn(x, k_x=None, v_x=None, attn_mask=None)``
  (main), batch-first, returning the output tensor.

State dicts written before normalisation still load: a load hook renames ``in_proj_weight``/``in_proj_bias``/
``out_proj.*`` to ``qkv.*``/``proj.*``.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FusedQKVAttention", "matching_presets", "normalize_attention", "split_slice_suffix"]

log = logging.getLogger(__name__)

_RENAMES = {
    "in_proj_weight": "qkv.weight",
    "in_proj_bias": "qkv.bias",
    "out_proj.weight": "proj.weight",
    "out_proj.bias": "proj.bias",
}


class FusedQKVAttention(nn.Module):
    """Multi-head attention with a fused ``qkv`` Linear and an output ``proj`` Linear.

    Built by :meth:`from_multihead_attention` or :meth:`from_open_clip_attention`, which copy the weights of the
    module being replaced. Attention itself runs through ``F.scaled_dot_product_attention``.

    Args:
        dim: Model width (query, key and value all have this width).
        num_heads: Number of attention heads.
        bias: Whether ``qkv`` and ``proj`` have biases. open_clip always uses them.
        batch_first: Inputs are ``(batch, seq, dim)`` if True, ``(seq, batch, dim)`` otherwise.
        dropout: Dropout on the attention probabilities during training.
        interface: ``"mha"`` to behave like ``nn.MultiheadAttention`` (returns ``(out, weights)``, boolean masks
            mark blocked positions); ``"open_clip"`` to behave like open_clip's ``Attention`` (returns ``out``).
        bool_mask_keeps: For the ``open_clip`` interface, whether True in a boolean mask means "attend"
            (open_clip main) or "block" (open_clip 3.3.0).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            bias: bool = True,
            batch_first: bool = True,
            dropout: float = 0.0,
            interface: str = "mha",
            bool_mask_keeps: bool = False,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if interface not in ("mha", "open_clip"):
            raise ValueError(f"interface must be 'mha' or 'open_clip', got {interface!r}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.batch_first = batch_first
        self.dropout = dropout
        self.interface = interface
        self.bool_mask_keeps = bool_mask_keeps
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        # Optional parts of open_clip's Attention; None unless the source module used them.
        self.ln_q: nn.Module | None = None
        self.ln_k: nn.Module | None = None
        self.ln_inner: nn.Module | None = None
        self.out_drop: nn.Module | None = None
        self.head_scale: nn.Parameter | None = None
        self.logit_scale: nn.Parameter | None = None  # scaled cosine attention (Swin V2)
        self.logit_scale_max = math.log(1.0 / 0.01)
        self._register_load_state_dict_pre_hook(_rename_fused_keys)

    # ----------------------------------------------------------------------------------------------- builders
    @classmethod
    def from_multihead_attention(cls, mha: nn.MultiheadAttention) -> FusedQKVAttention:
        """An equivalent module holding a copy of ``mha``'s weights.

        Raises:
            ValueError: For configurations without a fused same-width projection (``kdim``/``vdim`` different from
                ``embed_dim``, ``add_bias_kv``, ``add_zero_attn``).
        """
        if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
            raise ValueError("nn.MultiheadAttention with kdim/vdim != embed_dim has no fused in_proj_weight")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("nn.MultiheadAttention with add_bias_kv or add_zero_attn is not supported")
        new = cls(
            mha.embed_dim, mha.num_heads, bias=mha.in_proj_bias is not None, batch_first=mha.batch_first,
            dropout=mha.dropout, interface="mha",
        )
        _copy_linear(new, mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias)
        return new

    @classmethod
    def from_open_clip_attention(cls, attn: nn.Module) -> FusedQKVAttention:
        """An equivalent module for open_clip's own ``Attention`` class (3.3.0 custom blocks, and main).

        Raises:
            ValueError: When the module has separate q/k/v weights (different key/value widths).
        """
        if getattr(attn, "in_proj_weight", None) is None:
            raise ValueError("open_clip Attention without a fused in_proj_weight (kdim/vdim != dim) is not supported")
        dim = attn.in_proj_weight.shape[1]
        # open_clip main passes boolean masks straight to SDPA (True = attend); 3.3.0 turns True into -inf.
        keeps = hasattr(attn, "use_sdpa")
        new = cls(
            dim, attn.num_heads, bias=attn.in_proj_bias is not None, batch_first=True,
            dropout=attn.attn_drop.p, interface="open_clip", bool_mask_keeps=keeps,
        )
        new.scale = attn.scale
        _copy_linear(new, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias)
        for part in ("ln_q", "ln_k", "ln_inner", "out_drop"):
            module = getattr(attn, part, None)
            if module is None or isinstance(module, nn.Identity) or (isinstance(module, nn.Dropout) and module.p == 0):
                continue
            setattr(new, part, module)
        new.head_scale = attn.head_scale
        new.logit_scale = attn.logit_scale
        new.logit_scale_max = attn.logit_scale_max
        return new

    # ------------------------------------------------------------------------------------------------ forward
    def forward(
            self,
            query: torch.Tensor,
            key: torch.Tensor | None = None,
            value: torch.Tensor | None = None,
            key_padding_mask: torch.Tensor | None = None,
            need_weights: bool | None = None,
            attn_mask: torch.Tensor | None = None,
            average_attn_weights: bool = True,
            is_causal: bool = False,
            *,
            k_x: torch.Tensor | None = None,
            v_x: torch.Tensor | None = None,
    ) -> Any:
        """Attend from ``query`` to ``key``/``value`` (both default to ``query``: self-attention).

        Keyword aliases ``k_x``/``v_x`` follow open_clip's ``Attention``. With ``need_weights`` (the
        ``nn.MultiheadAttention`` default) the attention probabilities are computed explicitly and returned as the
        second element; open_clip always passes ``need_weights=False`` and gets the fused SDPA path.
        """
        key = k_x if key is None else key
        value = v_x if value is None else value
        if need_weights is None:
            need_weights = self.interface == "mha"
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) if t is not None else None for t in (query, key, value))
        batch, q_len, _ = query.shape
        q, k, v = self._project(query, key, value)  # (B, H, L, D) each
        s_len = k.shape[2]
        mask = self._merge_masks(attn_mask, key_padding_mask, batch, q_len, s_len, q.dtype)

        if self.logit_scale is not None:
            # Scaled cosine attention (open_clip scaled_cosine_attn): logits are cosine similarities times a
            # learned, clamped per-head scale.
            logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
            logits = logits * torch.clamp(self.logit_scale, max=self.logit_scale_max).exp()
            weights, out = self._explicit_attention(logits, v, mask, is_causal)
        else:
            if self.ln_q is not None:
                q = self.ln_q(q)
            if self.ln_k is not None:
                k = self.ln_k(k)
            if need_weights:
                logits = (q * self.scale) @ k.transpose(-1, -2)
                weights, out = self._explicit_attention(logits, v, mask, is_causal)
            else:
                weights = None
                out = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                    is_causal=is_causal and mask is None, scale=self.scale,
                )
        if self.head_scale is not None:
            out = out * self.head_scale
        out = out.transpose(1, 2).reshape(batch, q_len, self.dim)
        if self.ln_inner is not None:
            out = self.ln_inner(out)
        out = self.proj(out)
        if self.out_drop is not None:
            out = self.out_drop(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if self.interface == "open_clip":
            return out
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        return out, weights

    def _project(
            self, query: torch.Tensor, key: torch.Tensor | None, value: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d = self.dim
        if (key is None or key is query) and (value is None or value is query):
            q, k, v = self.qkv(query).split(d, dim=-1)
        else:
            # Cross-attention: call the (possibly adapted) qkv Linear on each input and keep its own slice, so an
            # adapter on qkv acts on q, k and v exactly as in self-attention.
            key = query if key is None else key
            value = key if value is None else value
            q = self.qkv(query)[..., :d]
            k = self.qkv(key)[..., d:2 * d]
            v = self.qkv(value)[..., 2 * d:]
        return tuple(t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2) for t in (q, k, v))

    def _merge_masks(
            self,
            attn_mask: torch.Tensor | None,
            key_padding_mask: torch.Tensor | None,
            batch: int,
            q_len: int,
            s_len: int,
            dtype: torch.dtype,
    ) -> torch.Tensor | None:
        """One additive float mask broadcastable to ``(B, H, L, S)``, or None."""
        mask = None
        if attn_mask is not None:
            mask = self._additive(attn_mask, dtype, blocks=not (self.interface == "open_clip" and self.bool_mask_keeps))
            if mask.dim() == 3:  # (B * H, L, S), the nn.MultiheadAttention / open_clip per-head layout
                mask = mask.reshape(batch, self.num_heads, q_len, s_len)
        if key_padding_mask is not None:
            pad = self._additive(key_padding_mask, dtype, blocks=True).reshape(batch, 1, 1, s_len)
            mask = pad if mask is None else mask + pad
        return mask

    @staticmethod
    def _additive(mask: torch.Tensor, dtype: torch.dtype, blocks: bool) -> torch.Tensor:
        if mask.dtype != torch.bool:
            return mask.to(dtype)
        blocked = mask if blocks else ~mask
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(blocked, float("-inf"))

    def _explicit_attention(
            self, logits: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if mask is not None:
            logits = logits + mask
        elif is_causal:
            q_len, s_len = logits.shape[-2:]
            causal = torch.ones(q_len, s_len, dtype=torch.bool, device=logits.device).triu(1)
            logits = logits.masked_fill(causal, float("-inf"))
        weights = logits.softmax(dim=-1)
        dropped = F.dropout(weights, p=self.dropout) if self.training and self.dropout > 0 else weights
        return weights, dropped @ v

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, batch_first={self.batch_first}, interface={self.interface!r}"
        )


def _copy_linear(
        new: FusedQKVAttention,
        in_w: torch.Tensor,
        in_b: torch.Tensor | None,
        out_w: torch.Tensor,
        out_b: torch.Tensor | None,
) -> None:
    """Copy weights (keeping device, dtype and ``requires_grad``) into ``new.qkv`` and ``new.proj``."""
    new.to(device=in_w.device, dtype=in_w.dtype)
    with torch.no_grad():
        new.qkv.weight.copy_(in_w)
        new.proj.weight.copy_(out_w)
        if in_b is not None:
            new.qkv.bias.copy_(in_b)
        if out_b is not None:
            new.proj.bias.copy_(out_b)
    for p_new, p_old in ((new.qkv.weight, in_w), (new.qkv.bias, in_b), (new.proj.weight, out_w),
                         (new.proj.bias, out_b)):
        if p_new is not None and p_old is not None:
            p_new.requires_grad_(p_old.requires_grad)


def _rename_fused_keys(state_dict: dict, prefix: str, *args: Any) -> None:
    """Load hook: accept the original ``in_proj_weight``/``out_proj`` names."""
    for old, new in _RENAMES.items():
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


def _open_clip_attention_class() -> type | None:
    try:
        from open_clip.transformer import Attention
    except ImportError:  # open_clip not installed, or the class moved
        return None
    return Attention


def normalize_attention(model: nn.Module, strict: bool = False, verbose: bool = False) -> int:
    """Replace fused-projection attention modules in ``model`` with :class:`FusedQKVAttention`, in place.

    Handles ``nn.MultiheadAttention`` (open_clip <= 3.3.0 residual blocks) and open_clip's own ``Attention``
    (open_clip main, and 3.3.0 custom blocks). Modules that have no fused same-width projection (for example an
    attentional pooler whose keys come from a wider context) are left alone, or raise when ``strict``.

    Args:
        model: The model to change in place.
        strict: Raise instead of skipping attention modules that cannot be converted.
        verbose: Log (INFO, logger ``visadapt.backbones.attention``) how many modules were replaced and which
            were skipped.

    Returns:
        The number of modules replaced.

    Raises:
        ValueError: With ``strict``, when an attention module cannot be converted.
    """
    oc_attention = _open_clip_attention_class()
    replaced = 0
    skipped: list[str] = []
    # Materialise the list first: we mutate the module tree while walking it.
    for name, module in list(model.named_modules()):
        if isinstance(module, FusedQKVAttention):
            continue
        try:
            if isinstance(module, nn.MultiheadAttention):
                new = FusedQKVAttention.from_multihead_attention(module)
            elif oc_attention is not None and isinstance(module, oc_attention):
                new = FusedQKVAttention.from_open_clip_attention(module)
            else:
                continue
        except ValueError as err:
            if strict:
                raise ValueError(f"cannot normalise attention module {name!r}: {err}") from err
            skipped.append(f"{name} ({err})")
            continue
        if not name:
            raise ValueError("normalize_attention changes a model that contains attention modules, not one itself")
        new.train(module.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        replaced += 1
    if verbose:
        log.info("normalize_attention: replaced %d attention module(s) with fused qkv/proj Linears", replaced)
        for s in skipped:
            log.info("normalize_attention: skipped %s", s)
    return replaced


_SLICE_SUFFIX = re.compile(r"\[\s*([qkv](?:\s*,\s*[qkv])*)\s*\]$")


def split_slice_suffix(target: str) -> tuple[str, tuple[str, ...] | None]:
    """Split a target rule into its regular expression and its fused-qkv slice selection.

    ``"blocks\\.\\d+\\.attn\\.qkv[q,v]"`` gives ``("blocks\\.\\d+\\.attn\\.qkv", ("q", "v"))``; a rule
    without a trailing ``[q,v]``-style suffix comes back unchanged with ``None``.
    """
    match = _SLICE_SUFFIX.search(target)
    if match is None:
        return target, None
    return target[: match.start()], tuple(part.strip() for part in match.group(1).split(","))


def matching_presets(model: nn.Module, presets: dict[str, str]) -> dict[str, str]:
    """The presets of which every top-level alternative (its slice suffix removed, as the adapter library reads
    it) fully matches at least one module name."""
    from visadapt.adapters.targets import parse_target

    names = [name for name, _ in model.named_modules()]
    kept = {}
    for key, rule in presets.items():
        if all(any(alt.pattern.fullmatch(n) for n in names) for alt in parse_target(rule)):
            kept[key] = rule
    return kept
