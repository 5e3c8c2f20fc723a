"""Run a trained ManipShield detector on images: verdict and score, box, cues and explanation, plus an annotated PNG.

Usage::

    python -m visadapt.demo.manipulation IMAGE [IMAGE ...] [--checkpoint FILE] [--out DIR]
    visadapt-manipulation-demo IMAGE [IMAGE ...]          # the same, as an installed console command

Without ``--checkpoint`` the newest checkpoint of the default task (``runs/manipshield/version_N/checkpoints/``,
highest N that has one) is used; when there is none the demo says which command trains one and exits with 2.

Every image is handled on its own: a missing path, a file that is not an image, a truncated file or a
decompression bomb (more than ``--max-pixels`` pixels; PIL's ``DecompressionBombError``) gets a one-line message
naming the file, the other images are still processed, and the final exit code is 1. Exit codes: 0 all images
processed, 1 at least one image failed, 2 no usable checkpoint.
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from pathlib import Path
from typing import Any

DEFAULT_RUNS = Path("runs") / "manipshield"
TRAIN_COMMAND = "python -m visadapt fit -c tasks/manipshield.yaml"
DEFAULT_MAX_PIXELS = 64_000_000
"""Images with more pixels are refused (a 8000 x 8000 photo is allowed; PIL's own default is about 89 M)."""


def latest_checkpoint(runs: Path = DEFAULT_RUNS) -> Path | None:
    """The newest ``*.ckpt`` of the highest ``version_N`` under ``runs`` that has one, or ``None``."""
    if not runs.is_dir():
        return None
    versions = sorted((int(m.group(1)), p) for p in runs.iterdir()
                      if p.is_dir() and (m := re.fullmatch(r"version_(\d+)", p.name)))
    for _, folder in reversed(versions):
        ckpts = sorted((folder / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        if ckpts:
            return ckpts[-1]
    return None


def _load_image(path: Path, max_pixels: int) -> Any:
    """The image as RGB PIL, or a ``ValueError`` whose message names the file and the reason."""
    from PIL import Image

    from visadapt.data.base import load_image

    if not path.exists():
        raise ValueError(f"{path}: no such file")
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, not an image")
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x the limit; refuse those images too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                return load_image(path)
            except Image.DecompressionBombWarning as e:
                raise ValueError(f"refusing image {path}: {e} (a possible decompression bomb; raise --max-pixels if "
                                 "the file is trusted)") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _to_tensor(image: Any, preprocess: Any) -> Any:
    import numpy as np
    import torch
    from PIL import Image

    s = preprocess.image_size
    resample = Image.BICUBIC if preprocess.interpolation == "bicubic" else Image.BILINEAR
    x = torch.from_numpy(np.asarray(image.resize((s, s), resample), dtype=np.float32).copy()).permute(2, 0, 1) / 255
    mean = torch.tensor(preprocess.mean).view(3, 1, 1)
    std = torch.tensor(preprocess.std).view(3, 1, 1)
    return ((x - mean) / std)[None]


def annotate(image: Any, verdict: str, score: float, box: list[float] | None, cues: list[str], out: Path) -> Path:
    """Write ``image`` with the box (pixels) and a caption (verdict, score, cues) to ``out`` (PNG)."""
    from PIL import Image, ImageDraw

    w, h = image.size
    caption = f"{verdict} {score:.2f}" + (f" | {', '.join(cues)}" if cues else "")
    band = max(14, h // 20)
    canvas = Image.new("RGB", (w, h + band), "black")
    canvas.paste(image, (0, band))
    draw = ImageDraw.Draw(canvas)
    colour = (230, 40, 40) if verdict == "MANIPULATED" else (40, 200, 40)
    draw.text((4, 2), caption, fill=colour)
    if box is not None:
        x0, y0, x1, y1 = box
        draw.rectangle([x0, y0 + band, x1, y1 + band], outline=colour, width=max(2, min(w, h) // 150))
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, format="PNG")
    return out


def describe(path: Path, image: Any, pred: dict[str, Any], threshold: float) -> tuple[list[str], dict[str, Any]]:
    """The printed lines and the facts (verdict, score, pixel box, cues) of one prediction."""
    from visadapt.data.manipulation import CUES

    w, h = image.size
    score = float(pred["score"][0])
    verdict = "MANIPULATED" if score > threshold else "AUTHENTIC"
    bx = [float(v) for v in pred["box"][0]]
    box_px = [round(bx[0] * w), round(bx[1] * h), round(bx[2] * w), round(bx[3] * h)]
    cue_p = [float(v) for v in pred["cues"][0]]
    cues = [c for c, p in sorted(zip(CUES, cue_p), key=lambda t: -t[1]) if p > 0.5]
    lines = [f"== {path}", f"verdict: {verdict} (score {score:.3f}, threshold {threshold})"]
    if verdict == "MANIPULATED":
        lines.append(f"box: x0={box_px[0]} y0={box_px[1]} x1={box_px[2]} y1={box_px[3]} (pixels of the "
                     f"{w}x{h} image)")
        lines.append("cues: " + (", ".join(f"{c} {p:.2f}" for c, p in sorted(zip(CUES, cue_p), key=lambda t: -t[1])
                                           if p > 0.5) or "(none above 0.5)"))
    else:
        lines.append("box: none (authentic verdict)")
    lines.append(f"explanation: {pred['text'][0]}")
    return lines, {"verdict": verdict, "score": score, "box": box_px if verdict == "MANIPULATED" else None,
                   "cues": cues if verdict == "MANIPULATED" else []}


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit code (0 ok, 1 some image failed, 2 no usable checkpoint)."""
    parser = argparse.ArgumentParser(prog="visadapt-manipulation-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", type=Path, help="image files (PNG, JPEG, ...)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help=f"ManipShield checkpoint; default: the newest under {DEFAULT_RUNS}/version_N/checkpoints")
    parser.add_argument("--runs", type=Path, default=DEFAULT_RUNS, help="run folder searched without --checkpoint")
    parser.add_argument("--out", type=Path, default=Path("runs") / "manipshield_demo",
                        help="folder for the annotated PNGs")
    parser.add_argument("--threshold", type=float, default=0.5, help="score above which the verdict is manipulated")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="refuse images with more pixels (decompression bombs)")
    args = parser.parse_args(argv)

    ckpt = args.checkpoint or latest_checkpoint(args.runs)
    if ckpt is None:
        print(f"visadapt-manipulation-demo: error: no trained ManipShield checkpoint under {args.runs}/version_N/"
              f"checkpoints; train one with:\n  {TRAIN_COMMAND}\nor pass --checkpoint FILE", file=sys.stderr)
        return 2
    from visadapt.errors import USER_ERROR_TYPES, user_message
    from visadapt.methods.manipshield import ManipShield

    try:
        model = ManipShield.from_checkpoint(ckpt)
    except USER_ERROR_TYPES as e:
        print(f"visadapt-manipulation-demo: error: cannot load checkpoint {ckpt}: {user_message(e)}", file=sys.stderr)
        return 2
    print(f"checkpoint: {ckpt} (LDS layer {int(model.lds_layer_selected)})")
    failed = 0
    for path in args.images:
        try:
            image = _load_image(path, args.max_pixels)
        except ValueError as e:
            print(f"== {path}\nerror: {e}", file=sys.stderr)
            failed += 1
            continue
        pred = model.predict_batch(_to_tensor(image, model.preprocess), explain=True)
        lines, facts = describe(path, image, pred, args.threshold)
        out = annotate(image, facts["verdict"], facts["score"], facts["box"], facts["cues"],
                       args.out / f"{path.stem}_manipshield.png")
        print("\n".join(lines + [f"annotated: {out}"]))
    if failed:
        print(f"{failed} of {len(args.images)} image(s) could not be read", file=sys.stderr)
    return 1 if failed else 0


def cli() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
