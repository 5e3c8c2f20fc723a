"""The manipulation demo: output and exit codes on a manipulated and an authentic image, a broken file, a truncated
file, a decompression bomb, a missing path, and without any trained checkpoint."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from visadapt.demo.manipulation import latest_checkpoint, main

ROOT = Path(__file__).resolve().parents[2]


def _images(trained) -> tuple[Path, Path]:
    ds = trained["dm"].test_set
    manipulated = next(r.image for r in ds.records if r.label == 1)
    authentic = next(r.image for r in ds.records if r.label == 0)
    return Path(manipulated), Path(authentic)


def test_demo_good_images_broken_file_and_missing_path(trained, tmp_path, capsys):
    manipulated, authentic = _images(trained)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not an image\n")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(manipulated.read_bytes()[:300])
    bomb = tmp_path / "bomb.png"
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(bomb)  # 90,000 pixels > --max-pixels 40,000
    missing = tmp_path / "nope.jpg"
    out = tmp_path / "out"
    code = main([str(manipulated), str(broken), str(truncated), str(bomb), str(missing), str(authentic),
                 "--checkpoint", str(trained["ckpt"]), "--out", str(out), "--max-pixels", "40000"])
    captured = capsys.readouterr()
    assert code == 1
    # both good images are processed, even after the failures
    for good in (manipulated, authentic):
        block = captured.out.split(f"== {good}\n", 1)[1].split("== ", 1)[0]
        assert block.startswith("verdict: ") and "explanation: " in block and "box: " in block
        png = out / f"{good.stem}_manipshield.png"
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size[0] == 32 and im.size[1] > 32  # caption band on top
    assert f"cannot decode image {broken}" in captured.err
    assert f"cannot decode image {truncated}" in captured.err and "truncated" in captured.err
    assert f"refusing image {bomb}" in captured.err and "decompression bomb" in captured.err
    assert f"{missing}: no such file" in captured.err
    assert "4 of 6 image(s) could not be read" in captured.err


def test_demo_uses_the_latest_run_and_exits_0(trained, tmp_path, capsys):
    runs = tmp_path / "runs" / "manipshield"
    for v in (0, 3):  # version_3 has the checkpoint; version_10 has none
        (runs / f"version_{v}" / "checkpoints").mkdir(parents=True)
    (runs / "version_10").mkdir()
    shutil.copy(trained["ckpt"], runs / "version_3" / "checkpoints" / "last.ckpt")
    assert latest_checkpoint(runs) == runs / "version_3" / "checkpoints" / "last.ckpt"
    manipulated, _ = _images(trained)
    assert main([str(manipulated), "--runs", str(runs), "--out", str(tmp_path / "o")]) == 0
    assert f"checkpoint: {runs / 'version_3' / 'checkpoints' / 'last.ckpt'}" in capsys.readouterr().out


def test_demo_without_a_trained_run_says_how_to_train_one(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "visadapt.demo.manipulation", "x.png", "--runs",
                           str(tmp_path / "none")], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 2
    assert "python -m visadapt fit -c tasks/manipshield.yaml" in proc.stderr
    assert "no trained ManipShield checkpoint" in proc.stderr


def test_demo_refuses_a_corrupt_checkpoint(trained, tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(trained["ckpt"].read_bytes()[:1000])
    manipulated, _ = _images(trained)
    assert main([str(manipulated), "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "cannot load checkpoint" in err and str(bad) in err
