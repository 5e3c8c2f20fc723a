"""The shipped FSCIL YAML: the paper configs parse as written and run with tiny overrides (a tiny HF ViT saved to a
local folder stands in for ViT-B/16 IN-21k, the procedural dataset for the benchmark); the CPU task parses."""

from pathlib import Path

import pytest
from fscil_helpers import TOY_DATA

from visadapt.protocols.fscil import build_parser, fscil_main

ROOT = Path(__file__).resolve().parents[2]
PAPER = sorted((ROOT / "configs" / "paper" / "fscil").glob("*.yaml"))
TASK = ROOT / "tasks" / "fscil_coact.yaml"


@pytest.fixture(scope="module")
def tiny_hf_vit(tmp_path_factory):
    from transformers import ViTConfig, ViTModel

    path = tmp_path_factory.mktemp("vit-tiny-in21k")
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8), add_pooling_layer=True).save_pretrained(path)
    return path


def test_paper_configs_exist():
    assert {p.stem for p in PAPER} == {"cifar100", "cub200", "mini_imagenet"}


@pytest.mark.parametrize("cfg", PAPER + [TASK], ids=lambda p: p.stem)
def test_configs_parse_as_written(cfg):
    parser = build_parser()
    ns = parser.parse_args(["-c", str(cfg)])
    assert "coact" in ns.methods and ns.coact.lora_r == 16 and ns.coact.ema_momentum == 0.999
    assert ns.coact.temperature == 0.07 and ns.coact.lora_dropout == 0.1


@pytest.mark.parametrize("cfg", PAPER, ids=lambda p: p.stem)
def test_paper_config_runs_with_tiny_overrides(cfg, tiny_hf_vit, tmp_path):
    # block 11 does not exist in a 2-block ViT and epoch 10 not in a 1-epoch run
    ft = [] if "cub200" in cfg.stem else ["--coact.ft_start_layer=1", "--coact.ft_start_epoch=0"]
    report = fscil_main(["-c", str(cfg), f"--encoder.kwargs={{path: {tiny_hf_vit}}}", *TOY_DATA, *ft,
                         "--data.sessions=1", "--coact.epochs_base=1", "--coact.batch_size=8", "--device=cpu",
                         "--show_progress=false", f"--out_dir={tmp_path}"])
    assert set(report["methods"]) == {"coact", "frozen_class_mean"}
    assert len(report["methods"]["coact"]["sessions"]) == 2
    log = (tmp_path / "log.txt").read_text()
    assert "controlled fine-tuning unfreezes" in log
