"""ManipShield test setup: one thread, tiny generated data, and one tiny trained checkpoint shared by the tests.

``trained`` trains the tiny VLM (``tiny_vlm``: two-stage CNN -> MLP -> three-layer GPT-2 of width 32) with a
Lightning Trainer on 24 generated groups at 32 px (train editors: all but splicing; test: splicing), and keeps the
per-step losses, the checkpoint and the datamodule.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

TRAIN_EPOCHS = 7
"""Whole epochs (5 batches each): the last checkpoint then holds the final weights."""


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test of this folder runs on one torch thread (``one_thread`` in tests/conftest.py)."""


def tiny_datamodule(root: Path, num_images: int = 24, seed: int = 0, batch_size: int = 8):
    from visadapt.backbones.vlm import assembled_preprocess
    from visadapt.data.manipulation import ManipulationDataModule

    return ManipulationDataModule(root=str(root), dataset_kwargs={"size": 32}, num_images=num_images,
                                  test_images=8, test_editors=["splicing"], batch_size=batch_size, eval_batch_size=16,
                                  val_fraction=0.25, seed=seed,
                                  preprocess=assembled_preprocess("tiny_vlm", image_size=32))


@pytest.fixture(scope="session")
def gen_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("manip_cache")


@pytest.fixture(scope="session")
def trained(tmp_path_factory, gen_root):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from visadapt.adapters import LoRAConfig
    from visadapt.methods.manipshield import ManipShield

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("manipshield_run")
    pl.seed_everything(0)
    dm = tiny_datamodule(gen_root)
    model = ManipShield(backbone="tiny_vlm", vision_adapter=LoRAConfig(target="tiny_conv_1x1", r=4, alpha=4.0),
                        lds_at_step=12, lds_probe_images=16, explain_eval_images=4, max_new_tokens=24,
                        eval_ela=True, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    trainer = pl.Trainer(max_epochs=TRAIN_EPOCHS, accelerator="cpu", devices=1, num_sanity_val_steps=0,
                         log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                         logger=CSVLogger(out, name="manipshield"), check_val_every_n_epoch=1000,
                         callbacks=[ModelCheckpoint(save_last=True, save_on_train_epoch_end=True)])
    trainer.fit(model, dm)
    torch.set_num_threads(before)
    log_dir = Path(trainer.log_dir)
    rows = list(csv.DictReader((log_dir / "metrics.csv").open()))
    ckpt = log_dir / "checkpoints" / "last.ckpt"
    return {"model": model, "dm": dm, "rows": rows, "ckpt": ckpt, "log_dir": log_dir, "runs": log_dir.parent}
