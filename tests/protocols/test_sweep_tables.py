import json
import subprocess
import sys
from pathlib import Path

import pytest

from visadapt.metrics import harmonic_mean
from visadapt.protocols.sweep import Cell, base2novel_table, write_tables


def test_harmonic_mean():
    assert harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140)
    assert harmonic_mean(0.0, 0.0) == 0.0


def test_base2novel_average_is_hm_of_averages_not_mean_of_hms():
    cells = {"a": {1: (90.0, 30.0), 2: (80.0, 40.0)},  # seed-averaged: B=85, N=35
             "b": {1: (50.0, 70.0), 2: (60.0, 70.0)}}  # B=55, N=70
    t = base2novel_table(cells)
    assert t["a"]["hm"] == pytest.approx(harmonic_mean(85.0, 35.0))
    # per-dataset HM from seed-AVERAGED accuracies, not the mean of per-seed HMs
    assert t["a"]["hm"] != pytest.approx((harmonic_mean(90, 30) + harmonic_mean(80, 40)) / 2)
    assert t["average"]["base"] == pytest.approx(70.0) and t["average"]["novel"] == pytest.approx(52.5)
    assert t["average"]["hm"] == pytest.approx(harmonic_mean(70.0, 52.5))
    assert t["average"]["hm"] != pytest.approx((t["a"]["hm"] + t["b"]["hm"]) / 2)


def test_fewshot_table_mean_std(tmp_path):
    (tmp_path / "cells").mkdir()
    cells = [Cell("ds", 4, s) for s in (1, 2)]
    for c, acc in zip(cells, (70.0, 74.0)):
        (tmp_path / "cells" / f"{c.name}.json").write_text(json.dumps({"report": {"adapted": {"all": acc}}}))
    t = write_tables(tmp_path, cells, "fewshot")
    assert t["adapted_k4"] == {"ds": pytest.approx(72.0)}
    md = (tmp_path / "table.md").read_text()
    assert "72.00 ± 2.83" in md


def test_transfer_table_averages_targets_not_source(tmp_path):
    (tmp_path / "cells").mkdir()
    cells = [Cell("src", 16, s) for s in (1, 2)]
    reports = [{"zeroshot": {"all": 30.0, "shift": 20.0, "other": 10.0},
                "adapted": {"all": 80.0, "shift": 50.0, "other": 12.0}},
               {"zeroshot": {"all": 30.0, "shift": 20.0, "other": 10.0},
                "adapted": {"all": 70.0, "shift": 40.0, "other": 16.0}}]
    for c, r in zip(cells, reports):
        (tmp_path / "cells" / f"{c.name}.json").write_text(json.dumps({"report": r}))
    t = write_tables(tmp_path, cells, "transfer")
    row = t["adapted_k16_src"]
    assert row["all"] == pytest.approx(75.0) and row["shift"] == pytest.approx(45.0)
    assert row["other"] == pytest.approx(14.0)
    assert row["target_average"] == pytest.approx((45.0 + 14.0) / 2)  # the source column is not averaged in
    assert t["zeroshot_k16_src"]["target_average"] == pytest.approx(15.0)
    md = (tmp_path / "table.md").read_text()
    assert "| adapted | 16 | src | 75.00 ± 7.07 | 45.00 ± 7.07 | 14.00 ± 2.83 | 29.50 |" in md


def test_transfer_table_without_targets_says_how_to_add_them(tmp_path):
    (tmp_path / "cells").mkdir()
    cell = Cell("src", 16, 1)
    (tmp_path / "cells" / f"{cell.name}.json").write_text(json.dumps({"report": {"adapted": {"all": 1.0}}}))
    with pytest.raises(ValueError, match="data.init_args.targets"):
        write_tables(tmp_path, [cell], "transfer")


