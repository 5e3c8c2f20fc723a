"""Kill ``fit`` with SIGKILL at several points, resume with ``--ckpt_path``, and compare with an uninterrupted run.

The tiny run has 3 epochs of 5 optimiser steps (dropout 0.5 in the adapters, light augmentation, shuffling), and
writes ``last.ckpt`` at steps 3, 6, 9, 12 and at every epoch end. A resumed CPU run must end bit-identical: the same
trained tensors, the same ``metrics.csv`` rows (each logged once), the same report, in the same run folder.
"""

from __future__ import annotations

import math

import pytest
import torch
from fault_helpers import metric_rows, report, run_dir, run_fit, trained_tensors

RESUME = ["--ckpt_path", "runs/tiny/version_0/checkpoints/last.ckpt"]
KILL = "--trainer.callbacks+=fault_helpers.KillAt"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("uninterrupted")
    assert run_fit(cwd) == 0
    return run_dir(cwd)


def _same_rows(a: list[dict[str, str]], b: list[dict[str, str]]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert set(ra) == set(rb)
        for k in ra:
            if ra[k] != rb[k]:
                assert k.endswith("seconds"), (k, ra[k], rb[k])


@pytest.mark.parametrize("point, extra, env, resumed_step", [
    ("mid-epoch (step 7, after the step-6 checkpoint)", [KILL, "--trainer.callbacks.init_args.step=7"], {}, 6),
    ("between epochs (start of epoch 2)", [KILL, "--trainer.callbacks.init_args.epoch=2"], {}, 10),
    ("during the 3rd checkpoint write (step 6)", [], {"VISADAPT_FAULT_KILL_IN_CKPT_WRITE": "3"}, 5),
])
def test_killed_fit_resumes_bit_identical(tmp_path, reference, point, extra, env, resumed_step):
    assert run_fit(tmp_path, *extra, env=env) == -9, point
    folder = run_dir(tmp_path)
    ckpt = folder / "checkpoints" / "last.ckpt"
    assert ckpt.is_file(), f"{point}: the kill left no last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == resumed_step
    assert run_fit(tmp_path, *RESUME) == 0
    assert not (run_dir(tmp_path, 1)).exists(), "the resumed run must continue version_0, not open version_1"
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["last.ckpt"], "orphaned temporary files"
    want, got = trained_tensors(reference / "checkpoints" / "last.ckpt"), trained_tensors(ckpt)
    assert want.keys() == got.keys() and want
    for k in want:
        assert torch.equal(want[k], got[k]), f"{point}: {k} differs from the uninterrupted run"
    _same_rows(metric_rows(reference), metric_rows(folder))
    a, b = report(reference), report(folder)
    assert a["adapted"] == b["adapted"] and a["adapted_val_acc"] == b["adapted_val_acc"]
    # train_seconds covers the whole run: the time before the kill plus the resumed part
    assert b["train_seconds"] > 0 and math.isfinite(b["train_seconds"])
