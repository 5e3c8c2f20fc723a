"""Each part-B fragment composes with the CLIP few-shot task through the real CLI and trains (tiny backbone)."""

from pathlib import Path

import pytest
import yaml

from visadapt.cli import cli_main

ROOT = Path(__file__).resolve().parents[2]
NAMES = ["glad", "lisa", "ba_lora", "contrastive_aug", "flexora", "diffora"]
TINY = ["--model.init_args.backbone=tiny_open_clip", "--model.init_args.eval_baselines=false",
        "--data.init_args.dataset=procedural_shapes", "--data.init_args.dataset_kwargs={num_per_class: 6}",
        "--data.init_args.shots=2", "--data.init_args.test_per_class=4", "--data.init_args.image_size=32",
        "--data.init_args.batch_size=8", "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
        "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
        "--model.init_args.adapter.init_args.target=vision_attn_qkv"]


@pytest.mark.parametrize("name", NAMES)
def test_fragment_composes_with_the_clip_task_and_trains(name, tmp_path):
    frag = ROOT / "configs" / "companions" / f"{name}.yaml"
    assert frag.read_text().startswith("# ")  # a comment header says what it is and how to use it
    spec = yaml.safe_load(frag.read_text())["trainer"]["callbacks"][0]
    cli = cli_main(["fit", "-c", str(ROOT / "tasks" / "clip_fewshot.yaml"), "-c", str(frag), *TINY,
                    f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}"])
    found = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == spec["class_path"].rsplit(".", 1)[1]]
    assert len(found) == 1 and cli.trainer.global_step == 2 and cli.model.report["adapted"]
    if name in ("flexora", "diffora"):
        written = yaml.safe_load(found[0].path.read_text())
        assert written["model"]["init_args"]["adapter"]["init_args"]["target"]
    if name == "lisa":
        assert [n.split(".")[1] for n in found[0].layer_names] == ["visual", "visual"]  # image tower only
