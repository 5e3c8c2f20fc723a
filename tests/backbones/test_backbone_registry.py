"""Every backbone is registered and documented; every tiny backbone runs and its presets match."""

import inspect
import re

import pytest
import torch

from visadapt.backbones import BACKBONES, DualEncoder, ImageEncoder, build_backbone
from visadapt.backbones.attention import split_slice_suffix
from visadapt.backbones.tiny import TINY_BACKBONES, example_inputs

BUILDERS = ["open_clip", "timm", "hf_text", "hf_clip", "hf_vit", "diffusers_unet", *TINY_BACKBONES]


@pytest.mark.parametrize("name", BUILDERS)
def test_registered_with_documented_arguments(name: str) -> None:
    assert name in BACKBONES
    builder = BACKBONES.get(name)
    doc = inspect.getdoc(builder) or ""
    assert BACKBONES.describe()[name], name
    for param in inspect.signature(builder).parameters.values():
        assert param.annotation is not inspect.Parameter.empty, (name, param.name)
        label = f"**{param.name}" if param.kind is param.VAR_KEYWORD else param.name
        assert re.search(rf"^\s+{re.escape(label)}:", doc, re.M), f"{name}: argument {param.name} not documented"


@pytest.mark.parametrize("name", list(TINY_BACKBONES))
def test_tiny_backbones_run_and_presets_match(name: str) -> None:
    backbone = build_backbone(name, seed=0)
    model = backbone.model.eval()
    inputs = example_inputs(name)
    with torch.no_grad():
        if isinstance(model, DualEncoder):
            assert model.encode_image(inputs["images"]).shape[0] == 2
            assert model.encode_text(model.tokenize(inputs["texts"])).shape[0] == 2
        elif isinstance(model, ImageEncoder):
            assert model(inputs["images"]).shape == (2, model.feature_dim)
        elif TINY_BACKBONES[name] == "text_encoder":
            assert model(model.tokenize(inputs["texts"])).shape == (2, model.feature_dim)
        else:
            assert model(**inputs).sample.shape == inputs["sample"].shape
    assert backbone.target_presets and backbone.identity.startswith(backbone.family + ":")
    names = [n for n, _ in model.named_modules()]
    for preset, rule in backbone.target_presets.items():
        assert backbone.resolve_target(preset) == rule
        pattern = re.compile(split_slice_suffix(rule)[0])
        assert any(pattern.fullmatch(n) for n in names), (name, preset)


def test_tiny_seed_reproducible() -> None:
    a = build_backbone("tiny_vit", seed=3).model.trunk.blocks[0].attn.qkv.weight
    b = build_backbone("tiny_vit", seed=3).model.trunk.blocks[0].attn.qkv.weight
    assert torch.equal(a, b)
