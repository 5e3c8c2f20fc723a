"""The shipped FSCIL YAML: the paper configs parse as written (CEC's session files by default, all logits in the
consistency loss, the right run line) and run with tiny overrides (a tiny HF ViT saved to a local folder stands in for
ViT-B/16 IN-21k, the procedural dataset for the benchmark); the CPU task parses with every trainer fragment."""

from pathlib import Path

import numpy as np
import pytest
from fscil_helpers import TOY_DATA

from visadapt.data.base import ArrayImageDataset
from visadapt.data.sessions import build_session_split
from visadapt.methods.fscil import CoACT
from visadapt.protocols.fscil import build_parser, fscil_main

ROOT = Path(__file__).resolve().parents[2]
PAPER = sorted((ROOT / "configs" / "paper" / "fscil").glob("*.yaml"))
TASK = ROOT / "tasks" / "fscil_coact.yaml"
FRAGMENTS = sorted((ROOT / "configs" / "trainer").glob("*.yaml"))


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
    ns = build_parser().parse_args(["-c", str(cfg)])
    assert "coact" in ns.methods and ns.model.adapter.init_args.r == 16 and ns.coact.ema_momentum == 0.999
    assert ns.coact.temperature == 0.07 and ns.model.adapter.init_args.dropout == 0.1
    # each config names itself in its run line
    assert f"python -m visadapt fscil -c {cfg.relative_to(ROOT)}" in cfg.read_text().split("\n", 3)[1]


@pytest.mark.parametrize("cfg", PAPER, ids=lambda p: p.stem)
def test_paper_configs_use_cec_session_files_and_all_logits(cfg):
    ns = build_parser().parse_args(["-c", str(cfg)])
    assert ns.data.index_dir == f"index_list/{cfg.stem}" and ns.data.split_rule == "auto"
    assert ns.coact.consistency_over == "all" and ns.model.backbone_kwargs["pooling"] == "pooler"


def test_consistency_compares_all_logits_by_default():
    assert CoACT().consistency_over == "all"


def test_missing_cec_files_stop_with_their_names(tmp_path):
    labels = [c for c in range(100) for _ in range(6)]
    ds = ArrayImageDataset(np.zeros((len(labels), 2, 2), np.uint8), labels, [str(c) for c in range(100)])
    with pytest.raises(FileNotFoundError, match=r"session_1\.txt \.\. session_9\.txt.*split_rule=generated"):
        build_session_split("cifar100", ds, seed=0)
    (tmp_path / "session_1.txt").write_text("0\n")
    with pytest.raises(FileNotFoundError, match=r"missing in .*: session_2\.txt, .*session_9\.txt"):
        build_session_split("cifar100", ds, seed=0, index_dir=tmp_path)
    assert build_session_split("cifar100", ds, seed=0, split_rule="generated").num_sessions == 9  # explicit opt-in


@pytest.mark.parametrize("frag", FRAGMENTS, ids=lambda p: p.stem)
def test_trainer_fragments_apply_to_fscil(frag):
    import yaml

    if "logger" in yaml.safe_load(frag.read_text()):
        pytest.skip("the runner writes its own CSV log per session")
    ns = build_parser().parse_args(["-c", str(TASK), "--trainer", str(frag)])
    for key, value in yaml.safe_load(frag.read_text()).items():
        if key in ("fast_dev_run", "enable_checkpointing"):
            continue  # set by the runner per session
        got = ns.trainer[key]
        got = got.as_dict() if hasattr(got, "as_dict") else got
        if isinstance(value, dict):  # a class_path / init_args value: the parsed one adds the defaults
            assert got["class_path"] == value["class_path"], key
            assert all(str(got["init_args"][k]).endswith(str(v)) for k, v in value["init_args"].items()), key
        else:
            assert got == value, key


@pytest.mark.parametrize("cfg", PAPER, ids=lambda p: p.stem)
def test_paper_config_runs_with_tiny_overrides(cfg, tiny_hf_vit, tmp_path):
    # block 11 does not exist in a 2-block ViT and epoch 10 not in a 1-epoch run
    ft = [] if "cub200" in cfg.stem else ["--coact.ft_start_layer=1", "--coact.ft_start_epoch=0"]
    report = fscil_main(["-c", str(cfg), f"--model.backbone_kwargs={{model_dir: {tiny_hf_vit}, pooling: pooler}}",
                         *TOY_DATA, *ft, "--data.sessions=1", "--coact.epochs_base=1", "--coact.batch_size=8",
                         "--trainer.accelerator=cpu", "--show_progress=false", f"--out_dir={tmp_path}"])
    assert set(report["methods"]) == {"coact", "frozen_class_mean"}
    assert len(report["methods"]["coact"]["sessions"]) == 2
    log = (tmp_path / "log.txt").read_text()
    assert "controlled fine-tuning unfreezes" in log
