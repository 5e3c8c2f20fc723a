"""diffusers UNet builder: tiny UNet, presets, pipeline and UNet folders."""

import re

import pytest
import torch
from torch import nn

from visadapt.backbones import build_backbone
from visadapt.backbones.tiny import example_inputs, save_tiny_unet


def _names(model: nn.Module, rule: str) -> list[str]:
    return [n for n, _ in model.named_modules() if re.fullmatch(rule, n)]


def test_tiny_unet_forward_presets_and_round_trip(tmp_path) -> None:
    tiny = build_backbone("tiny_unet", seed=0)
    unet = tiny.model.eval()
    inputs = example_inputs("tiny_unet")
    with torch.no_grad():
        out = unet(**inputs).sample
    assert out.shape == inputs["sample"].shape
    for name, rule in tiny.target_presets.items():
        matched = _names(unet, rule)
        assert matched and all(isinstance(unet.get_submodule(n), nn.Linear) for n in matched), name
    # 4 transformer blocks (down 1, mid 1, up 2) x 2 attentions x 4 projections
    assert len(_names(unet, tiny.target_presets["attn"])) == 32
    assert all(".attn2." in n for n in _names(unet, tiny.target_presets["cross_attn_kv"]))

    pipeline = save_tiny_unet(tmp_path / "pipe", seed=0)
    for source, kwargs in ((pipeline, {}), (pipeline / "unet", {})):
        loaded = build_backbone("diffusers_unet", model_dir=str(source), **kwargs)
        with torch.no_grad():
            torch.testing.assert_close(loaded.model.eval()(**inputs).sample, out, atol=1e-6, rtol=0)


def test_missing_unet_names_the_layout(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "config.json"))):
        build_backbone("diffusers_unet", model_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        build_backbone("diffusers_unet", model_dir=str(tmp_path / "absent"))
