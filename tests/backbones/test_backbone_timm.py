"""timm builder: tiny ViT, presets, offline loading through timm's own filter, clear errors."""

import re

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from visadapt.adapters.targets import parse_target
from visadapt.backbones import ImageEncoder, build_backbone
from visadapt.backbones.tiny import save_tiny_timm


def _names(model: nn.Module, rule: str) -> list[str]:
    """Module names matched by any alternative of ``rule`` (read as the adapter library reads it)."""
    rules = parse_target(rule)
    return [n for n, _ in model.named_modules() if any(r.pattern.fullmatch(n) for r in rules)]


def _images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tiny():
    return build_backbone("tiny_vit", seed=0)


def test_tiny_forward_shapes(tiny) -> None:
    model = tiny.model.eval()
    assert isinstance(model, ImageEncoder) and model.feature_dim == 32
    assert model(_images()).shape == (2, 32)
    assert model.forward_features(_images()).shape == (2, 17, 32)  # class token + 4x4 patches
    assert tiny.identity == "timm:vit_tiny_patch16_224:random"
    assert tiny.preprocess.image_size == 32 and tiny.preprocess.mean == (0.5, 0.5, 0.5)


def test_presets_match(tiny) -> None:
    model = tiny.model
    assert set(tiny.target_presets) == {"attn_qkv", "attn_qv", "attn_qkv_fused", "attn_proj", "attn_qkv_proj", "mlp", "all_linear"}
    for name, rule in tiny.target_presets.items():
        matched = _names(model, rule)
        assert matched and all(isinstance(model.get_submodule(n), nn.Linear) for n in matched), name
    assert tiny.target_presets["attn_qv"].endswith("[q,v]") and tiny.target_presets["attn_qkv"].endswith("[q,k,v]")
    for name in _names(model, tiny.target_presets["attn_qv"]):
        assert name.endswith("attn.qkv") and model.get_submodule(name).out_features == 96
    assert len(_names(model, tiny.target_presets["all_linear"])) == 8


def test_file_round_trip_through_timm_filter(tmp_path, tiny) -> None:
    path = tmp_path / "tiny_vit.safetensors"
    save_file(tiny.model.trunk.state_dict(), str(path))
    loaded = build_backbone("tiny_vit", pretrained=str(path))
    assert loaded.identity == "timm:vit_tiny_patch16_224:tiny_vit.safetensors"
    with torch.no_grad():
        reference = tiny.model.eval()(_images())
        torch.testing.assert_close(loaded.model.eval()(_images()), reference, atol=1e-6, rtol=0)
        # a classifier of another size is added fresh; the pooled features stay the loaded ones
        with_head = build_backbone("tiny_vit", pretrained=str(path), num_classes=5).model.eval()
        assert with_head.logits(_images()).shape == (2, 5)
        torch.testing.assert_close(with_head(_images()), reference, atol=1e-6, rtol=0)


def test_local_dir_round_trip(tmp_path, tiny) -> None:
    folder = save_tiny_timm(tmp_path / "vit_folder", seed=0)
    loaded = build_backbone("timm", model_name="vit_tiny_patch16_224", pretrained=f"local-dir:{folder}")
    assert loaded.identity == "timm:vit_tiny_patch16_224:local-dir:vit_folder"
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(_images()), tiny.model.eval()(_images()), atol=1e-6, rtol=0)


def test_efficientnet_conv_1x1_preset() -> None:
    backbone = build_backbone("timm", model_name="tf_efficientnet_lite0")
    assert set(backbone.target_presets) == {"conv_1x1"}
    matched = _names(backbone.model, backbone.target_presets["conv_1x1"])
    assert len(matched) == 32 and "trunk.conv_head" in matched
    for name in matched:
        conv = backbone.model.get_submodule(name)
        assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.groups == 1
    assert backbone.model.feature_dim == 1280


def test_missing_and_remote_sources(tmp_path) -> None:
    missing = tmp_path / "nope" / "weights.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        build_backbone("tiny_vit", pretrained=str(missing))
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        build_backbone("timm", model_name="vit_tiny_patch16_224", pretrained=f"local-dir:{tmp_path}")
    with pytest.raises(ValueError, match="never downloads"):
        build_backbone("timm", model_name="vit_tiny_patch16_224", pretrained="augreg_in21k")
