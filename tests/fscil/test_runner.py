"""The session runner: outputs, masking in evaluation, bit-identical resuming, corrupt files, unreadable images."""

import json
from pathlib import Path

import pytest
import torch
from fscil_helpers import BAD_TEST, BAD_TRAIN, TINY_VIT, TOY, TOY_BAD, TOY_DATA, toy_dataset
from safetensors.torch import load_file
from torchvision import transforms as T

from visadapt.data import DATASETS, create_dataset
from visadapt.data.base import BadImageError
from visadapt.data.sessions import make_session_split
from visadapt.protocols.fscil import FSCILRunner, SessionDataConfig, fscil_main

FAST = ["--coact.epochs_base=2", "--coact.ft_start_layer=1", "--coact.ft_start_epoch=1", "--coact.batch_size=8",
        "--coact.epochs_incremental=1", "--coact.inc_lr_factor=0.1", "--coact.consistency_over=base",
        "--coact.optimizer=visadapt.methods.fscil.CoACTSGD", "--coact.optimizer.lr=0.05",
        "--naive_lora_finetune.epochs_base=1", "--naive_lora_finetune.epochs_incremental=1",
        "--naive_lora_finetune.batch_size=8", "--show_progress=false", "--seed_everything=3", "--task=toy",
        "--trainer.accelerator=cpu"]


def _args(*extra):
    return [*TINY_VIT, *TOY_DATA, *FAST, *extra]


class Interrupt(RuntimeError):
    pass


def _strip_times(rows):
    return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in rows]


def _same_results(a, b):
    assert set(a["methods"]) == set(b["methods"])
    for name in a["methods"]:
        assert _strip_times(a["methods"][name]["sessions"]) == _strip_times(b["methods"][name]["sessions"]), name


