"""Attention normalisation: the fused qkv/proj replacement equals the module it replaces."""

import copy

import pytest
import torch
from torch import nn

from visadapt.backbones.attention import (
    FusedQKVAttention,
    matching_presets,
    normalize_attention,
    split_slice_suffix,
)

ATOL = 1e-6


def _causal(n: int) -> torch.Tensor:
    return torch.full((n, n), float("-inf")).triu(1)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask_kind", ["none", "causal_float", "causal_bool", "per_head_float", "key_padding"])
def test_multihead_attention_equal(batch_first: bool, mask_kind: str) -> None:
    torch.manual_seed(0)
    batch, length, dim, heads = 3, 7, 32, 4
    mha = nn.MultiheadAttention(dim, heads, batch_first=batch_first).eval()
    fused = FusedQKVAttention.from_multihead_attention(mha).eval()
    x = torch.randn(batch, length, dim) if batch_first else torch.randn(length, batch, dim)
    kwargs = {}
    if mask_kind == "causal_float":
        kwargs["attn_mask"] = _causal(length)
    elif mask_kind == "causal_bool":
        kwargs["attn_mask"] = torch.ones(length, length, dtype=torch.bool).triu(1)
    elif mask_kind == "per_head_float":  # open_clip's (B * heads, L, L) padding mask layout
        kwargs["attn_mask"] = _causal(length).repeat(batch * heads, 1, 1)
    elif mask_kind == "key_padding":
        pad = torch.zeros(batch, length, dtype=torch.bool)
        pad[:, 5:] = True
        kwargs["key_padding_mask"] = pad
    # open_clip's call: positional q, k, v and need_weights=False
    ref = mha(x, x, x, need_weights=False, **kwargs)[0]
    out, weights = fused(x, x, x, need_weights=False, **kwargs)
    assert weights is None
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    # nn.MultiheadAttention's default need_weights=True returns head-averaged weights
    ref_out, ref_w = mha(x, x, x, **kwargs)
    out, w = fused(x, x, x, **kwargs)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(w, ref_w, atol=ATOL, rtol=0)


def test_cross_attention_equal() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 2, batch_first=True).eval()
    fused = FusedQKVAttention.from_multihead_attention(mha).eval()
    q, kv = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
    torch.testing.assert_close(fused(q, kv, kv, need_weights=False)[0], mha(q, kv, kv, need_weights=False)[0],
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("options", [{}, {"qk_norm": True}, {"scale_heads": True, "inner_norm": True}])
def test_open_clip_attention_class_equal(options: dict) -> None:
    from open_clip.transformer import Attention

    torch.manual_seed(0)
    attn = Attention(32, 4, **options).eval()
    if attn.head_scale is not None:
        attn.head_scale.data.uniform_(0.5, 1.5)
    fused = FusedQKVAttention.from_open_clip_attention(attn).eval()
    x = torch.randn(3, 7, 32)
    for mask in (None, _causal(7)):
        torch.testing.assert_close(fused(x, attn_mask=mask), attn(x, attn_mask=mask), atol=ATOL, rtol=0)


def test_residual_block_equal_and_state_dict_compatible() -> None:
    from open_clip.transformer import ResidualAttentionBlock

    torch.manual_seed(0)
    block = ResidualAttentionBlock(32, 2).eval()
    original_state = copy.deepcopy(block.state_dict())
    new = copy.deepcopy(block)
    assert normalize_attention(new) == 1
    assert isinstance(new.attn, FusedQKVAttention)
    assert isinstance(new.attn.qkv, nn.Linear) and new.attn.qkv.out_features == 96
    x = torch.randn(2, 77, 32)
    torch.testing.assert_close(new(x, attn_mask=_causal(77)), block(x, attn_mask=_causal(77)), atol=ATOL, rtol=0)
    # checkpoints written with the fused parameter names still load
    other = copy.deepcopy(new)
    nn.init.zeros_(other.attn.qkv.weight)
    other.load_state_dict(original_state)
    torch.testing.assert_close(other.attn.qkv.weight, block.attn.in_proj_weight, atol=0, rtol=0)


def test_tiny_open_clip_model_equal() -> None:
    import open_clip

    from visadapt.backbones.open_clip import TINY_OPEN_CLIP_CFG, TINY_OPEN_CLIP_NAME, register_open_clip_config

    register_open_clip_config(TINY_OPEN_CLIP_NAME, TINY_OPEN_CLIP_CFG)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_OPEN_CLIP_NAME).eval()  # classic layout: text tower at the top level
    normalised = copy.deepcopy(model)
    assert normalize_attention(normalised) == 4  # 2 vision + 2 text blocks
    assert not any(isinstance(m, nn.MultiheadAttention) for m in normalised.modules())
    images = torch.randn(2, 3, 32, 32)
    tokens = open_clip.get_tokenizer(TINY_OPEN_CLIP_NAME)(["a photo of a cat", "a dog on the grass"])
    with torch.no_grad():
        torch.testing.assert_close(normalised.encode_image(images), model.encode_image(images), atol=ATOL, rtol=0)
        # the text tower runs with its causal mask
        torch.testing.assert_close(normalised.encode_text(tokens), model.encode_text(tokens), atol=ATOL, rtol=0)


def test_gradients_and_trainability_follow_the_original() -> None:
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    mha.in_proj_weight.requires_grad_(False)
    fused = FusedQKVAttention.from_multihead_attention(mha)
    assert not fused.qkv.weight.requires_grad and fused.proj.weight.requires_grad
    fused(torch.randn(2, 3, 16), need_weights=False)[0].sum().backward()
    assert fused.proj.weight.grad is not None


def test_unsupported_modules_are_skipped_or_raise() -> None:
    model = nn.Sequential(nn.MultiheadAttention(16, 2, kdim=8, vdim=8), nn.MultiheadAttention(16, 2))
    assert normalize_attention(copy.deepcopy(model)) == 1
    with pytest.raises(ValueError, match="kdim"):
        normalize_attention(model, strict=True)
    with pytest.raises(ValueError, match="contains attention modules"):
        normalize_attention(nn.MultiheadAttention(16, 2))


def test_slice_suffix_and_preset_matching() -> None:
    assert split_slice_suffix(r"blocks\.\d+\.attn\.qkv[q,v]") == (r"blocks\.\d+\.attn\.qkv", ("q", "v"))
    assert split_slice_suffix(r"a\.qkv[q, k, v]") == (r"a\.qkv", ("q", "k", "v"))
    assert split_slice_suffix(r"mlp\.fc[12]") == (r"mlp\.fc[12]", None)
    model = nn.Sequential(nn.Linear(2, 6))
    kept = matching_presets(model, {"hit": r"0[q,v]", "miss": r"1"})
    assert kept == {"hit": r"0[q,v]"}
