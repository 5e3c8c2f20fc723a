"""open_clip builder: tiny model, presets, offline loading from files and folders, the QuickGELU pairing."""

import re

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from visadapt.adapters.targets import parse_target
from visadapt.backbones import DualEncoder, build_backbone
from visadapt.backbones.open_clip import TINY_OPEN_CLIP_CFG, TINY_OPEN_CLIP_NAME, register_open_clip_config
from visadapt.backbones.tiny import save_tiny_open_clip

TEXTS = ["a photo of a cat.", "a blurry photo of a dog"]


def _raw_model(custom_text: bool = True) -> nn.Module:
    """The tiny architecture as open_clip builds it (fused attention, open_clip's own parameter names)."""
    import open_clip

    register_open_clip_config(TINY_OPEN_CLIP_NAME, TINY_OPEN_CLIP_CFG)
    return open_clip.create_model(TINY_OPEN_CLIP_NAME, force_custom_text=custom_text).eval()


def _outputs(encoder: DualEncoder) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return encoder.encode_image(images), encoder.encode_text(encoder.tokenize(TEXTS))


def _names(model: nn.Module, rule: str) -> list[str]:
    """Module names matched by any alternative of ``rule`` (read as the adapter library reads it)."""
    rules = parse_target(rule)
    return [n for n, _ in model.named_modules() if any(r.pattern.fullmatch(n) for r in rules)]


@pytest.fixture(scope="module")
def tiny():
    return build_backbone("tiny_open_clip", seed=0)


def test_tiny_forward_shapes(tiny) -> None:
    model = tiny.model.eval()
    assert isinstance(model, DualEncoder)
    tokens = model.tokenize(TEXTS)
    assert tokens.dtype == torch.long and tokens.shape == (2, 77)
    assert tokens[0, 0].item() == 49406  # <start_of_text> of the real CLIP BPE vocabulary
    image_features, text_features = _outputs(model)
    assert image_features.shape == (2, 32) and text_features.shape == (2, 32)
    assert isinstance(model.logit_scale, float) and model.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)
    assert tiny.family == "open_clip" and tiny.identity == f"open_clip:{TINY_OPEN_CLIP_NAME}:random"
    assert tiny.preprocess.image_size == 32 and len(tiny.preprocess.mean) == 3
    assert tiny.extra["attention_normalized"] == 4
    assert all(p.requires_grad for p in model.parameters())  # the builder freezes nothing


def test_presets_match(tiny) -> None:
    model = tiny.model
    expected = {"attn_qkv", "attn_qv", "attn_qkv_fused", "attn_proj", "attn_qkv_proj", "mlp", "all_linear"}
    assert expected | {f"vision_{k}" for k in expected} | {f"text_{k}" for k in expected} == set(tiny.target_presets)
    for name, rule in tiny.target_presets.items():
        matched = _names(model, rule)
        assert matched, name
        assert all(isinstance(model.get_submodule(n), nn.Linear) for n in matched), name
        if name.startswith("vision_"):
            assert all(n.startswith("visual.") for n in matched)
        if name.startswith("text_"):
            assert all(n.startswith("text.") for n in matched)
    assert tiny.target_presets["attn_qv"].endswith("[q,v]") and tiny.target_presets["attn_qkv"].endswith("[q,k,v]")
    qkv = _names(model, tiny.target_presets["attn_qv"])
    assert len(qkv) == 4
    for name in qkv:
        layer = model.get_submodule(name)
        assert layer.out_features == 3 * layer.in_features
    assert len(_names(model, tiny.target_presets["all_linear"])) == 16


def test_safetensors_file_round_trip(tmp_path) -> None:
    torch.manual_seed(3)
    raw = _raw_model()
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in raw.state_dict().items()}, str(path))
    loaded = build_backbone("open_clip", model_name=TINY_OPEN_CLIP_NAME, pretrained=str(path))
    assert loaded.identity == f"open_clip:{TINY_OPEN_CLIP_NAME}:tiny.safetensors"
    assert not loaded.extra["quick_gelu"]
    image_features, text_features = _outputs(loaded.model.eval())
    tokens = loaded.model.tokenize(TEXTS)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(image_features, raw.encode_image(images), atol=1e-6, rtol=0)
        torch.testing.assert_close(text_features, raw.encode_text(tokens), atol=1e-6, rtol=0)


