"""FSCIL under faults and scale-out, each in processes of its own: kill -9 mid-session and between sessions, then a
resume that matches the uninterrupted run exactly; and two-process CPU DDP (gloo) against one process.

DDP tolerance: both runs train on the same session images, but DDP splits each epoch over two processes (each
shuffles its own half) and averages their gradients, so the effective batch doubles and the order changes. Methods
without training (``frozen_class_mean``) must match exactly; a trained method's session accuracy may differ by at
most ``DDP_TOLERANCE`` (0.25 = 25 points on this 3-class toy test set of 5 images per class: a few images).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from fscil_helpers import TINY_VIT, TOY_DATA
from safetensors.torch import load_file

from visadapt.protocols.fscil import fscil_main

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).resolve().parent / "fscil_driver.py"
DDP_TOLERANCE = 0.25
ARGS = [*TINY_VIT, *TOY_DATA, "--coact.epochs_base=3", "--coact.ft_start_layer=1", "--coact.ft_start_epoch=1",
        "--coact.batch_size=8", "--coact.epochs_incremental=1", "--coact.inc_lr_factor=0.1",
        "--coact.consistency_over=base", "--coact.optimizer=visadapt.methods.fscil.CoACTSGD",
        "--coact.optimizer.lr=0.05", "--naive_lora_finetune.epochs_base=1",
        "--naive_lora_finetune.epochs_incremental=2",
        "--naive_lora_finetune.batch_size=2", "--show_progress=false", "--seed_everything=5", "--task=faults",
        "--trainer.accelerator=cpu"]


def _drive(args, kill=None, timeout=600):
    env = dict(os.environ, PL_DISABLE_FORK="1", PYTHONPATH=str(ROOT))
    env.pop("FSCIL_KILL", None)
    if kill:
        env["FSCIL_KILL"] = kill
    return subprocess.run([sys.executable, str(DRIVER), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=False, timeout=timeout)


def _rows(report, name):
    return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in report["methods"][name]["sessions"]]


def test_kill_9_mid_session_and_between_sessions_then_resume_matches_exactly(tmp_path):
    methods = ["--methods=[coact, naive_lora_finetune]"]
    full = fscil_main([*ARGS, *methods, f"--out_dir={tmp_path / 'full'}"])
    out = tmp_path / "run"
    args = [*ARGS, *methods, f"--out_dir={out}"]
    # 1. killed in the base session of coact, during epoch 1 (epoch 0's last.ckpt is on disk)
    r = _drive(args, kill="fit:coact:0:1:1")
    assert r.returncode == -9, r.stderr[-2000:]
    assert (out / "coact" / "checkpoints" / "session_0" / "last.ckpt").is_file()
    assert not (out / "coact" / "session_0.json").exists()
    # 2. resumed inside session 0 from last.ckpt, then killed between coact's sessions 1 and 2
    r = _drive(args, kill="after:coact:1")
    assert r.returncode == -9, r.stderr[-2000:]
    assert (out / "coact" / "session_1.json").is_file() and not (out / "coact" / "session_2.json").exists()
    assert "session 0 continues from" in (out / "log.txt").read_text()
    # 3. killed in naive fine-tuning's second incremental session, mid-epoch 1 (after epoch 0's checkpoint)
    r = _drive(args, kill="fit:naive_lora_finetune:2:1:0")
    assert r.returncode == -9, r.stderr[-2000:]
    # 4. the same command finishes the run
    resumed = fscil_main(args)
    for name in ("coact", "naive_lora_finetune"):
        assert _rows(resumed, name) == _rows(full, name), name
        for k in range(3):
            a = load_file(str(tmp_path / "full" / name / f"session_{k}.safetensors"))
            b = load_file(str(out / name / f"session_{k}.safetensors"))
            assert a.keys() == b.keys() and all(torch.equal(a[t], b[t]) for t in a), (name, k)
        log_a = json.loads((tmp_path / "full" / name / "session_0.json").read_text())["train_log"]
        log_b = json.loads((out / name / "session_0.json").read_text())["train_log"]
        assert log_a == log_b  # the epochs before the kill are kept in last.ckpt
    assert resumed["comparison"] == full["comparison"]
    assert not (out / "coact" / "checkpoints").exists()  # finished sessions leave no checkpoint behind


def test_two_process_ddp_matches_one_process(tmp_path):
    methods = ["--methods=[frozen_class_mean, coact]", "--coact.optimizer.lr=0.01"]  # a stable toy setting
    one = fscil_main([*ARGS, *methods, f"--out_dir={tmp_path / 'one'}"])
    r = _drive([*ARGS, *methods, "--trainer", "configs/trainer/ddp_cpu.yaml", "--trainer.accelerator=cpu",
                f"--out_dir={tmp_path / 'two'}"], timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert _rows(two, "frozen_class_mean") == _rows(one, "frozen_class_mean")
    for a, b in zip(_rows(two, "coact"), _rows(one, "coact")):
        assert (a["n"], a["num_classes"]) == (b["n"], b["num_classes"])
        assert abs(a["acc"] - b["acc"]) <= DDP_TOLERANCE, (a, b)
    record = json.loads((tmp_path / "two" / "coact" / "session_0.json").read_text())
    assert record["world_size"] == 2  # both processes trained the session
    assert json.loads((tmp_path / "one" / "coact" / "session_0.json").read_text())["world_size"] == 1
