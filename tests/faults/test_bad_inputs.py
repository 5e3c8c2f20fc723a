"""The bad-input corpus: each input gets one clear message that names the file or setting, nothing runs code a
file names, and nothing half-applied is left behind."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re

import pytest
import torch
from fault_helpers import TINY_FIT
from PIL import Image
from torch import nn

from visadapt.adapters import LoRAConfig, adapter_names, inject, load_adapter, save_adapter
from visadapt.cli import cli_main
from visadapt.data import DATASETS, BadImageError
from visadapt.data.imagefolder import imagefolder
from visadapt.errors import report_user_errors


def cli(args: list[str], capsys) -> tuple[int, str]:
    """``python -m visadapt ARGS`` in-process, with the command line's error reporting; (exit code, stderr)."""
    with pytest.raises(SystemExit) as e, report_user_errors("python -m visadapt"):
        cli_main(args)
    return int(e.value.code or 0), capsys.readouterr().err


def one_clear_line(err: str, *must: str) -> None:
    assert "Traceback" not in err, err
    for text in must:
        assert text in err, (text, err)


def png(path, color=(200, 30, 30), size=(8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


# -- checkpoints ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("payload", ["popen", "file_handler"])
def test_checkpoint_hyperparameters_never_instantiate(tmp_path, capsys, payload):
    marker = tmp_path / "PWNED"
    spec = ({"class_path": "subprocess.Popen", "init_args": {"args": f"touch {marker}", "shell": True}}
            if payload == "popen" else {"class_path": "logging.FileHandler", "init_args": {"filename": str(marker)}})
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6.6", "hyper_parameters": {
        "_class_path": "visadapt.methods.ClipFewShot", "_instantiator": "lightning.pytorch.cli.instantiate_module",
        "backbone": "tiny_open_clip", "backbone_kwargs": {"x": spec}}}, ckpt)
    os.chdir(tmp_path)
    code, err = cli(["fit", "-c", str(TINY_FIT), "--ckpt_path", str(ckpt), "--trainer.max_epochs=1"], capsys)
    assert not marker.exists(), "a checkpoint's hyperparameters ran code"
    assert code != 0  # the checkpoint holds none of the trained tensors: refused, naming them
    one_clear_line(err, "checkpoint lacks")
    for h in list(logging.getLogger().handlers):
        if isinstance(h, logging.FileHandler) and h.baseFilename == str(marker):
            raise AssertionError("a FileHandler from the checkpoint was attached")


def test_config_free_form_kwargs_are_plain_data(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    spec = json.dumps({"h": {"class_path": "logging.FileHandler", "init_args": {"filename": str(marker)}}})
    os.chdir(tmp_path)
    code, err = cli(["fit", "-c", str(TINY_FIT), f"--model.init_args.backbone_kwargs={spec}"], capsys)
    assert code != 0 and not marker.exists()
    one_clear_line(err, "backbone_kwargs")


def test_truncated_pickled_and_missing_checkpoints_are_named(tmp_path, capsys):
    os.chdir(tmp_path)
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(100)}, "pytorch-lightning_version": "2.6.6"}, good)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    pickled = tmp_path / "pickle.ckpt"
    torch.save({"state_dict": {}, "args": argparse.Namespace(a=1)}, pickled)
    for path, words in [(truncated, ["truncated.ckpt", "truncated or not a checkpoint"]),
                        (pickled, ["pickle.ckpt", "unpickle", "refusing"]),
                        (tmp_path / "nowhere.ckpt", ["checkpoint not found", "nowhere.ckpt"])]:
        code, err = cli(["fit", "-c", str(TINY_FIT), "--ckpt_path", str(path)], capsys)
        assert code == 2, err
        one_clear_line(err, *words)
        assert len([ln for ln in err.splitlines() if ln.startswith("python -m visadapt: error:")]) == 1


