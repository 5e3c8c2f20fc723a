"""The default tracking task runs (fast_dev_run through the real CLI) and the paper configs instantiate."""

from pathlib import Path

import pytest
import torch
import yaml

from visadapt.cli import cli_main
from visadapt.data.tracking.datamodule import TrackingPairDataModule
from visadapt.methods.lorat import LoRAT
from visadapt.protocols.tracking import build_model

ROOT = Path(__file__).resolve().parents[2]
TASK = ROOT / "tasks" / "tracking_lorat.yaml"
PAPER = sorted((ROOT / "configs" / "paper" / "tracking").glob("lorat_*.yaml"))
FULL_FT = ROOT / "configs" / "paper" / "tracking" / "full_finetune.yaml"
# (model_name, template, search, search factor, drop path) of each paper variant (reference notes, section 2.2)
EXPECTED = {"b224": ("vit_base_patch14_dinov2", 112, 224, 4.0, 0.0),
            "l224": ("vit_large_patch14_dinov2", 112, 224, 4.0, 0.1),
            "b378": ("vit_base_patch14_dinov2", 196, 378, 5.0, 0.0),
            "l378": ("vit_large_patch14_dinov2", 196, 378, 5.0, 0.1)}


def _tiny_specs(root: Path) -> str:
    kw = "{num_sequences: 2, num_frames: 12, frame_size: [160, 120], occlusion_prob: 0.0, out_of_view_prob: 0.0}"
    return "{dataset: tracking_synthetic, root: " + str(root) + ", split: %s, dataset_kwargs: " + kw + "}"


def test_task_fast_dev_run_trains_one_step(tmp_path):
    spec = _tiny_specs(tmp_path / "data")
    cli = cli_main(["fit", "-c", str(TASK), "--trainer.fast_dev_run=1", "--trainer.accelerator=cpu",
                    f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}",
                    f"--data.init_args.train=[{spec % 'train'}]", f"--data.init_args.val={spec % 'val'}",
                    f"--data.init_args.test={spec % 'test'}", "--data.init_args.num_workers=0",
                    "--data.init_args.batch_size=4"])
    model = cli.model
    assert model.report["trainable"]["adapter"] == 4 * (4 * 64 * 128 + 2 * 64 * (64 + 256))  # r=64, width 64
    assert torch.isfinite(cli.trainer.callback_metrics["train_loss"])
    assert torch.isfinite(cli.trainer.callback_metrics["val_loss"])
    opt = cli.trainer.optimizers[0]
    assert opt.defaults["lr"] == pytest.approx(2e-3) and {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.1}
    # one AdamW step (lr 2e-3 / 32 warm-up steps) moved every trained tensor by about 6e-5 from the model as built
    torch.manual_seed(0)  # what seed_everything: 0 did before the CLI built the model
    built = LoRAT(backbone="tiny_tracking_vit", backbone_kwargs={"seed": 0}, adapter=model.adapter_cfg,
                  template_size=32, search_size=64)
    now, before = dict(model.named_parameters()), dict(built.named_parameters())
    for name, prm in now.items():
        moved = (prm.detach() - before[name].detach()).abs().max().item()
        if prm.requires_grad:
            assert 1e-6 < moved < 1e-3, name
        else:
            assert moved == 0.0, name


@pytest.mark.parametrize("cfg", PAPER, ids=lambda p: p.stem)
def test_paper_config_instantiates_with_only_the_weights_path_removed(cfg):
    raw = yaml.safe_load(cfg.read_text())
    init = raw["model"]["init_args"]
    name, t, s, factor, drop = EXPECTED[cfg.stem.split("_")[1]]
    assert init["backbone_kwargs"]["model_name"] == name and init["backbone_kwargs"]["drop_path_rate"] == drop
    assert init["backbone_kwargs"]["pretrained"].endswith("14_pretrain.pth")
    init["backbone_kwargs"]["pretrained"] = None
    with torch.device("meta"):  # the real ViT-B/L shapes, without the memory
        model = build_model(raw, str(cfg))
    assert (model.template_size, model.search_size, model.x_grid) == (t, s, s // 14)
    cfg_a = model.adapter_cfg
    assert (cfg_a.r, cfg_a.alpha, cfg_a.init, cfg_a.init_std) == (64, 64.0, "trunc_normal", 0.02)
    depth, width = (12, 768) if "base" in name else (24, 1024)
    assert model.trainable_counts()["adapter"] == depth * 64 * (4 * 2 * width + 2 * 5 * width)
    data = raw["data"]["init_args"]
    dm = TrackingPairDataModule(**data)  # datasets are only read in prepare_data: the arguments are checked here
    assert (dm.config.template_size, dm.config.search_size, dm.config.search_area_factor) == (t, s, factor)
    assert dm.batch_size * raw["trainer"]["devices"] == 128 and dm.pairs_per_epoch == 131072
    opt = init["optimizer"]["init_args"]
    assert (opt["lr"], opt["weight_decay"], raw["trainer"]["gradient_clip_val"]) == (1e-4, 0.1, 1.0)


def test_full_finetune_fragment_parses_and_instantiates_tiny():
    with pytest.raises(SystemExit) as e:  # the merged config validates against the CLI's signatures
        cli_main(["fit", "-c", str(PAPER[0]), "-c", str(FULL_FT), "--print_config"])
    assert e.value.code == 0
    raw = yaml.safe_load(PAPER[0].read_text())
    frag = yaml.safe_load(FULL_FT.read_text())
    raw["model"]["init_args"].update(frag["model"]["init_args"])
    raw["model"]["init_args"].update({"backbone": "tiny_tracking_vit", "backbone_kwargs": {}, "template_size": 32,
                                      "search_size": 64})
    model = build_model(raw, str(FULL_FT))
    assert model.finetune and model.adapter_cfg is None and model.layer_decay == 0.7
    assert frag["trainer"]["gradient_clip_val"] == 0.1
    # the whole ViT and the (resized) position grid train
    assert model.trainable_counts()["backbone"] == sum(p.numel() for p in model.vit.parameters()) + 64 * 64