def _same_states(dir_a, dir_b, names, session):
    for name in names:
        a = load_file(str(Path(dir_a) / name / f"session_{session}.safetensors"))
        b = load_file(str(Path(dir_b) / name / f"session_{session}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_resume_after_interruption_is_bit_identical(tmp_path):
    full = fscil_main(_args(f"--out_dir={tmp_path / 'full'}"))

    def kill_after_session_1(method, session):
        if method == "coact" and session == 1:
            raise Interrupt("simulated kill")

    runs = tmp_path / "runs"
    with pytest.raises(Interrupt):
        fscil_main(_args(f"--runs_root={runs}"), after_session=kill_after_session_1)
    version = runs / "toy" / "version_0"
    assert (version / "coact" / "session_1.json").is_file() and not (version / "coact" / "session_2.json").exists()
    assert json.loads((version / "run.json").read_text())["status"] == "running"
    resumed = fscil_main(_args(f"--runs_root={runs}"))  # same command: continues version_0
    assert resumed["out_dir"] == str(version) and not (runs / "toy" / "version_1").exists()
    _same_results(resumed, full)
    _same_states(full["out_dir"], version, ("coact", "frozen_class_mean", "naive_lora_finetune"), 2)
    assert resumed["comparison"] == full["comparison"]
    assert "resuming after session 1" in (version / "log.txt").read_text()
    # the outputs a person looks at
    for f in ("results.json", "results.csv", "results.md", "sessions.png", "report.md", "accuracy.png", "split.json",
              "config.yaml"):
        assert (version / f).is_file(), f
    assert (version / "sessions.png").read_bytes()[:4] == b"\x89PNG"
    assert (version / "coact" / "logs" / "session_0" / "metrics.csv").is_file()  # Lightning's CSV log per session
    rows = (version / "results.csv").read_text().splitlines()
    assert rows[0].startswith("method,session,num_classes,acc,base_acc,novel_acc,hm") and len(rows) == 1 + 3 * 3
    assert json.loads((version / "run.json").read_text())["status"] == "complete"
    record = json.loads((version / "coact" / "session_0.json").read_text())
    assert set(record["train_log"]) == {"epoch0", "epoch1"} and record["world_size"] == 1
    # a completed run is not resumed: the same command starts version_1
    again = fscil_main(_args(f"--runs_root={runs}", "--methods=[frozen_class_mean]"))
    assert again["out_dir"] == str(runs / "toy" / "version_1")


def test_different_config_in_out_dir_is_refused(tmp_path):
    fscil_main(_args(f"--out_dir={tmp_path}", "--methods=[frozen_class_mean]"))
    with pytest.raises(RuntimeError, match="different configuration"):
        fscil_main(_args(f"--out_dir={tmp_path}", "--methods=[frozen_class_mean]", "--seed_everything=4"))


@pytest.mark.parametrize("victim", ["session_1.json", "session_1.safetensors"])
def test_corrupt_session_file_is_recomputed(tmp_path, victim):
    args = _args(f"--out_dir={tmp_path}", "--methods=[coact]")
    first = fscil_main(args)
    # cloned: load_file maps the file, and the file is about to be overwritten
    reference = {k: {n: t.clone() for n, t in load_file(str(tmp_path / "coact" / f"session_{k}.safetensors")).items()}
                 for k in (1, 2)}
    (tmp_path / "coact" / victim).write_bytes(b"{\"metrics\": [1, 2")  # truncated by a crash
    second = fscil_main(args)
    _same_results(first, second)
    for k in (1, 2):
        state = load_file(str(tmp_path / "coact" / f"session_{k}.safetensors"))
        assert all(torch.equal(state[n], reference[k][n]) for n in reference[k])
    lines = [ln for ln in (tmp_path / "log.txt").read_text().splitlines() if "is corrupt" in ln]
    assert len(lines) == 1 and victim in lines[0] and "recomputing session 1" in lines[0]


def test_corrupt_run_json_is_an_error_naming_it(tmp_path):
    runs = tmp_path / "runs"
    fscil_main(_args(f"--runs_root={runs}", "--methods=[frozen_class_mean]"))
    run_json = runs / "toy" / "version_0" / "run.json"
    run_json.write_text("{\"task\": ")
    with pytest.raises(RuntimeError, match=r"version_0/run.json is corrupt"):
        fscil_main(_args(f"--runs_root={runs}", "--methods=[frozen_class_mean]"))
    assert not (runs / "toy" / "version_1").exists()  # no silent new version


def test_unreadable_images_are_skipped_at_evaluation_and_counted(tmp_path):
    data = [a.replace(f"={TOY}", f"={TOY_BAD}") for a in TOY_DATA]
    with pytest.raises(BadImageError, match=r"fscil_toy_bad/(train|test)\[\d+\]"):
        fscil_main([*TINY_VIT, *data, *FAST, "--methods=[frozen_class_mean]", f"--out_dir={tmp_path / 'raise'}"])
    report = fscil_main([*TINY_VIT, *data, *FAST, "--methods=[frozen_class_mean]", "--data.on_bad_image=skip",
                         f"--out_dir={tmp_path / 'skip'}"])
    assert report["skipped_images"]["count"] == len(BAD_TRAIN) + len(BAD_TEST)
    assert set(report["skipped_images"]["first"]) == {f"{TOY_BAD}/train[{i}]" for i in BAD_TRAIN} | \
        {f"{TOY_BAD}/test[{i}]" for i in BAD_TEST}
    rows = report["methods"]["frozen_class_mean"]["sessions"]
    # 5 test images per class; one base-class (class 0) and one novel (class 3) image are left out, not replaced
    assert [(r["n"], r["n_base"], r["n_novel"]) for r in rows] == [(14, 14, 0), (18, 14, 5 - 1), (23, 14, 10 - 1)]
    md = (tmp_path / "skip" / "results.md").read_text()
    assert f"Unreadable images left out: {len(BAD_TRAIN) + len(BAD_TEST)}" in md


class _Oracle:
    """Feature = mean pixel; logits favour the right class among the seen ones and put +100 on class 3."""

    encoder_version = 0
    eval_batch_size = 4
    num_classes = 5

    def encode(self, images):
        return images.mean(dim=(1, 2, 3))[:, None]

    def classify(self, feats):
        centres = torch.tensor([c * 0.2 for c in range(self.num_classes)])
        logits = -(feats - centres[None]).abs()
        logits[:, 3] = 100.0  # an unseen class with an overwhelming score
        return logits


def test_evaluation_masks_unseen_classes():
    class Flat:
        labels = tuple(c for c in range(5) for _ in range(4))

        def load(self, i):
            from PIL import Image
            return Image.new("L", (4, 4), color=int(255 * 0.2 * self.labels[i]))

    split = make_session_split("flat", Flat.labels, 0, base_classes=2, way=1, shot=1, sessions=3)
    runner = FSCILRunner.__new__(FSCILRunner)
    runner.data, runner.skipped = SessionDataConfig(), {}
    method = _Oracle()
    by_class = {c: [i for i, y in enumerate(Flat.labels) if y == c] for c in range(5)}
    for session, expected in ((0, 1.0), (1, 1.0)):  # 2 then 3 classes seen: class 3 is masked out
        res = runner._evaluate(method, split, session, Flat(), T.ToTensor(), by_class, {})
        assert res["num_classes"] == session + 2 and res["acc"] == pytest.approx(expected)
    res = runner._evaluate(method, split, 2, Flat(), T.ToTensor(), by_class, {})  # class 3 now seen: it wins all
    assert res["acc"] == pytest.approx(0.25)


def test_help_and_print_config(capsys):
    with pytest.raises(SystemExit) as e:
        fscil_main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m visadapt fscil")
    assert "Teacher EMA momentum m (0.999)" in out and "Training images per new class" in out
    assert "--trainer CONFIG" in out and "--model.adapter" in out
    with pytest.raises(SystemExit):
        fscil_main(_args("--print_config"))
    cfg = capsys.readouterr().out
    assert f"dataset: {TOY}" in cfg and "ema_momentum: 0.999" in cfg


def test_toy_dataset_is_registered():
    assert TOY in DATASETS and TOY in DATASETS.names()
    ds = create_dataset(TOY, split="train")  # through the registry, by name
    direct = toy_dataset(split="train")
    assert len(ds) == 60 and ds.labels == direct.labels and ds.classnames[:2] == ["class0", "class1"]
    assert list(ds.load(7).getdata()) == list(direct.load(7).getdata())


def test_progress_goes_through_logging_not_print(tmp_path, capsys, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="visadapt"):
        fscil_main(_args(f"--out_dir={tmp_path}", "--methods=[frozen_class_mean]"))
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("visadapt.protocols.fscil")]
    assert any(m.startswith("frozen_class_mean session 2: 5 classes") for m in messages)
    out = capsys.readouterr().out
    assert "frozen_class_mean session 2:" not in out  # stdout holds the command's result tables only
    assert "### comparison (%)" in out


def test_methods_are_registered_lightning_modules_without_hand_written_loops():
    import inspect
    import re

    from lightning.pytorch import LightningModule

    import visadapt.methods.fscil as package
    import visadapt.protocols.fscil as protocol
    from visadapt.methods.fscil import FSCIL_METHODS

    assert set(FSCIL_METHODS.names()) == {"coact", "frozen_class_mean", "naive_lora_finetune"}
    assert all(issubclass(FSCIL_METHODS.get(n), LightningModule) for n in FSCIL_METHODS.names())
    sources = [protocol.__file__, *Path(package.__file__).parent.glob("*.py")]
    for path in sources:
        code = Path(path).read_text()
        for pattern in (r"\.backward\(", r"\.step\(\)", r"zero_grad\(", r"for epoch in range"):
            assert not re.search(pattern, code), f"{path}: {pattern}"
        assert not re.search(r"^\s*import (timm|transformers)|^\s*from (timm|transformers)", code, re.MULTILINE), path
    assert "configure_optimizers" in inspect.getsource(FSCIL_METHODS.get("coact").__mro__[1])
