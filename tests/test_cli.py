"""The command line: help texts, prog name, list, config errors, print_config."""

import subprocess
import sys
from pathlib import Path

import pytest

from visadapt.cli import cli_main


ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "visadapt", *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


def test_top_level_help_names_prog_and_extra_commands(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m visadapt")
    for word in ("fit", "validate", "test", "predict", "list", "fscil", "sweep"):
        assert word in out


def test_fit_help_shows_model_docstrings(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--model.help", "ClipFewShot"])
    out = capsys.readouterr().out
    assert "Registered dual-encoder backbone" in out  # from the Args section of ClipFewShot


def test_list_datasets_and_tasks(capsys):
    assert cli_main(["list", "datasets"]) == 0
    out = capsys.readouterr().out
    assert "fashion_mnist" in out and "procedural_shapes" in out and "sample_photos" in out
    assert cli_main(["list", "tasks"]) == 0
    out = capsys.readouterr().out
    # every task is listed with the command its header names (fscil is not run with fit)
    assert "run: python -m visadapt fit -c tasks/clip_fewshot.yaml" in out
    assert "run: python -m visadapt fscil -c tasks/fscil_coact.yaml" in out
    assert cli_main(["list", "nonsense"]) == 2


def test_yaml_typo_names_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  class_path: visadapt.methods.ClipFewShot\n  init_args:\n    backbon: tiny_open_clip\n")
    r = run("fit", "-c", str(bad))
    assert r.returncode != 0
    assert "backbon" in r.stderr and "Traceback" not in r.stderr


def test_wrong_type_names_the_key(tmp_path):
    r = run("fit", "-c", "tasks/clip_fewshot.yaml", "--data.init_args.shots=many")
    assert r.returncode != 0
    assert "shots" in r.stderr and "Traceback" not in r.stderr


def test_print_config_is_complete():
    r = run("fit", "-c", "tasks/clip_fewshot.yaml", "--print_config")
    assert r.returncode == 0, r.stderr
    for key in ("seed_everything:", "trainer:", "ClipFewShot", "class_path: visadapt.adapters", "n_blocks:",
                "FewShotDataModule", "checkpoint:", "optimizer:", "image_size: 112"):
        assert key in r.stdout, key


def test_user_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    import os

    r = run("fit", "-c", "tests/faults/tiny_fit.yaml", "--ckpt_path", str(tmp_path / "nowhere.ckpt"))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert errors == [f"python -m visadapt: error: checkpoint not found: {tmp_path / 'nowhere.ckpt'}"]
    env = {**os.environ, "VISADAPT_DEBUG": "1"}
    r = subprocess.run([sys.executable, "-m", "visadapt", "fit", "-c", "tests/faults/tiny_fit.yaml", "--ckpt_path",
                        str(tmp_path / "nowhere.ckpt")], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode != 0 and "Traceback" in r.stderr and "checkpoint not found" in r.stderr


def test_checkpoint_defaults_keep_last_ckpt_current():
    r = run("fit", "-c", "tasks/clip_fewshot.yaml", "--print_config")
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert "save_last: true" in text and "every_n_train_steps: 200" in text