def test_classic_layout_pt_file_round_trip(tmp_path) -> None:
    """A pickled state dict in open_clip's classic (non-custom-text) layout, read with weights_only=True."""
    torch.manual_seed(4)
    raw = _raw_model(custom_text=False)
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": raw.state_dict()}, path)
    loaded = build_backbone("tiny_open_clip", pretrained=str(path))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    image_features, text_features = _outputs(loaded.model.eval())
    with torch.no_grad():
        torch.testing.assert_close(image_features, raw.encode_image(images), atol=1e-6, rtol=0)
        torch.testing.assert_close(text_features, raw.encode_text(loaded.model.tokenize(TEXTS)), atol=1e-6, rtol=0)


def test_local_dir_round_trip(tmp_path, tiny) -> None:
    folder = save_tiny_open_clip(tmp_path / "tiny_clip", seed=0)
    loaded = build_backbone("open_clip", model_name=f"local-dir:{folder}")
    assert loaded.identity == "open_clip:local-dir:tiny_clip"
    for a, b in zip(_outputs(loaded.model.eval()), _outputs(tiny.model.eval()), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # a folder passed as `pretrained` means the same thing
    again = build_backbone("open_clip", model_name="ignored", pretrained=str(folder))
    assert again.identity == loaded.identity


def _activation(encoder: DualEncoder) -> type:
    return type(encoder.visual.transformer.resblocks[0].mlp.gelu)


def test_openai_file_is_paired_with_quick_gelu(tmp_path, caplog) -> None:
    from open_clip.transformer import QuickGELU

    path = tmp_path / "tiny-openai.safetensors"
    save_file({k: v.contiguous() for k, v in _raw_model().state_dict().items()}, str(path))
    with caplog.at_level("WARNING", logger="visadapt.backbones.open_clip"):
        paired = build_backbone("tiny_open_clip", pretrained=str(path))
    assert "QuickGELU" in caplog.text
    assert _activation(paired.model) is QuickGELU
    assert isinstance(paired.model.text.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert paired.extra["quick_gelu"] and paired.identity.endswith("-quickgelu:tiny-openai.safetensors")
    assert _activation(build_backbone("tiny_open_clip", pretrained=str(path), quick_gelu=False).model) is nn.GELU
    plain = tmp_path / "tiny-laion.safetensors"
    plain.write_bytes(path.read_bytes())
    assert _activation(build_backbone("tiny_open_clip", pretrained=str(plain)).model) is nn.GELU
    assert _activation(build_backbone("tiny_open_clip", pretrained=str(plain), quick_gelu=True).model) is QuickGELU


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_archive_is_converted(tmp_path) -> None:
    """The original OpenAI release files are TorchScript archives, which weights_only=True refuses."""
    from open_clip.transformer import QuickGELU

    torch.manual_seed(5)
    raw = _raw_model(custom_text=False)
    path = tmp_path / "tiny-openai.pt"
    torch.jit.save(torch.jit.script(raw), str(path))
    with pytest.raises(ValueError, match=r"TorchScript archive, which is code.*allow_torchscript"):
        build_backbone("tiny_open_clip", pretrained=str(path), quick_gelu=False)  # code: refused without opt-in
    loaded = build_backbone("tiny_open_clip", pretrained=str(path), quick_gelu=False, allow_torchscript=True)
    image_features, _ = _outputs(loaded.model.eval())
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(image_features, raw.encode_image(images), atol=1e-6, rtol=0)
    assert _activation(build_backbone("tiny_open_clip", pretrained=str(path), allow_torchscript=True).model) is QuickGELU


def test_missing_sources_name_the_path(tmp_path) -> None:
    missing = tmp_path / "nowhere" / "weights.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        build_backbone("open_clip", model_name="ViT-B-16", pretrained=str(missing))
    with pytest.raises(FileNotFoundError, match=r"open_clip_config\.json"):
        build_backbone("open_clip", model_name=f"local-dir:{tmp_path}")
    with pytest.raises(ValueError, match=r"known tags: .*openai"):
        build_backbone("open_clip", model_name="ViT-B-16", pretrained="not_a_tag")
    with pytest.raises(ValueError, match="local-dir"):
        build_backbone("open_clip", model_name="hf-hub:org/model")


def test_hub_tag_offline_says_so() -> None:
    import os

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):
        build_backbone("open_clip", model_name="RN50", pretrained="openai")


def test_without_normalisation_keeps_fused_attention() -> None:
    backbone = build_backbone("tiny_open_clip", normalize_attention=False)
    assert isinstance(backbone.model.visual.transformer.resblocks[0].attn, nn.MultiheadAttention)
    assert backbone.target_presets == {}
