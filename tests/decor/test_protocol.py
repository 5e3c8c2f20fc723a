"""``fit`` / ``generate`` / ``t2i_sweep`` through the command line on a tiny random pipeline: the LoRA file of a fit
is found and loaded, the grid is written, DECOR changes the images, and an interrupted sweep resumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from visadapt.cli import cli_main

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning",
                                        "ignore:.*does not have many workers.*", "ignore:.*LeafSpec.*",
                                        "ignore:.*eval mode.*")
ROOT = Path(__file__).resolve().parents[2]


def _task(tmp_path: Path) -> Path:
    folder = tmp_path / "subject"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    cfg = yaml.safe_load((ROOT / "tasks" / "t2i_decor.yaml").read_text())
    cfg["trainer"].update(max_steps=2, accelerator="cpu", enable_progress_bar=False, check_val_every_n_epoch=1)
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    init = cfg["model"]["init_args"]
    init["backbone"] = "tiny_sd"
    init["evaluation"].update(prompts=["a red sks cube", "a sks cube"], undesired=["red"], seeds=[0, 1], steps=2,
                              metric_backbone="tiny_open_clip",
                              metric_backbone_kwargs={"seed": 0}, alphas=[0.0, 0.5, 1.0])
    cfg["data"]["init_args"].update(dataset="dreambooth", dataset_kwargs={}, root=str(folder), batch_size=2, repeats=1,
                                    instance_prompt="a sks cube")
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_fit_generate_and_a_resumed_sweep(tmp_path, capsys):
    task = _task(tmp_path)
    cli = cli_main(["fit", "-c", str(task)])
    lora = Path(cli.model.lora_file)
    assert lora.name == "pytorch_lora_weights.safetensors" and lora.is_file()

    grid = cli_main(["generate", "-c", str(task), "--prompt", '["a red sks cube"]', "--alpha", "[0, 1]",
                     "--out", str(tmp_path / "g.png")])
    img = np.asarray(Image.open(grid))
    # one prompt x two alphas = 2 rows, two seeds = 2 columns, 16x16 images enlarged 6x, 2-pixel gutters
    assert img.shape == (2 * 96 + 3 * 2, 2 * 96 + 3 * 2, 3)
    row0, row1 = img[2 : 2 + 96], img[100 : 100 + 96]
    assert np.abs(row0.astype(int) - row1.astype(int)).max() > 0  # alpha = 1 changes the images
    assert "loaded" in capsys.readouterr().out

    out = tmp_path / "sweep"
    first = cli_main(["t2i_sweep", "-c", str(task), "--out", str(out)])
    cells = sorted((out / "cells").glob("*.npz"))
    assert len(cells) == 3 * 2 and first["reused_cells"] == 0
    for name in ("table.md", "table.json", "pareto.png", "grid.png"):
        assert (out / name).is_file()
    assert "NOT CLIP" not in capsys.readouterr().out  # the tiny metric model is no DeViSE preset
    rows = first["rows"]
    assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0]
    assert all(-1 <= r["clip_t"] <= 1 and -1 <= r["clip_i"] <= 1 for r in rows)
    # the task's colour match: scored for "a red sks cube", not counted for "a sks cube" (no colour named)
    assert all(0 <= r["colour_match"] <= 1 and r["per_prompt"][1]["colour_match"] is None for r in rows)
    assert all(r["colour_match"] == r["per_prompt"][0]["colour_match"] for r in rows)
    assert first["text_axis"] == "colour_match" and "colour match" in (out / "table.md").read_text()

    # interrupt: one cell lost, one left half-written (a temporary file), the rest finished
    stamps = {c.name: c.stat().st_mtime_ns for c in cells}
    with np.load(cells[0]) as z:
        lost = z["images"].copy()
    cells[0].unlink()
    (out / "cells" / "a0.500_p000.tmp-999.npz").write_bytes(b"partial")
    again = cli_main(["t2i_sweep", "-c", str(task), "--out", str(out)])
    assert again["reused_cells"] == len(cells) - 1
    for c in cells[1:]:
        assert c.stat().st_mtime_ns == stamps[c.name]  # finished cells are not regenerated
    with np.load(cells[0]) as z:
        np.testing.assert_array_equal(z["images"], lost)  # fixed seeds: the regenerated cell is the lost one
    # so the table is unchanged
    assert json.loads((out / "table.json").read_text())["rows"] == json.loads(json.dumps(first["rows"]))

    # a cell written by a sweep without the colour match is rescored, not regenerated
    assert cells[2].name == "a0.500_p000.npz"  # "a red sks cube" at alpha 0.5: a colour match to recompute
    with np.load(cells[2]) as z:
        images, meta = z["images"].copy(), str(z["meta"])
    scores = json.loads(json.dumps(first["rows"][1]["per_prompt"][0]))
    assert scores.pop("colour_match") is not None
    np.savez(cells[2], images=images, scores=json.dumps(scores), meta=meta)
    third = cli_main(["t2i_sweep", "-c", str(task), "--out", str(out)])
    assert third["reused_cells"] == len(cells) and third["rows"] == first["rows"]


def test_generate_needs_undesired_for_alpha_and_a_lora(tmp_path):
    task = _task(tmp_path)
    from visadapt.errors import UserError

    with pytest.raises(UserError, match="no LoRA found"):
        cli_main(["generate", "-c", str(task), "--alpha", "[0]"])
    out = cli_main(["generate", "-c", str(task), "--no_lora", "true", "--alpha", "[0]", "--num", "2",
                    "--save_images", str(tmp_path / "class"), "--out", str(tmp_path / "c.png")])
    assert out.is_file() and len(list((tmp_path / "class").glob("*.png"))) == 2 * 2  # 2 prompts x 2 images
    with pytest.raises(UserError, match="undesired"):
        cli_main(["generate", "-c", str(task), "--no_lora", "true", "--alpha", "[1]", "--undesired", "[]",
                  "--out", str(tmp_path / "d.png")])
