"""The LoRAT tracker (merged == unmerged), the template-matching baseline, and `track` (formats, resume)."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from visadapt.adapters import adapter_layers, disable_adapters
from visadapt.data.tracking import tracking_synthetic
from visadapt.methods.lorat import LoRAT
from visadapt.protocols.tracking import LoRATTracker, NCCTracker, hann_window, run_sequence, track_main

TINY_DATA = {"num_sequences": 2, "num_frames": 8, "frame_size": [160, 120], "seed": 5, "occlusion_prob": 0.0,
             "out_of_view_prob": 0.0}


@pytest.fixture(scope="module")
def sequences(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return list(tracking_synthetic(root=str(root), split="test", **TINY_DATA))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = LoRAT(backbone="tiny_tracking_vit", template_size=32, search_size=64)
    with torch.no_grad():  # make the adapters matter: a large update on every adapted matrix
        for name, prm in m.named_parameters():
            if name.endswith("lora_B"):
                prm.mul_(40.0)
    return m.eval()


def test_merged_and_unmerged_trackers_give_the_same_boxes(model, sequences):
    s = sequences[0]  # its first 6 frames keep the test short
    seq = replace(s, frames=s.frames[:6], boxes=s.boxes[:6], absent=s.absent[:6], cover=None)
    merged = run_sequence(LoRATTracker(model, merge=True), seq)
    unmerged = run_sequence(LoRATTracker(model, merge=False), seq)
    assert not any(layer.merged for _, layer in adapter_layers(model))  # merging worked on a copy
    np.testing.assert_allclose(merged.boxes, unmerged.boxes, atol=1e-3)
    np.testing.assert_allclose(merged.scores, unmerged.scores, atol=1e-4)
    # ...and the adapters do change the boxes: with them disabled the tracker goes elsewhere
    with disable_adapters(model):
        base = run_sequence(LoRATTracker(model, merge=False), seq)
    # (the random head sends both to the full frame after the first tracked frame, so the bound is the merge
    # tolerance: without the adapters the boxes move at least 20 times farther than merging is allowed to)
    assert np.abs(base.boxes - merged.boxes).max() > 20 * 1e-3


def test_hann_window_is_the_outer_product_of_symmetric_windows():
    np.testing.assert_allclose(hann_window(16).numpy(), np.outer(np.hanning(16), np.hanning(16)), atol=1e-7)


def test_ncc_tracker_follows_a_translated_texture():
    yy, xx = np.mgrid[0:30, 0:24]
    smooth = [np.cos(xx / 3.0 + c) * np.sin(yy / 4.0 - c) for c in (0.0, 1.0, 2.0)]  # survives resampling
    patch = (128 + 100 * np.stack(smooth, -1)).astype(np.uint8)
    frame0 = np.full((120, 160, 3), 128, np.uint8)
    frame0[40:70, 50:74] = patch
    frame1 = np.full_like(frame0, 128)
    frame1[45:75, 56:80] = patch  # moved by (+6, +5)
    tracker = NCCTracker()
    tracker.init(frame0, np.array([50.0, 40.0, 24.0, 30.0]))
    box, score = tracker.track(frame1)
    assert score > 0.9
    np.testing.assert_allclose(box[:2], [56.0, 45.0], atol=1.5)
    np.testing.assert_allclose(box[2:], [24.0, 30.0], rtol=0.05)


def _task_yaml(tmp_path: Path) -> Path:
    cfg = tmp_path / "task.yaml"
    cfg.write_text(
        "seed_everything: 3\n"
        "model:\n  class_path: visadapt.methods.LoRAT\n  init_args:\n    backbone: tiny_tracking_vit\n"
        "    template_size: 32\n    search_size: 64\n")
    return cfg


def test_track_writes_the_formats_and_resumes_by_skipping_finished_sequences(tmp_path, sequences):
    root = sequences[0].frames[0].parents[2]  # <root>/test/<seq>/00000001.jpg
    out = tmp_path / "out"
    args = ["-c", str(_task_yaml(tmp_path)), "--tracker", "untrained", "--data", "tracking_synthetic",
            "--root", str(root), "--split", "test", "--dataset_kwargs", json.dumps(TINY_DATA), "--out", str(out),
            "--no_progress"]
    first = track_main(args)
    names = [s.name for s in sequences]
    assert first["sequences"] == 2 and first["skipped_finished"] == 0 and first["frames"] == 2 * 7
    for key in ("suc", "precision", "norm_precision", "ao", "sr50", "sr75"):
        assert 0.0 <= first[key] <= 1.0
    raw0 = json.loads((out / "raw" / f"{names[0]}.json").read_text())
    got = np.loadtxt(out / "got10k" / names[0] / f"{names[0]}_001.txt", delimiter=",")
    lasot = np.loadtxt(out / "lasot" / f"{names[0]}.txt", delimiter=",")
    np.testing.assert_allclose(got, raw0["boxes"], atol=1e-4)
    np.testing.assert_allclose(lasot[:, :2] - 1.0, got[:, :2], atol=1e-4)  # LaSOT files are 1-based
    np.testing.assert_allclose(got[0], sequences[0].boxes[0], atol=1e-4)
    assert (out / "got10k.zip").is_file() and (out / "trackingnet.zip").is_file()
    assert (out / "success.png").is_file() and (out / "precision.png").is_file()
    assert len((out / "got10k" / names[0] / f"{names[0]}_time.txt").read_text().split()) == 8

    # interruption: the second sequence never finished, the first did (marked so a recomputation would show)
    (out / "raw" / f"{names[1]}.json").unlink()
    raw0["scores"] = [0.123] * len(raw0["scores"])
    (out / "raw" / f"{names[0]}.json").write_text(json.dumps(raw0))
    shutil.rmtree(out / "got10k")
    second = track_main(args)
    assert second["skipped_finished"] == 1 and second["sequences"] == 2
    assert json.loads((out / "raw" / f"{names[0]}.json").read_text())["scores"][1] == 0.123  # not re-run
    assert second["suc"] == pytest.approx(first["suc"], abs=1e-12)  # the re-run sequence is deterministic
    assert (out / "got10k" / names[1] / f"{names[1]}_001.txt").is_file()


def test_lorat_tracker_needs_a_checkpoint(tmp_path):
    from visadapt.errors import UserError

    with pytest.raises(UserError, match="--ckpt_path"):
        track_main(["-c", str(_task_yaml(tmp_path)), "--tracker", "lorat", "--data", "tracking_synthetic"])