def test_sweep_runs_cells_writes_the_table_and_resumes(tmp_path, capsys):
    from visadapt.cli import cli_main
    from visadapt.protocols.sweep import sweep

    task = str(Path(__file__).resolve().parents[2] / "tasks" / "clip_fewshot.yaml")
    tiny = ["--trainer.fast_dev_run=1", "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path}",
            "--model.init_args.backbone=tiny_open_clip", "--model.init_args.adapter.init_args.target=attn_qkv",
            "--data.init_args.dataset_kwargs={num_per_class: 6}",
            "--data.init_args.image_size=32",
            "--data.init_args.targets={shifted: {dataset: procedural_shapes, dataset_kwargs: {num_per_class: 4, "
            "seed: 5}}}"]
    out = tmp_path / "sweep"
    t = sweep(task, shots=[1, 2], seeds=[1], datasets=["procedural_shapes"], protocol="transfer",
              out=str(out), overrides=tiny, runner=cli_main)
    assert set(t) == {"zeroshot_k1_procedural_shapes", "zeroshot_k2_procedural_shapes",
                      "adapted_k1_procedural_shapes", "adapted_k2_procedural_shapes"}
    assert set(t["adapted_k2_procedural_shapes"]) == {"all", "shifted", "target_average"}
    cells = sorted((out / "cells").glob("*.json"))
    assert [c.name for c in cells] == ["procedural_shapes_k1_s1.json", "procedural_shapes_k2_s1.json"]
    stamps = [c.stat().st_mtime_ns for c in cells]
    capsys.readouterr()
    assert sweep(task, shots=[1, 2], seeds=[1], datasets=["procedural_shapes"], protocol="transfer",
              out=str(out), overrides=tiny, runner=cli_main) == t
    assert [c.stat().st_mtime_ns for c in cells] == stamps  # finished cells are skipped, not rerun
    log = capsys.readouterr().out
    assert log.count("done, skipped") == 2 and "running" not in log
    assert "target average" in (out / "table.md").read_text()


def test_the_sweep_takes_its_runner_and_never_imports_the_cli(tmp_path):
    from visadapt.protocols.sweep import sweep

    code = ("import sys, visadapt.protocols.sweep as s; import visadapt.metrics as m; "
            "assert 'visadapt.cli' not in sys.modules, 'sweep imports the CLI'; "
            "assert s.harmonic_mean is m.harmonic_mean")
    subprocess.run([sys.executable, "-c", code], check=True)
    task = Path(__file__).resolve().parents[2] / "tasks" / "clip_fewshot.yaml"
    with pytest.raises(TypeError, match="runner"):
        sweep(str(task), shots=[1], seeds=[1], out=str(tmp_path / "s"))
    seen = []

    class Fake:  # a runner only has to return something with .model.report
        def __init__(self, args):
            seen.append(args)
            acc = 50.0 + int(next(a for a in args if a.startswith("--data.init_args.shots=")).split("=")[1])
            self.model = type("M", (), {"report": {"adapted": {"all": acc}, "zeroshot": {"all": 10.0}}})()

    t = sweep(str(task), shots=[1, 4], seeds=[1], out=str(tmp_path / "s"), runner=Fake)
    assert len(seen) == 2 and seen[0][:3] == ["fit", "-c", str(task)]
    assert t["adapted_k1"] == {"fashion_mnist": 51.0} and t["adapted_k4"] == {"fashion_mnist": 54.0}


def test_sweep_cells_train_iters_per_shot_times_k(tmp_path):
    """The task's ``iters_per_shot`` gives each cell ``iters_per_shot x K`` steps (CLIP-LoRA's 500 x K), whatever
    the task's max_epochs."""
    from visadapt.cli import cli_main
    from visadapt.protocols.sweep import sweep

    task = str(Path(__file__).resolve().parents[2] / "tasks" / "clip_fewshot.yaml")
    tiny = ["--trainer.accelerator=cpu", "--trainer.max_epochs=40", "--trainer.limit_val_batches=0",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
            "--model.init_args.backbone=tiny_open_clip", "--model.init_args.adapter.init_args.target=attn_qkv",
            "--model.init_args.eval_baselines=false", "--model.init_args.iters_per_shot=2",
            "--data.init_args.dataset_kwargs={num_per_class: 6}", "--data.init_args.image_size=32",
            "--data.init_args.test_per_class=2", "--data.init_args.batch_size=4"]
    out = tmp_path / "sweep"
    sweep(task, shots=[1, 2], seeds=[1], datasets=["procedural_shapes"], out=str(out), overrides=tiny,
          runner=cli_main)
    steps = {c.stem: json.loads(c.read_text())["report"]["steps"] for c in (out / "cells").glob("*.json")}
    # 40 epochs would be 40 (K=1: 5 images, one batch of 4 + 1 -> 2 per epoch: 80) steps without iters_per_shot
    assert steps == {"procedural_shapes_k1_s1": 2, "procedural_shapes_k2_s1": 4}
