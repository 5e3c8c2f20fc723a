"""The session runner: outputs, masking in evaluation, and bit-identical resuming after an interruption."""

import json
from pathlib import Path

import pytest
import torch
from fscil_helpers import TINY_VIT, TOY, TOY_DATA, toy_dataset
from safetensors.torch import load_file
from torchvision import transforms as T

from visadapt.data.sessions import make_session_split
from visadapt.methods.coact import FSCILMethod
from visadapt.protocols.fscil import FSCILRunner, fscil_main

FAST = ["--coact.epochs_base=2", "--coact.ft_start_layer=1", "--coact.ft_start_epoch=1", "--coact.batch_size=8",
        "--coact.epochs_incremental=1", "--coact.inc_lr_factor=0.1", "--coact.lr=0.05",
        "--naive_lora_finetune.epochs_base=1", "--naive_lora_finetune.epochs_incremental=1",
        "--naive_lora_finetune.batch_size=8", "--show_progress=false", "--seed=3", "--task=toy"]


def _args(*extra):
    return [*TINY_VIT, *TOY_DATA, *FAST, *extra]


class Interrupt(RuntimeError):
    pass


def _strip_times(rows):
    return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in rows]


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
    for name in ("coact", "frozen_class_mean", "naive_lora_finetune"):
        assert _strip_times(resumed["methods"][name]["sessions"]) == _strip_times(full["methods"][name]["sessions"])
        a = load_file(str(Path(full["out_dir"]) / name / "session_2.safetensors"))
        b = load_file(str(version / name / "session_2.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["comparison"] == full["comparison"]
    assert "resuming after session 1" in (version / "log.txt").read_text()
    # the outputs a person looks at
    for f in ("results.json", "results.csv", "results.md", "accuracy.png", "split.json", "config.yaml"):
        assert (version / f).is_file(), f
    assert (version / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    rows = (version / "results.csv").read_text().splitlines()
    assert rows[0].startswith("method,session,num_classes,acc,base_acc,novel_acc,hm") and len(rows) == 1 + 3 * 3
    assert json.loads((version / "run.json").read_text())["status"] == "complete"
    # a completed run is not resumed: the same command starts version_1
    again = fscil_main(_args(f"--runs_root={runs}", "--methods=[frozen_class_mean]"))
    assert again["out_dir"] == str(runs / "toy" / "version_1")


def test_different_config_in_out_dir_is_refused(tmp_path):
    fscil_main(_args(f"--out_dir={tmp_path}", "--methods=[frozen_class_mean]"))
    with pytest.raises(RuntimeError, match="different configuration"):
        fscil_main(_args(f"--out_dir={tmp_path}", "--methods=[frozen_class_mean]", "--seed=4"))


class _Oracle(FSCILMethod):
    """Feature = mean pixel; logits favour the right class among the seen ones and put +100 on class 3."""

    name = "oracle"

    def setup(self, encoder, num_classes, device, lora_target="qv"):
        self.num_classes = num_classes

    def encode(self, images):
        return images.mean(dim=(1, 2, 3))[:, None]

    def classify(self, feats):
        centres = torch.tensor([c * 0.2 for c in range(self.num_classes)])
        logits = -(feats - centres[None]).abs()
        logits[:, 3] = 100.0  # an unseen class with an overwhelming score
        return logits


def test_evaluation_masks_unseen_classes(tmp_path):
    class Flat:
        labels = tuple(c for c in range(5) for _ in range(4))

        def load(self, i):
            from PIL import Image
            return Image.new("L", (4, 4), color=int(255 * 0.2 * self.labels[i]))

    split = make_session_split("flat", Flat.labels, 0, base_classes=2, way=1, shot=1, sessions=3)
    runner = FSCILRunner.__new__(FSCILRunner)
    method = _Oracle()
    method.setup(None, 5, "cpu")
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
    with pytest.raises(SystemExit):
        fscil_main(_args("--print_config"))
    cfg = capsys.readouterr().out
    assert f"dataset: {TOY}" in cfg and "ema_momentum: 0.999" in cfg


def test_toy_dataset_is_registered():
    assert len(toy_dataset()) == 60
