"""transformers builders: text encoder, CLIP dual encoder, ViT; local folders; the bundled CLIP tokenizer."""

import re

import pytest
import torch
from torch import nn

from visadapt.backbones import DualEncoder, ImageEncoder, build_backbone
from visadapt.backbones.hf import clip_tokenizer
from visadapt.backbones.tiny import save_tiny_hf

TEXTS = ["a photo of a cat.", "a blurry photo of a dog"]


def _names(model: nn.Module, rule: str) -> list[str]:
    return [n for n, _ in model.named_modules() if re.fullmatch(rule, n)]


def _images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _check_presets(backbone, expected_qkv: int) -> None:
    model = backbone.model
    for name, rule in backbone.target_presets.items():
        matched = _names(model, rule)
        assert matched and all(isinstance(model.get_submodule(n), nn.Linear) for n in matched), name
    assert len(_names(model, backbone.target_presets["attn_qkv"])) == expected_qkv
    assert len(_names(model, backbone.target_presets["attn_qv"])) == expected_qkv * 2 // 3


def test_tiny_bert_text_and_folder_round_trip(tmp_path) -> None:
    tiny = build_backbone("tiny_bert_text", seed=0)
    encoder = tiny.model.eval()
    tokens = encoder.tokenize(TEXTS)
    assert set(tokens) >= {"input_ids", "attention_mask"} and tokens["input_ids"].dtype == torch.long
    with torch.no_grad():
        features = encoder(tokens)
    assert features.shape == (2, 32) and encoder.feature_dim == 32
    _check_presets(tiny, expected_qkv=6)
    assert {"attn_proj", "attn_qkv_proj", "mlp", "all_linear"} <= set(tiny.target_presets)

    folder = save_tiny_hf("bert", tmp_path / "bert", seed=0)
    loaded = build_backbone("hf_text", model_dir=str(folder))
    assert loaded.identity == "hf:bert:bert"
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(loaded.model.tokenize(TEXTS)), features, atol=1e-6, rtol=0)
        # mean pooling ignores padding; cls pooling takes the first token
        hidden = encoder.text_model(**tokens).last_hidden_state
        mask = tokens["attention_mask"][1].bool()
        torch.testing.assert_close(features[1], hidden[1, mask].mean(0), atol=1e-6, rtol=0)
        cls = build_backbone("hf_text", model_dir=str(folder), pooling="cls").model.eval()
        torch.testing.assert_close(cls(tokens), hidden[:, 0], atol=1e-6, rtol=0)


def test_tiny_hf_clip_and_folder_round_trip(tmp_path) -> None:
    tiny = build_backbone("tiny_hf_clip", seed=0)
    model = tiny.model.eval()
    assert isinstance(model, DualEncoder)
    tokens = model.tokenize(TEXTS)
    assert tokens["input_ids"].shape == (2, 77)
    with torch.no_grad():
        image_features, text_features = model.encode_image(_images()), model.encode_text(tokens)
    assert image_features.shape == (2, 32) and text_features.shape == (2, 32)
    assert model.logit_scale == pytest.approx(1 / 0.07, rel=1e-4)
    _check_presets(tiny, expected_qkv=12)
    vision = _names(model, tiny.target_presets["vision_attn_qkv"])
    assert len(vision) == 6 and all(n.startswith("vision_model.") for n in vision)

    folder = save_tiny_hf("clip", tmp_path / "clip", seed=0)
    loaded = build_backbone("hf_clip", model_dir=str(folder)).model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(_images()), image_features, atol=1e-6, rtol=0)
        torch.testing.assert_close(loaded.encode_text(loaded.tokenize(TEXTS)), text_features, atol=1e-6, rtol=0)
        # a bare tensor of ids works too
        torch.testing.assert_close(loaded.encode_text(tokens["input_ids"]), text_features, atol=1e-6, rtol=0)


def test_hf_clip_without_tokenizer_files_uses_bundled_bpe(tmp_path, caplog) -> None:
    folder = save_tiny_hf("clip", tmp_path / "clip", seed=0)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with caplog.at_level("WARNING", logger="visadapt.backbones.hf"):
        loaded = build_backbone("hf_clip", model_dir=str(folder))
    assert "bundled with open_clip" in caplog.text
    assert loaded.model.tokenize(TEXTS)["input_ids"].shape == (2, 77)


def test_clip_tokenizer_matches_open_clip() -> None:
    import open_clip

    texts = ["a photo of a cat.", "Hello, World! It's 2024", "A  PHOTO of\nthe big dog!!"]
    reference = open_clip.tokenize(texts)
    ids = clip_tokenizer()(texts, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    content = reference != 0  # open_clip pads with 0, Hugging Face CLIP with <|endoftext|>
    assert torch.equal(ids[content], reference[content])


def test_hf_vit_folder_round_trip(tmp_path) -> None:
    tiny = build_backbone("tiny_hf_vit", seed=0)
    model = tiny.model.eval()
    assert isinstance(model, ImageEncoder) and model.feature_dim == 32
    with torch.no_grad():
        features = model(_images())
    assert features.shape == (2, 32)
    _check_presets(tiny, expected_qkv=6)
    folder = save_tiny_hf("vit", tmp_path / "vit", seed=0)
    loaded = build_backbone("hf_vit", model_dir=str(folder))
    assert loaded.preprocess.image_size == 32 and loaded.preprocess.mean == (0.5, 0.5, 0.5)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(_images()), features, atol=1e-6, rtol=0)
        torch.testing.assert_close(features, model.vit(pixel_values=_images()).last_hidden_state[:, 0])


@pytest.mark.parametrize("name", ["hf_text", "hf_clip", "hf_vit"])
def test_missing_folders_name_the_path(tmp_path, name: str) -> None:
    missing = tmp_path / "absent"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        build_backbone(name, model_dir=str(missing))
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        build_backbone(name, model_dir=str(tmp_path))
