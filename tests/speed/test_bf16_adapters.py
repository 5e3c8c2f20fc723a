"""fp32 where it matters on a bf16 base: merges round once and unmerge restores the base bit for bit; the frozen-bf16
base option (``cast_frozen_base``) keeps adapters, heads and norms in fp32 and computes what fp32 computes, to bf16
tolerance, with and without autocast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from visadapt.adapters import (
    LoRAConfig,
    adapter_layers,
    cast_frozen_base,
    inject,
    is_adapter_param,
    merge_adapters,
    unmerge_adapters,
)

TARGET = r"blocks\.\d+\.attn\.qkv[q,v]|blocks\.\d+\.attn\.proj|blocks\.\d+\.mlp\.fc1"


def _vit(seed: int = 0) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=5).eval()


def _adapted(seed: int = 0) -> nn.Module:
    model = _vit(seed)
    inject(model, LoRAConfig(TARGET, r=4, alpha=8.0), verbose=False)
    model.head.requires_grad_(True)
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # a trained-looking update: B is zero at injection
        for name, p in model.named_parameters():
            if is_adapter_param(name):
                p.normal_(std=0.05)
    return model


def test_bf16_merge_rounds_once_and_unmerge_is_exact():
    model = _adapted().to(torch.bfloat16)
    layers = dict(adapter_layers(model))
    before = {n: layer.base_weight.detach().clone() for n, layer in layers.items()}
    deltas = {n: layer._delta2d(layer.active).view_as(layer.base_weight) for n, layer in layers.items()}
    merge_adapters(model)
    for n, layer in layers.items():
        # W + delta summed in fp32 and rounded to bf16 once (adding a bf16-rounded delta to W would round twice)
        assert torch.equal(layer.base_weight, (before[n].float() + deltas[n]).to(torch.bfloat16)), n
    twice = [(before[n] + deltas[n].to(torch.bfloat16)) for n in layers]
    assert any(not torch.equal(t, layers[n].base_weight) for t, n in zip(twice, layers))  # the difference is real
    unmerge_adapters(model)
    for n, layer in layers.items():
        assert torch.equal(layer.base_weight, before[n]), n
    # a weight written while merged: unmerge falls back to the fp32 subtraction, one rounding away from the original
    merge_adapters(model)
    name, layer = next(iter(layers.items()))
    with torch.no_grad():
        layer.base_weight.add_(0)
    unmerge_adapters(model)
    assert not layer.merged
    err = (layer.base_weight.float() - before[name].float()).abs()
    bound = 2 ** -8 * (before[name].float() + deltas[name]).abs() + 2 ** -8 * before[name].float().abs()
    assert (err <= bound).all() and err.max() > 0  # within one rounding of each step, and not exact: why W is kept


def test_frozen_bf16_base_keeps_adapters_fp32_and_matches_fp32():
    ref, model = _adapted(), _adapted()
    x = torch.randn(3, 3, 32, 32)
    y = torch.tensor([0, 3, 1])
    cast = cast_frozen_base(model)
    assert "blocks.0.attn.qkv.base_layer" in cast and "blocks.1.mlp.fc2" in cast and "head" not in cast
    for name, p in model.named_parameters():
        if p.requires_grad or "norm" in name or name in ("cls_token", "pos_embed"):
            assert p.dtype == torch.float32, name
        elif name.endswith((".weight", ".bias")) and "norm" not in name:
            assert p.dtype == torch.bfloat16, name
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if is_adapter_param(n))

    def step(m: nn.Module, autocast: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        m.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = m(x)
        nn.functional.cross_entropy(out.float(), y).backward()
        return out.detach().float(), [p.grad for p in m.parameters() if p.requires_grad]

    want, want_grads = step(ref, autocast=False)
    for autocast in (False, True):
        out, grads = step(model, autocast)
        torch.testing.assert_close(out, want, rtol=0.05, atol=0.05)  # bf16 has 8 significant bits
        assert all(g.dtype == torch.float32 for g in grads)  # fp32 gradients land on the fp32 adapters and head
        cos = [nn.functional.cosine_similarity(g.flatten(), w.flatten(), dim=0) for g, w in zip(grads, want_grads)]
        assert min(cos) > 0.98, (autocast, min(cos))
    assert model(x).dtype == torch.float32  # outside autocast the cast modules hand fp32 on
    # merging the fp32 adapters into the bf16 base and back is exact here too
    weights = {n: layer.base_weight.clone() for n, layer in adapter_layers(model)}
    merge_adapters(model)
    unmerge_adapters(model)
    assert all(torch.equal(layer.base_weight, weights[n]) for n, layer in adapter_layers(model))


def test_cast_frozen_base_rejects_other_dtypes():
    with pytest.raises(ValueError, match="bfloat16 or torch.float16"):
        cast_frozen_base(_vit(), torch.float64)
