"""Each CLIP few-shot paper config trains the paper's number of parameters on the paper's architecture.

The architecture is built once with random weights (open_clip ViT-B/16, ``pretrained=None``: no file, no network),
and each config's ``model.init_args.adapter`` section is injected the way ``fit`` does it (the backbone resolves the
preset name, ``inject`` freezes everything else). CLIP-LoRA's count is derived in reference note ``clip_fewshot.md``
§2.2: q, k and v of all 12 blocks of both towers as three independent rank-2 LoRAs,
12 x 3 x 2 (768 + 768) + 12 x 3 x 2 (512 + 512) = 184,320.
"""

from __future__ import annotations

import importlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

import visadapt.adapters.comp_lora as comp_lora
from visadapt.adapters import count_parameters, inject

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper" / "clip_fewshot"

VISION, TEXT, LAYERS = 768, 512, 12


def _per_matrix(params) -> int:
    """Sum of ``params(d)`` over the 3 x 12 square q, k, v matrices of each tower."""
    return 3 * LAYERS * (params(VISION) + params(TEXT))


EXPECTED = {
    # CLIP-LoRA recipe: r=2 LoRA on q, k, v of every block of both towers
    "clip_lora_vitb16.yaml": _per_matrix(lambda d: 2 * (d + d)),
    "clip_lora_vitb16_cross_dataset.yaml": _per_matrix(lambda d: 2 * (d + d)),
    "clip_lora_vitb16_domain_generalisation.yaml": _per_matrix(lambda d: 2 * (d + d)),
    "glad_vitb16_base2novel.yaml": _per_matrix(lambda d: 2 * (d + d)),
    # Block-LoRA r=4, n=2, shared form: (r/n) (in + out) per matrix
    "block_lora_vitb16.yaml": _per_matrix(lambda d: 2 * (d + d)),
    # Comp-LoRA r=2, k=64 on both sides: r (in + out - 2k) per matrix
    "comp_lora_vitb16.yaml": _per_matrix(lambda d: 2 * (d + d - 2 * 64)),
}


def test_clip_lora_count_is_the_papers():
    assert EXPECTED["clip_lora_vitb16.yaml"] == 184_320


def test_every_paper_config_has_an_expected_count():
    assert sorted(p.name for p in PAPER.glob("*.yaml")) == sorted(EXPECTED)


@pytest.fixture(scope="module")
def vitb16():
    from visadapt.backbones import build_backbone

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # building and injecting gain nothing from threads on shared, busy cores
    backbone = build_backbone("open_clip", model_name="ViT-B-16", pretrained=None)
    for p in backbone.model.parameters():
        p.requires_grad_(False)
    yield backbone
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_svd(monkeypatch):
    """Comp-LoRA's parameter count depends on the shapes only; its 72 float64 SVDs (a minute or more here) are
    replaced by the first ``k`` unit vectors (the SVD itself is tested in ``tests/adapters``)."""

    def unit_vectors(weight, k, rows=None):
        out = weight.shape[0] if rows is None else rows[1] - rows[0]
        eye = torch.eye(max(out, weight.shape[1]), dtype=torch.float64)
        return eye[:out, :k], eye[: weight.shape[1], :k]

    monkeypatch.setattr(comp_lora, "top_singular_vectors", unit_vectors)


def _adapter_config(path: Path):
    spec = yaml.safe_load(path.read_text())["model"]["init_args"]
    assert spec["backbone"] == "open_clip" and spec["backbone_kwargs"]["model_name"] == "ViT-B-16", path.name
    adapter = spec["adapter"]
    module, _, name = adapter["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**adapter.get("init_args", {}))


@pytest.mark.parametrize("config_name", sorted(EXPECTED))
def test_paper_config_trains_the_papers_parameter_count(vitb16, config_name):
    config = _adapter_config(PAPER / config_name)
    label = config_name.removesuffix(".yaml")
    report = inject(vitb16.model, replace(config, target=vitb16.resolve_target(config.target)), name=label,
                    verbose=False)
    # inject freezes every other adapter: the trainable count is this config's alone
    assert count_parameters(vitb16.model)[0] == report.adapter_parameters == EXPECTED[config_name], label
    assert len(report.matched) == 2 * LAYERS and all(s == ("q", "k", "v") for s in report.slices.values())
