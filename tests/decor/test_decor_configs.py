"""The shipped text-to-image task and the paper settings parse and instantiate with tiny overrides (they need the
trained base model, SDXL weights and the DreamBooth dataset, which CI does not have)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visadapt.cli import cli_main
from visadapt.protocols.t2i import evaluation_config, read_task

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning",
                                        "ignore:.*does not have many workers.*", "ignore:.*LeafSpec.*",
                                        "ignore:.*eval mode.*", "ignore:.*args parameter.*")
ROOT = Path(__file__).resolve().parents[2]
PAPER = ROOT / "configs" / "paper" / "t2i"


def test_paper_sdxl_config_runs_a_step_on_tiny_sdxl(tmp_path):
    data = tmp_path / "dataset"
    (data / "dog").mkdir(parents=True)
    (data / "prompts_and_classes.txt").write_text("subject_name,class\ndog,dog\n")
    for i in range(2):
        Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(data / "dog" / f"0{i}.jpg")
    files = [str(PAPER / "dreambooth_sdxl.yaml"), str(PAPER / "dreambooth_live_prompts.yaml")]
    cli = cli_main(["fit", "-c", files[0], "-c", files[1], "--trainer.fast_dev_run=1", "--trainer.accelerator=cpu",
                    "--trainer.precision=32", "--model.init_args.backbone=tiny_sdxl",
                    "--model.init_args.backbone_kwargs={}", f"--data.init_args.root={data}",
                    "--data.init_args.num_workers=0", f"--trainer.logger.init_args.save_dir={tmp_path}",
                    f"--trainer.default_root_dir={tmp_path}"])
    model = cli.model
    assert model.t2i.kind == "sdxl" and cli.trainer.global_step == 1
    assert model.adapter_cfg.r == 4 and model.adapter_cfg.init == "gaussian"
    assert cli.trainer.optimizers[0].defaults["lr"] == pytest.approx(1e-4)
    assert cli.trainer.accumulate_grad_batches == 4
    ev = model.evaluation
    assert len(ev.prompts) == 25 and "wearing a santa hat" in " ".join(ev.prompts)  # the live-subject fragment
    cfg = read_task(files)
    resolved = evaluation_config(cfg).resolved_prompts()
    assert len(resolved) == 25 and resolved[0] == "a sks dog in the jungle"
    assert evaluation_config(cfg).dino_backbone == "timm"


def test_shipped_task_fast_dev_run_with_a_tiny_backbone(tmp_path):
    task = ROOT / "tasks" / "t2i_decor.yaml"
    cli = cli_main(["fit", "-c", str(task), "--trainer.fast_dev_run=1", "--trainer.accelerator=cpu",
                    "--model.init_args.backbone=tiny_sd", f"--trainer.logger.init_args.save_dir={tmp_path}",
                    f"--trainer.default_root_dir={tmp_path}"])
    assert cli.trainer.global_step == 1
    ev = cli.model.evaluation
    # DECOR's undesired vectors are the instance prompt's word rows; the plot's text axis is the colour match
    assert ev.undesired == ["a photo of a sks sneaker"] and ev.alphas == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert ev.colour_match and ev.text_axis == "colour_match" and ev.guidance_scale == 1.5
    assert cli.datamodule.train_set.instance.classnames == ["sneaker"]
    assert cli.datamodule.preprocess.image_size == 16  # linked from the model (tiny_sd draws 16x16 images)
