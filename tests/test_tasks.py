"""Every shipped YAML is exercised: tasks run under fast_dev_run; paper configs are parsed and instantiated with
tiny overrides (they need real weights and datasets that CI does not have)."""

from pathlib import Path

import pytest
import yaml

from visadapt.cli import cli_main

ROOT = Path(__file__).resolve().parent.parent
# CLIP few-shot `fit` tasks (FSCIL, tracking, manipulation and text-to-image tasks are tested in their own folders)
FIT_TASKS = sorted(p for p in (ROOT / "tasks").glob("*.yaml")
                   if (yaml.safe_load(p.read_text()).get("model") or {}).get("class_path", "").endswith("ClipFewShot"))
PAPER_CLIP = sorted((ROOT / "configs" / "paper" / "clip_fewshot").glob("*.yaml"))
TRAINER_FRAGMENTS = sorted((ROOT / "configs" / "trainer").glob("*.yaml"))
ADAPTER_FRAGMENTS = sorted((ROOT / "configs" / "adapters").glob("*.yaml"))
TINY_DATA = ["--data.init_args.dataset=procedural_shapes", "--data.init_args.dataset_kwargs={num_per_class: 6}",
             "--data.init_args.root=null", "--data.init_args.val_split=null", "--data.init_args.split_file=null"]


@pytest.mark.parametrize("task", FIT_TASKS, ids=lambda p: p.stem)
def test_task_fast_dev_run(task, tmp_path):
    cli = cli_main(["fit", "-c", str(task), "--trainer.fast_dev_run=1", "--trainer.accelerator=cpu",
                    f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}"])
    report = cli.model.report
    assert "adapted" in report and all(0 <= v <= 100 for v in report["adapted"].values())
    assert (Path(cli.trainer.log_dir or cli.trainer.default_root_dir) / "report.md").is_file()


@pytest.mark.parametrize("cfg", PAPER_CLIP, ids=lambda p: p.stem)
def test_paper_config_instantiates_with_tiny_overrides(cfg, tmp_path):
    cli = cli_main(["fit", "-c", str(cfg), "--trainer.fast_dev_run=1", "--trainer.accelerator=cpu",
                    "--trainer.precision=32", "--trainer.devices=1", "--trainer.strategy=auto",
                    "--model.init_args.backbone=tiny_open_clip", "--model.init_args.backbone_kwargs={}",
                    f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}",
                    *TINY_DATA,
                    # transfer targets point at real datasets: swap them for generated data of another seed
                    *(["--data.init_args.targets={shifted: {dataset: procedural_shapes, dataset_kwargs: "
                       "{num_per_class: 6, seed: 3}}}"] if "targets" in cfg.read_text() else []),
                    # the tiny model's 64-wide layers cannot protect ViT-B's 64 directions
                    *(["--model.init_args.adapter.init_args.protected=8"] if "comp" in cfg.stem else [])])
    assert cli.model.report["adapted"]
    if "targets" in cfg.read_text():
        assert "shifted" in cli.model.report["adapted"]


@pytest.mark.parametrize("frag", [f for f in TRAINER_FRAGMENTS if f.stem not in ("ddp_cpu",)], ids=lambda p: p.stem)
def test_trainer_fragments_parse(frag):
    # GPU fragments cannot run here: parse them against the Trainer signature through the real CLI
    with pytest.raises(SystemExit) as e:
        cli_main(["fit", "-c", str(ROOT / "tasks" / "clip_fewshot.yaml"), "--trainer", str(frag), "--print_config"])
    assert e.value.code == 0


@pytest.mark.parametrize("frag", ADAPTER_FRAGMENTS, ids=lambda p: p.stem)
def test_adapter_fragments_run_on_the_main_task(frag, tmp_path):
    cli = cli_main(["fit", "-c", str(ROOT / "tasks" / "clip_fewshot.yaml"), "--model.init_args.adapter", str(frag),
                    "--trainer.fast_dev_run=1", "--trainer.accelerator=cpu", "--data.init_args.image_size=64",
                    f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}"])
    expected = yaml.safe_load(frag.read_text())["class_path"].rsplit(".", 1)[1]
    assert type(cli.model.adapter_cfg).__name__ == expected
    assert cli.model.report["trainable_params"] > 0


@pytest.mark.parametrize("frag", sorted((ROOT / "configs" / "methods").glob("*.yaml")), ids=lambda p: p.stem)
def test_method_fragments_run_on_the_main_task(frag, tmp_path):
    cli = cli_main(["fit", "-c", str(ROOT / "tasks" / "clip_fewshot.yaml"), "-c", str(frag),
                    "--trainer.fast_dev_run=1", "--trainer.accelerator=cpu", "--data.init_args.image_size=64",
                    f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}"])
    init = yaml.safe_load(frag.read_text())["model"]["init_args"]
    assert type(cli.model.adapter_cfg).__name__ == init["adapter"]["class_path"].rsplit(".", 1)[1]
    assert cli.model.adapter_cfg.r == init["adapter"]["init_args"]["r"]
    lr = init.get("optimizer", {}).get("init_args", {}).get("lr", 1e-3)  # the task's lr unless the fragment sets one
    assert cli.trainer.optimizers[0].defaults["lr"] == pytest.approx(lr)
    for spec in (yaml.safe_load(frag.read_text()).get("trainer") or {}).get("callbacks", []):  # e.g. GLAD's
        found = [c for c in cli.trainer.callbacks if type(c).__name__ == spec["class_path"].rsplit(".", 1)[1]]
        assert found, spec["class_path"]
        if "rho" in spec.get("init_args", {}):
            assert found[0].config.rho == spec["init_args"]["rho"] and cli.model.automatic_optimization


def test_main_task_under_ddp_on_two_cpu_processes(tmp_path):
    """Scale-out is real: the shipped main task under Lightning's DDP strategy, two gloo processes on the CPU."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PL_DISABLE_FORK="1")
    r = subprocess.run(
        [sys.executable, "-m", "visadapt", "fit", "-c", "tasks/clip_fewshot.yaml", "--trainer",
         "configs/trainer/ddp_cpu.yaml", "--trainer.fast_dev_run=1", "--data.init_args.image_size=64",
         f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert "Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/2" in log
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in log
    assert "report written to" in log


@pytest.mark.parametrize("frag", sorted((ROOT / "configs" / "protocols").glob("*.yaml")), ids=lambda p: p.stem)
def test_protocol_fragments_run_on_the_main_task(frag, tmp_path):
    cli = cli_main(["fit", "-c", str(ROOT / "tasks" / "clip_fewshot.yaml"), "-c", str(frag),
                    "--trainer.fast_dev_run=1", "--trainer.accelerator=cpu", "--data.init_args.image_size=64",
                    f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}"])
    targets = yaml.safe_load(frag.read_text())["data"]["init_args"]["targets"]
    assert set(cli.model.report["adapted"]) == {"all", *targets}
    assert set(cli.model.report["zeroshot"]) == {"all", *targets}
