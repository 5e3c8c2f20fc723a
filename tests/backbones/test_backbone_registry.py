"""Every backbone is registered and documented; every tiny backbone runs; presets mean the same everywhere."""

import copy
import inspect
import re

import pytest
import torch

from visadapt.adapters import LoRAConfig, adapter_layers, inject
from visadapt.backbones import BACKBONES, DualEncoder, ImageEncoder, build_backbone
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
def test_tiny_backbones_run(name: str) -> None:
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


def _adapted(backbone, preset: str) -> dict[tuple[str, str | None], tuple[int, int]]:
    """Inject a rank-1 LoRA through ``preset`` into a copy; (module, slice) -> (out, in) of each adapted matrix."""
    model = copy.deepcopy(backbone.model)
    inject(model, LoRAConfig(target=backbone.resolve_target(preset), r=1), verbose=False)
    found = {}
    for module_name, layer in adapter_layers(model):
        slices = layer.slices["default"]
        for core, _ in layer.parts("default"):
            key = next((s for s, c in layer.adapters["default"].items() if c is core), None) if slices else None
            found[(module_name, key)] = (core.out_features, core.in_features)
    return found


FUSED = {"tiny_open_clip", "tiny_vit"}


@pytest.mark.parametrize("name", list(TINY_BACKBONES))
def test_presets_resolve_to_modules_and_mean_the_same_on_every_family(name: str) -> None:
    """Every preset adapts at least one matrix, and the shared names mean one adaptation on every family:
    ``attn_qkv`` is three independent square q, k, v adapters per attention (fused-qkv slices or separate Linears),
    ``attn_qv`` its q and v, ``attn_qkv_fused`` (fused families only) one adapter on the 3d-row matrix."""
    backbone = build_backbone(name, seed=0)
    per_preset = {preset: _adapted(backbone, preset) for preset in backbone.target_presets}
    assert all(per_preset.values()), [p for p, found in per_preset.items() if not found]
    proj = per_preset["attn_proj"]
    n_attn, widths = len(proj), {i for _, i in proj.values()}
    qkv, qv = per_preset["attn_qkv"], per_preset["attn_qv"]
    assert len(qkv) == 3 * n_attn and len(qv) == 2 * n_attn, (len(qkv), len(qv), n_attn)
    assert set(qv) < set(qkv)
    assert all(out in widths for out, _ in qkv.values()), "an attn_qkv adapter spans more than one projection"
    if name != "tiny_unet":  # self-attention: q, k and v are d x d
        assert all(out == inp for out, inp in qkv.values())
    assert set(per_preset["attn_qkv_proj"]) == set(qkv) | set(proj)
    assert set(per_preset["all_linear"]) == set(qkv) | set(proj) | set(per_preset["mlp"])
    blocks = n_attn // 2 if name == "tiny_unet" else n_attn  # the UNet's blocks have self- and cross-attention
    assert len(per_preset["mlp"]) == 2 * blocks
    if name in FUSED:
        fused = per_preset["attn_qkv_fused"]
        assert len(fused) == n_attn and all(key[1] is None and out == 3 * inp for key, (out, inp) in fused.items())
        assert {key[1] for key in qkv} == {"q", "k", "v"} and {key[1] for key in qv} == {"q", "v"}
    else:
        assert "attn_qkv_fused" not in backbone.target_presets
        assert all(key[1] is None for key in qkv)


def test_tiny_seed_reproducible() -> None:
    a = build_backbone("tiny_vit", seed=3).model.trunk.blocks[0].attn.qkv.weight
    b = build_backbone("tiny_vit", seed=3).model.trunk.blocks[0].attn.qkv.weight
    assert torch.equal(a, b)