# -- config errors --------------------------------------------------------------------------------------------------
def test_yaml_typo_wrong_type_and_bad_names(tmp_path, capsys):
    os.chdir(tmp_path)
    code, err = cli(["fit", "-c", str(TINY_FIT), "--data.init_args.shots=many"], capsys)
    assert code != 0
    one_clear_line(err, "shots")
    bad = tmp_path / "typo.yaml"
    bad.write_text(TINY_FIT.read_text().replace("backbone: tiny_open_clip", "backbon: tiny_open_clip"))
    code, err = cli(["fit", "-c", str(bad)], capsys)
    assert code != 0
    one_clear_line(err, "backbon")
    code, err = cli(["fit", "-c", str(TINY_FIT), "--model.init_args.adapter.class_path=NoSuchLoRA"], capsys)
    assert code != 0
    one_clear_line(err, "NoSuchLoRA", "LoRAConfig", "BlockLoRAConfig")


def test_target_matching_nothing_is_one_message(tmp_path, capsys):
    os.chdir(tmp_path)
    code, err = cli(["fit", "-c", str(TINY_FIT), "--model.init_args.adapter.init_args.target=nothing_matches"],
                    capsys)
    assert code == 2
    one_clear_line(err, "target 'nothing_matches' matches no module", "visual.transformer.resblocks.0.attn.qkv")
    assert err.count("nothing_matches") == 1 and "Union subtypes" not in err and "Namespace(" not in err, err


def test_debug_switch_shows_the_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VISADAPT_DEBUG", "1")
    os.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"), report_user_errors():
        cli_main(["fit", "-c", str(TINY_FIT), "--ckpt_path", "nowhere.ckpt"])


# -- datasets -------------------------------------------------------------------------------------------------------
def test_unknown_dataset_argument_names_dataset_and_accepted():
    with pytest.raises(ValueError, match=r"dataset 'imagefolder' does not take invert; it accepts: root, split"):
        DATASETS.get("imagefolder")(root="/nowhere", split="train", invert=True)


def test_missing_root_names_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist; expected root/<class>/<image>"):
        imagefolder(str(tmp_path / "nowhere"), split="train")


def test_plain_tree_is_split_deterministically_and_saved(tmp_path):
    for c in ("cat", "dog"):
        for i in range(10):
            png(tmp_path / "tree" / c / f"{i}.png", color=(i * 20, 0, 0))
    root = str(tmp_path / "tree")
    parts = {s: imagefolder(root, split=s) for s in ("train", "val", "test")}
    assert [len(parts[s]) for s in ("train", "val", "test")] == [10, 4, 6]  # 5 / 2 / 3 per class (CoOp 50/20/30)
    files = [set(map(str, parts[s].paths)) for s in ("train", "val", "test")]
    assert not (files[0] & files[1]) and not (files[0] & files[2]) and not (files[1] & files[2])
    saved = json.loads((tmp_path / "tree" / "imagefolder_split.json").read_text())
    assert sorted(saved["splits"]["train"]["cat"]) == sorted(p.relative_to(tmp_path / "tree").as_posix()
                                                             for p in parts["train"].paths if p.parent.name == "cat")
    png(tmp_path / "tree" / "cat" / "new.png")  # a file added later does not move the saved split
    assert set(map(str, imagefolder(root, split="train").paths)) == files[0]


