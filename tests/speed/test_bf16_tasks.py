"""Every shipped task runs one training step (``fast_dev_run``) under ``precision: bf16-mixed`` on the CPU, with the
same tiny overrides the tasks' own tests use, and its loss comes out finite in that precision."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from visadapt.adapters.base import AdapterLayer
from visadapt.cli import cli_main

ROOT = Path(__file__).resolve().parents[2]
BF16 = str(ROOT / "configs" / "trainer" / "bf16.yaml")
BF16_BASE = str(ROOT / "configs" / "speed" / "bf16_base.yaml")
"""The main task runs with the frozen base stored in bf16 as well (a superset of bf16.yaml: autocast plus the cast)."""


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def dtypes(monkeypatch):
    """The output dtypes of every ``nn.Linear`` and adapter layer called inside the Trainer's training steps."""
    from lightning.pytorch.strategies import Strategy

    seen, inside = {"linear": set(), "adapter": set()}, []

    def training_step(self, *args, _orig=Strategy.training_step, **kwargs):
        inside.append(True)
        try:
            return _orig(self, *args, **kwargs)
        finally:
            inside.pop()

    monkeypatch.setattr(Strategy, "training_step", training_step)
    for key, cls in (("linear", torch.nn.Linear), ("adapter", AdapterLayer)):
        def forward(self, *args, _orig=cls.forward, _key=key, **kwargs):
            out = _orig(self, *args, **kwargs)
            if inside:
                seen[_key].add(out.dtype)
            return out
        monkeypatch.setattr(cls, "forward", forward)
    return seen


def _fit(task: str, tmp_path: Path, *extra: str):
    fragment = ["-c", BF16_BASE] if task == "clip_fewshot" else ["--trainer", BF16]
    return cli_main(["fit", "-c", str(ROOT / "tasks" / f"{task}.yaml"), *fragment, "--trainer.fast_dev_run=1",
                     "--trainer.accelerator=cpu", f"--trainer.logger.init_args.save_dir={tmp_path}",
                     f"--trainer.default_root_dir={tmp_path}", *extra])


def _tracking_spec(root: Path) -> str:
    kw = "{num_sequences: 2, num_frames: 12, frame_size: [160, 120], occlusion_prob: 0.0, out_of_view_prob: 0.0}"
    return "{dataset: tracking_synthetic, root: " + str(root) + ", split: %s, dataset_kwargs: " + kw + "}"


MANIP_PREPROCESS = "{image_size: 64, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}"
TASKS = {
    "clip_fewshot": lambda tmp: ["--data.init_args.image_size=32", "--data.init_args.shots=2",
                                 "--data.init_args.test_per_class=2"],
    "manipshield": lambda tmp: [f"--data.init_args.root={tmp / 'gen'}", "--data.init_args.num_images=5",
                                "--data.init_args.test_images=2", "--data.init_args.dataset_kwargs={size: 64}",
                                "--data.init_args.batch_size=4", "--model.init_args.backbone_kwargs={image_size: 64}",
                                f"--data.init_args.preprocess={MANIP_PREPROCESS}",
                                "--model.init_args.explain_eval_images=2", "--model.init_args.max_new_tokens=4"],
    "tracking_lorat": lambda tmp: [f"--data.init_args.train=[{_tracking_spec(tmp / 'data') % 'train'}]",
                                   f"--data.init_args.val={_tracking_spec(tmp / 'data') % 'val'}",
                                   f"--data.init_args.test={_tracking_spec(tmp / 'data') % 'test'}",
                                   "--data.init_args.num_workers=0", "--data.init_args.batch_size=4"],
    # fast_dev_run leaves no log folder to export the model into: one real step instead
    "t2i_base": lambda tmp: ["--trainer.fast_dev_run=false", "--trainer.max_steps=1", "--trainer.max_time=null",
                             "--data.init_args.dataset_kwargs={limit: 64}",
                             "--data.init_args.batch_size=4", "--model.init_args.eval_seeds=1",
                             "--model.init_args.eval_steps=1"],
    "t2i_decor": lambda tmp: ["--model.init_args.backbone=tiny_sd"],
}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_task_trains_a_step_under_bf16_mixed(task, tmp_path, monkeypatch, dtypes):
    monkeypatch.chdir(tmp_path)
    cli = _fit(task, tmp_path, *TASKS[task](tmp_path))
    assert cli.trainer.precision == "bf16-mixed" and cli.trainer.global_step == 1
    # the matmuls of the training step ran in bf16, the adapted layers' outputs included (t2i_base trains no adapter)
    assert dtypes["linear"] == {torch.bfloat16} and dtypes["adapter"] <= {torch.bfloat16}, dtypes
    assert dtypes["adapter"] or task == "t2i_base"
    assert all(p.dtype == torch.float32 for p in cli.model.parameters() if p.requires_grad)  # fp32 master weights
    if task == "clip_fewshot":  # frozen matmul weights in bf16, the adapters fp32; the fp32 feature passes ran too
        cast = cli.model.report["frozen_base_dtype"]
        assert cast["dtype"] == "bfloat16" and cast["modules"] > 50
        frozen = [p for n, p in cli.model.named_parameters() if n.endswith(".base_layer.weight")]
        assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
        assert "zeroshot" in cli.model.report and "adapted" in cli.model.report
    losses = {k: v for k, v in cli.trainer.callback_metrics.items() if "loss" in k}
    assert losses and all(torch.isfinite(v).all() for v in losses.values()), losses


def test_fscil_task_runs_a_session_under_bf16_mixed(tmp_path, dtypes):
    from visadapt.protocols.fscil import fscil_main

    report = fscil_main(["-c", str(ROOT / "tasks" / "fscil_coact.yaml"), "--trainer", BF16, "--methods=[coact]",
                         "--trainer.accelerator=cpu", "--data.base_classes=3", "--data.sessions=1",
                         "--data.base_shot=4", "--data.shot=2", "--data.test_per_class=2", "--data.image_size=32",
                         "--coact.epochs_base=1", "--coact.ft_start_epoch=0", "--coact.epochs_incremental=1",
                         "--coact.batch_size=4", "--show_progress=false", f"--out_dir={tmp_path}"])
    sessions = report["methods"]["coact"]["sessions"]
    assert len(sessions) == 2 and all(0 <= s["acc"] <= 1 for s in sessions), sessions
    assert dtypes["adapter"] == {torch.bfloat16}, dtypes  # the LoRA'd 1x1 convolutions trained under autocast
