"""Helpers of the fault suite: run the CLI in a child process, kill it with SIGKILL at a chosen point, and read
what a run left on disk.

The child is *spawned*, not forked: a fork taken after torch has started its OpenMP thread pool (any earlier test in
the same pytest process) deadlocks in the child's first parallel kernel."""

from __future__ import annotations

import csv
import multiprocessing as mp
import os
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

HERE = Path(__file__).resolve().parent
TINY_FIT = HERE / "tiny_fit.yaml"


class KillAt(pl.Callback):
    """SIGKILLs the process at a point of ``fit``: after optimiser step ``step`` (mid-epoch), or at the start of
    epoch ``epoch`` (between epochs, after the previous epoch's checkpoint)."""

    def __init__(self, step: int | None = None, epoch: int | None = None) -> None:
        self.step, self.epoch = step, epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.step is not None and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.epoch is not None and trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)


def _child(cwd: str, args: list[str], env: dict[str, str]) -> None:
    os.chdir(cwd)
    os.environ.update(env)
    from visadapt.cli import cli_main

    try:
        cli_main(args)
    except SystemExit as e:
        os._exit(int(e.code or 0))
    except BaseException:
        import traceback

        traceback.print_exc()
        os._exit(3)
    os._exit(0)


def run_fit(cwd: Path, *extra: str, env: dict[str, str] | None = None, timeout: float = 600) -> int:
    """``python -m visadapt fit -c tiny_fit.yaml *extra`` in a spawned child in ``cwd``; returns its exit code
    (``-9`` when it was killed)."""
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_child, args=(str(cwd), ["fit", "-c", str(TINY_FIT), *extra], dict(env or {})))
    p.start()
    p.join(timeout)
    if p.is_alive():
        p.kill()
        raise TimeoutError(f"fit did not finish in {timeout} s")
    return p.exitcode


def run_dir(cwd: Path, version: int = 0) -> Path:
    return cwd / "runs" / "tiny" / f"version_{version}"


def trained_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def metric_rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def report(folder: Path) -> dict[str, Any]:
    import json

    return json.loads((folder / "report.json").read_text())