def test_empty_class_folder_is_refused_or_dropped(tmp_path):
    png(tmp_path / "a" / "1.png")
    png(tmp_path / "a" / "2.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"hold no image.*empty.*empty_classes: drop"):
        imagefolder(str(tmp_path))
    ds = imagefolder(str(tmp_path), empty_classes="drop")
    assert ds.raw_classnames == ["a"] and len(ds) == 2


def test_skip_leaves_bad_files_out_never_replaced(tmp_path, caplog):
    for c in ("a", "b"):
        for i in range(3):
            png(tmp_path / c / f"{i}.png")
    (tmp_path / "a" / "1.png").write_bytes(b"not a png")              # corrupt
    (tmp_path / "b" / "0.png").write_bytes((tmp_path / "a" / "0.png").read_bytes()[:20])  # truncated
    (tmp_path / "b" / "2.png").write_text("plain text posing as an image")  # not an image
    with pytest.raises(BadImageError, match=re.escape(str(tmp_path / "a" / "1.png"))):
        imagefolder(str(tmp_path))[1]
    with caplog.at_level(logging.WARNING):
        ds = imagefolder(str(tmp_path), on_bad_image="skip")
    assert [p.name for p in ds.paths] == ["0.png", "2.png", "1.png"] and ds.labels == [0, 0, 1]
    assert [ds[i]["label"] for i in range(len(ds))] == [0, 0, 1]  # every sample is its own file and class
    assert len(ds.skipped) == 3 and "3 unreadable image(s)" in caplog.text and "1.png" in caplog.text


def test_decompression_bomb_is_named_and_skipped(tmp_path, monkeypatch):
    png(tmp_path / "a" / "ok.png")
    png(tmp_path / "a" / "bomb.png", size=(64, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 > 2x the limit: PIL's DecompressionBombError
    with pytest.raises(BadImageError, match=r"bomb\.png.*decompression bomb"):
        imagefolder(str(tmp_path))[0]
    ds = imagefolder(str(tmp_path), on_bad_image="skip")
    assert [p.name for p in ds.paths] == ["ok.png"] and "bomb.png" in ds.skipped[0]


def test_readme_imagefolder_command_works(tmp_path, capsys):
    for c in ("circle", "square", "triangle"):
        for i in range(10):
            png(tmp_path / "mine" / c / f"{i}.png", color=(20 * i, 80, 0))
    os.chdir(tmp_path)
    cli_main(["fit", "-c", str(TINY_FIT), "--data.init_args.dataset=imagefolder",
              f"--data.init_args.root={tmp_path / 'mine'}", "--data.init_args.shots=2", "--trainer.max_epochs=1"])
    err = capsys.readouterr().err
    assert "dropping the config's dataset_kwargs ['num_per_class']" in err
    assert (tmp_path / "mine" / "imagefolder_split.json").is_file()
    report = json.loads((tmp_path / "runs" / "tiny" / "version_0" / "report.json").read_text())
    assert "adapted" in report


# -- adapter files --------------------------------------------------------------------------------------------------
def _toy(width: int = 8) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Module()
    m.blocks = nn.ModuleList([nn.ModuleDict({"fc": nn.Linear(width, width)}) for _ in range(2)])
    return m


def test_adapter_files_bad_shape_base_and_corrupt_safetensors(tmp_path):
    src = _toy()
    inject(src, LoRAConfig(target=r"blocks\.\d+\.fc", r=2), verbose=False)
    save_adapter(src, tmp_path / "ad", base_identity="toy")
    with pytest.raises(ValueError, match=r"saved for base model 'toy', not 'other'"):
        load_adapter(_toy(), tmp_path / "ad", base_identity="other")
    with pytest.raises(ValueError, match=r"expects a base weight of shape \(8, 8\)"):
        load_adapter(_toy(width=6), tmp_path / "ad")
    weights = tmp_path / "ad" / "visadapt_adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    target = _toy()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=re.escape(str(weights)) + r" is not a readable safetensors file"):
        load_adapter(target, tmp_path / "ad")
    assert adapter_names(target) == [] and target.state_dict().keys() == before.keys()


def test_failed_load_adapter_leaves_the_model_untouched(tmp_path):
    src = _toy()
    inject(src, LoRAConfig(target=r"blocks\.\d+\.fc", r=2), verbose=False)
    save_adapter(src, tmp_path / "ad", base_identity="toy")
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "ad" / "visadapt_adapter.safetensors"))
    state.pop(sorted(state)[0])  # one tensor missing: the load fails after the injection
    save_file(state, str(tmp_path / "ad" / "visadapt_adapter.safetensors"))
    target = _toy()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(KeyError, match="missing adapter key"):
        load_adapter(target, tmp_path / "ad")
    assert adapter_names(target) == []
    assert type(target.blocks[0]["fc"]) is nn.Linear
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    assert all(p.requires_grad for p in target.parameters())
