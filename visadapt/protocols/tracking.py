"""Single-object tracker evaluation: the LoRAT tracker, a template-matching baseline, and ``python -m visadapt track``.

Trackers have two calls: ``init(frame, box)`` with the first frame and its ground-truth box, and ``track(frame) ->
(box, score)`` for every later frame (boxes are ``(x, y, w, h)`` in 0-based frame pixels).

* :class:`LoRATTracker` (LoRAT's one-stream inference, official ``one_stream`` pipeline): the template is cropped
  once from the first frame (area factor 2, no template update) and its tokens are computed once. Every frame is
  cropped around the previous box (area factor 4; 5 for the 378 variants; the box clamped to at least 10 px), the
  score map goes through a sigmoid, the Hann-window penalty ``s' = (1 - 0.45) s + 0.45 hann`` picks the cell, and
  the box regressed at that cell is mapped back to the frame and clipped to it; the unpenalised score is the
  confidence. No scale penalty, no smoothing. By default the adapters are merged and their wrappers removed
  (:func:`~visadapt.methods.lorat.plain_copy`), so the tracker runs a plain ViT.
* :class:`NCCTracker`: a non-learning baseline. The first-frame object (its square context of side
  ``sqrt(w h)``) is a fixed template; each frame it searches a window around the previous box at three scales by
  zero-mean normalised cross-correlation and moves to the best match.

``python -m visadapt track -c tasks/tracking_lorat.yaml --ckpt_path <last.ckpt> --tracker lorat`` runs a tracker over
every sequence of a split, writes the results in the GOT-10k, LaSOT and TrackingNet submission formats, scores them
(SUC, P, P_norm; AO, SR0.5, SR0.75), draws the success and precision plots and measures frames per second. Each
sequence's result is written atomically when it finishes; a rerun skips finished sequences (resume after an
interruption).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from visadapt.data.tracking import CropParams, TrackingSequence, crop_around, crop_image
from visadapt.errors import UserError
from visadapt.methods.lorat import LoRAT, plain_copy
from visadapt.metrics.tracking import CENTER_THRESHOLDS, OVERLAP_THRESHOLDS, got10k_metrics, ope_metrics

__all__ = ["LoRATTracker", "NCCTracker", "SequenceResult", "Tracker", "build_parser", "hann_window", "load_finished",
           "run_sequence", "run_tracker", "track_main", "write_submissions"]

PROG = "python -m visadapt track"
TRACKERS = ("lorat", "untrained", "ncc")


class Tracker(Protocol):
    """What ``track`` runs: ``init`` once, then ``track`` per frame."""

    def init(self, frame: np.ndarray, box: np.ndarray) -> None: ...

    def track(self, frame: np.ndarray) -> tuple[np.ndarray, float]: ...


def hann_window(size: int) -> torch.Tensor:
    """The 2-D Hann window ``(size, size)``: the outer product of two symmetric Hann windows (zero at the edges)."""
    w = torch.hann_window(size, periodic=False, dtype=torch.float64)
    return torch.outer(w, w).float()


def _clip_xywh(box: np.ndarray, width: int, height: int) -> np.ndarray:
    x1, y1 = np.clip(box[0], 0, width), np.clip(box[1], 0, height)
    x2, y2 = np.clip(box[0] + box[2], 0, width), np.clip(box[1] + box[3], 0, height)
    return np.array([x1, y1, x2 - x1, y2 - y1], dtype=np.float64)


def _min_size(box: np.ndarray, minimum: float) -> np.ndarray:
    """The box with w and h raised to at least ``minimum``, about the same centre."""
    cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
    w, h = max(float(box[2]), minimum), max(float(box[3]), minimum)
    return np.array([cx - w / 2, cy - h / 2, w, h], dtype=np.float64)


class LoRATTracker:
    """LoRAT inference on a trained (or untrained) :class:`~visadapt.methods.lorat.LoRAT` module.

    Args:
        model: The LoRAT module.
        template_factor: Area factor of the template crop (2).
        search_factor: Area factor of the search crop (4; 5 for the 378 variants).
        hann_weight: Weight of the Hann-window penalty (0.45).
        min_size: Smallest box side used to crop the search region, in frame pixels (10).
        merge: Merge the adapters into the weights and run a plain ViT (the official inference model).
        device: Where to run the model.
    """

    def __init__(self, model: LoRAT, template_factor: float = 2.0, search_factor: float = 4.0,
                 hann_weight: float = 0.45, min_size: float = 10.0, merge: bool = True,
                 device: str | torch.device = "cpu") -> None:
        self.model = (plain_copy(model) if merge else model).eval().to(device)
        self.device = torch.device(device)
        self.template_factor, self.search_factor = template_factor, search_factor
        self.hann_weight, self.min_size = hann_weight, min_size
        self.t_size, self.s_size = model.template_size, model.search_size
        pre = model.preprocess
        self.mean = torch.tensor(pre.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(pre.std, device=self.device).view(1, 3, 1, 1) * 255.0
        self.window = hann_window(model.x_grid).to(self.device)
        self.z: torch.Tensor | None = None
        self.state: np.ndarray | None = None

    def _tensor(self, crop: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.array(crop, copy=True)).to(self.device).permute(2, 0, 1)[None].float()
        return (x - self.mean) / self.std

    @torch.no_grad()
    def init(self, frame: np.ndarray, box: np.ndarray) -> None:
        box = np.asarray(box, dtype=np.float64)
        crop, params = crop_around(frame, _min_size(box, 1.0), self.template_factor, self.t_size)
        b = params.to_crop(box) / self.t_size
        tbox = torch.tensor([[b[0], b[1], b[0] + b[2], b[1] + b[3]]], dtype=torch.float32, device=self.device)
        self.z = self.model.embed_template(self._tensor(crop), tbox)
        self.state = box

    @torch.no_grad()
    def track(self, frame: np.ndarray) -> tuple[np.ndarray, float]:
        if self.z is None or self.state is None:
            raise RuntimeError("call init(frame, box) first")
        crop, params = crop_around(frame, _min_size(self.state, self.min_size), self.search_factor, self.s_size)
        scores, boxes = self.model.forward_embedded(self.z, self._tensor(crop))
        s = scores[0].sigmoid()
        penalised = (1 - self.hann_weight) * s + self.hann_weight * self.window
        idx = int(penalised.flatten().argmax())
        xyxy = boxes[0].reshape(-1, 4)[idx].double().cpu().numpy() * self.s_size
        box = params.to_frame(np.array([xyxy[0], xyxy[1], xyxy[2] - xyxy[0], xyxy[3] - xyxy[1]]))
        box = _clip_xywh(box, frame.shape[1], frame.shape[0])
        if box[2] > 0 and box[3] > 0 and np.all(np.isfinite(box)):
            self.state = box
        return box, float(s.flatten()[idx])


class NCCTracker:
    """Template matching by zero-mean normalised cross-correlation (non-learning baseline).

    The template is the square context of side ``sqrt(w h)`` around the first-frame box, resampled to
    ``template_size`` pixels; each frame, a window ``search_factor`` times the box's context side is resampled at
    the same scale times each of ``scales`` and correlated with it; the best position and scale give the new box
    (its size times the scale). The score is the best NCC in [-1, 1].

    Args:
        template_size: Side of the resampled template in pixels.
        search_factor: Search window side relative to the template's context side.
        scales: Relative object scales tried per frame.
        scale_penalty: Multiplies the NCC of the scales other than 1 (keeps the size from drifting on flat
            responses).
    """

    def __init__(self, template_size: int = 24, search_factor: float = 2.5,
                 scales: tuple[float, ...] = (0.96, 1.0, 1.04), scale_penalty: float = 0.99) -> None:
        self.template_size, self.search_factor = template_size, search_factor
        self.scales, self.scale_penalty = scales, scale_penalty
        self.template: torch.Tensor | None = None
        self.state: np.ndarray | None = None

    def _sample(self, frame: np.ndarray, cx: float, cy: float, scale: float, size: int,
                fill: np.ndarray) -> torch.Tensor:
        """``size x size`` crop centred on ``(cx, cy)`` at ``scale`` crop px per frame px, as ``(1, 3, size, size)``."""
        params = CropParams((scale, scale), (size / 2 - cx * scale, size / 2 - cy * scale), (size, size))
        crop = crop_image(frame, params, fill)
        return torch.from_numpy(crop.astype(np.float32)).permute(2, 0, 1)[None]

    def init(self, frame: np.ndarray, box: np.ndarray) -> None:
        box = _min_size(np.asarray(box, dtype=np.float64), 1.0)
        self.fill = frame.reshape(-1, 3).mean(0)
        side = math.sqrt(box[2] * box[3])
        t = self._sample(frame, box[0] + box[2] / 2, box[1] + box[3] / 2, self.template_size / side,
                         self.template_size, self.fill)
        t = t - t.mean()
        self.template = t / t.norm().clamp(min=1e-6)
        self.state = box

    @torch.no_grad()
    def track(self, frame: np.ndarray) -> tuple[np.ndarray, float]:
        if self.template is None or self.state is None:
            raise RuntimeError("call init(frame, box) first")
        box = self.state
        cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
        side = math.sqrt(box[2] * box[3])
        t = self.template_size
        n = t * t * 3
        size = round(t * self.search_factor)
        best = (-2.0, 1.0, cx, cy, -2.0)
        for k in self.scales:
            scale = t / (side * k)  # an object k times larger than before fills the template at this scale
            x = self._sample(frame, cx, cy, scale, size, self.fill)
            num = F.conv2d(x, self.template)[0, 0]
            s1 = F.avg_pool2d(x.sum(1, keepdim=True), t, stride=1)[0, 0] * t * t
            s2 = F.avg_pool2d((x * x).sum(1, keepdim=True), t, stride=1)[0, 0] * t * t
            var = (s2 - s1 * s1 / n).clamp(min=1e-6)
            ncc = num / var.sqrt()
            idx = int(ncc.flatten().argmax())
            value = float(ncc.flatten()[idx])
            ranked = value * (1.0 if k == 1.0 else self.scale_penalty)
            if ranked > best[0]:
                i, j = divmod(idx, ncc.shape[1])
                # window centre (j + t/2, i + t/2) in crop pixels -> frame
                fx = cx + (j + t / 2 - size / 2) / scale
                fy = cy + (i + t / 2 - size / 2) / scale
                best = (ranked, k, fx, fy, value)
        _, k, fx, fy, value = best
        w, h = box[2] * k, box[3] * k
        new = _clip_xywh(np.array([fx - w / 2, fy - h / 2, w, h]), frame.shape[1], frame.shape[0])
        if new[2] > 0 and new[3] > 0:
            self.state = np.array([fx - w / 2, fy - h / 2, w, h])
        return new, value


# -- running sequences -------------------------------------------------------------------------------------------


@dataclass
class SequenceResult:
    """A tracker's output on one sequence: boxes ``(N, 4)`` xywh (frame 0 = the ground truth), scores ``(N,)``
    (frame 0: 1), tracker seconds per frame ``(N,)`` (frame 0: ``init``) and image-reading seconds in all."""

    name: str
    boxes: np.ndarray
    scores: np.ndarray
    times: np.ndarray
    load_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "boxes": self.boxes.tolist(), "scores": self.scores.tolist(),
                "times": self.times.tolist(), "load_seconds": self.load_seconds}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SequenceResult:
        return cls(data["name"], np.asarray(data["boxes"], dtype=np.float64).reshape(-1, 4),
                   np.asarray(data["scores"], dtype=np.float64), np.asarray(data["times"], dtype=np.float64),
                   float(data.get("load_seconds", 0.0)))


def run_sequence(tracker: Tracker, seq: TrackingSequence) -> SequenceResult:
    """Run ``tracker`` over every frame of ``seq`` (initialised with its first ground-truth box)."""
    n = len(seq.frames)
    boxes, scores, times = np.zeros((n, 4)), np.zeros(n), np.zeros(n)
    load = 0.0
    for i in range(n):
        t0 = time.perf_counter()
        frame = seq.load_frame(i)
        t1 = time.perf_counter()
        load += t1 - t0
        if i == 0:
            tracker.init(frame, seq.boxes[0])
            boxes[0], scores[0] = seq.boxes[0], 1.0
        else:
            box, score = tracker.track(frame)
            boxes[i], scores[i] = box, score
        times[i] = time.perf_counter() - t1
    return SequenceResult(seq.name, boxes, scores, times, load)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_finished(raw_dir: Path, seq: TrackingSequence) -> SequenceResult | None:
    """The stored result of ``seq`` when a previous run finished it (a readable file with one box per frame)."""
    path = raw_dir / f"{seq.name}.json"
    if not path.is_file():
        return None
    try:
        result = SequenceResult.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError):
        return None
    return result if len(result.boxes) == len(seq.frames) else None


def run_tracker(make_tracker: Any, sequences: list[TrackingSequence], out_dir: Path,
                progress: bool = True) -> tuple[list[SequenceResult], int]:
    """Run a fresh tracker (``make_tracker()``) per sequence, skipping the ones already finished in ``out_dir``.

    Returns the results in sequence order and how many sequences were skipped.
    """
    raw = out_dir / "raw"
    results, skipped = [], 0
    bar = tqdm(sequences, desc="track", unit="seq", disable=not progress)
    for seq in bar:
        done = load_finished(raw, seq)
        if done is not None:
            results.append(done)
            skipped += 1
            continue
        if not seq.fully_annotated and len(seq.boxes) < 1:
            raise UserError(f"sequence {seq.name} has no first-frame box")
        result = run_sequence(make_tracker(), seq)
        _write_atomic(raw / f"{seq.name}.json", json.dumps(result.to_json()))
        results.append(result)
        bar.set_postfix(fps=f"{(len(result.times) - 1) / max(result.times[1:].sum(), 1e-9):.1f}")
    return results, skipped


# -- submission formats ------------------------------------------------------------------------------------------


def _box_lines(boxes: np.ndarray, offset: float = 0.0) -> str:
    return "".join(f"{x + offset:.4f},{y + offset:.4f},{w:.4f},{h:.4f}\n" for x, y, w, h in boxes)


def write_submissions(results: list[SequenceResult], out_dir: Path) -> dict[str, str]:
    """Write the three submission formats under ``out_dir``; returns format -> path.

    * GOT-10k: ``got10k/<seq>/<seq>_001.txt`` (x,y,w,h per line) and ``<seq>_time.txt`` (seconds per frame),
      zipped as ``got10k.zip`` for the evaluation server.
    * LaSOT: ``lasot/<seq>.txt`` with **1-based** x, y (the LaSOT toolkit's convention; visadapt is 0-based).
    * TrackingNet: ``trackingnet/<seq>.txt`` (x,y,w,h per line), zipped as ``trackingnet.zip``.
    """
    paths = {}
    for kind in ("got10k", "lasot", "trackingnet"):
        folder = out_dir / kind
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        for r in results:
            if kind == "got10k":
                (folder / r.name).mkdir()
                (folder / r.name / f"{r.name}_001.txt").write_text(_box_lines(r.boxes))
                (folder / r.name / f"{r.name}_time.txt").write_text("".join(f"{t:.6f}\n" for t in r.times))
            else:
                (folder / f"{r.name}.txt").write_text(_box_lines(r.boxes, 1.0 if kind == "lasot" else 0.0))
        if kind != "lasot":
            paths[f"{kind}_zip"] = shutil.make_archive(str(out_dir / kind), "zip", root_dir=folder)
        paths[kind] = str(folder)
    return paths



# -- scores, plots, report ---------------------------------------------------------------------------------------


def score(results: list[SequenceResult], seqs: list[TrackingSequence], absent: str = "miss") -> dict[str, Any]:
    """OPE scores (SUC, P, P_norm; :func:`~visadapt.metrics.tracking.ope_metrics`) and GOT-10k scores (AO, SR0.5,
    SR0.75; :func:`~visadapt.metrics.tracking.got10k_metrics`) of fully annotated sequences.

    ``absent`` picks the OPE convention for absent frames: ``miss`` (pytracking with absence flags, all frames in the
    denominator), ``exclude`` (LaSOT MATLAB toolkit: removed), ``ignore`` (pytracking without flags).
    """
    by_name = {s.name: s for s in seqs}
    scored = [(r, by_name[r.name]) for r in results if by_name[r.name].fully_annotated]
    if not scored:
        return {"scored_sequences": 0, "note": "no ground truth beyond the first frame (server-scored split): "
                "submit the written result files", "suc": float("nan"), "precision": float("nan"),
                "norm_precision": float("nan"), "ao": float("nan"), "sr50": float("nan"), "sr75": float("nan")}
    preds = [r.boxes for r, _ in scored]
    gts = [s.boxes for _, s in scored]
    convention = "lasot_toolkit" if absent == "exclude" else "pytracking"
    absents = None if absent == "ignore" else [s.absent for _, s in scored]
    ope = ope_metrics(preds, gts, absents, convention=convention)
    got = got10k_metrics(preds, gts, covers=[s.cover for _, s in scored],
                         resolutions=[s.frame_size() for _, s in scored])
    return {
        "scored_sequences": len(scored), "ope_convention": convention, "absent_frames": absent,
        "suc": ope["SUC"], "precision": ope["P"], "norm_precision": ope["P_norm"],
        "ao": got["AO"], "sr50": got["SR0.5"], "sr75": got["SR0.75"],
        "success_curve": ope["success_curve"].tolist(), "precision_curve": ope["precision_curve"].tolist(),
        "norm_precision_curve": ope["norm_precision_curve"].tolist(),
        "per_sequence": {r.name: {"suc": float(np.mean(c["success"])), "ao": float(a)}
                         for (r, _), c, a in zip(scored, ope["per_sequence"], got["per_sequence"])},
    }


def plot_curves(report: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """Success and precision plots (PNG) of one tracker; more curves can be overlaid with :func:`plot_compare`."""
    if "success_curve" not in report:
        return {}
    return plot_compare({report["tracker"]: report}, out_dir)


def plot_compare(reports: dict[str, dict[str, Any]], out_dir: Path, prefix: str = "") -> dict[str, str]:
    """Success (IoU > t) and precision (centre error <= t px) curves of several trackers, one PNG each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind, xs, key, xlabel, metric in (
            ("success", OVERLAP_THRESHOLDS, "success_curve", "overlap threshold", "suc"),
            ("precision", CENTER_THRESHOLDS, "precision_curve", "location error threshold (px)", "precision")):
        fig, ax = plt.subplots(figsize=(4.6, 3.6), dpi=110)
        for name, rep in reports.items():
            if key in rep:
                ax.plot(xs, rep[key], label=f"{name} [{rep[metric]:.3f}]")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("success rate" if kind == "success" else "precision")
        ax.set_title(f"{'Success plot (AUC)' if kind == 'success' else 'Precision plot (at 20 px)'}")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left" if kind == "success" else "lower right", fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{prefix}{kind}.png"
        fig.savefig(path)
        plt.close(fig)
        paths[kind] = str(path)
    return paths


def report_markdown(report: dict[str, Any]) -> str:
    """A short human report of one ``track`` run."""
    lines = [f"# track: {report['tracker']} on {report['data']} ({report['split']})", "",
             f"- config: `{report['config']}`; checkpoint: `{report['ckpt_path']}`",
             (f"- sequences: {report['sequences']} ({report['skipped_finished']} finished earlier, skipped), "
              f"frames tracked: {report['frames']}"),
             (f"- speed: {report['fps']:.1f} frames/s (tracker only, image reading excluded); wall "
              f"{report['wall_seconds']:.1f} s"), ""]
    if report.get("scored_sequences"):
        lines += ["| SUC | P | P_norm | AO | SR0.5 | SR0.75 |", "|---|---|---|---|---|---|",
                  (f"| {report['suc']:.4f} | {report['precision']:.4f} | {report['norm_precision']:.4f} | "
                   f"{report['ao']:.4f} | {report['sr50']:.4f} | {report['sr75']:.4f} |"), "",
                  (f"OPE convention: {report['ope_convention']}, absent frames: {report['absent_frames']}. "
                   "GOT-10k scores: frame-pooled, first frame and cover-0 frames left out."), ""]
    else:
        lines += [str(report.get("note", "")), ""]
    for kind, path in (report.get("plots") or {}).items():
        lines.append(f"![{kind}]({Path(path).name})")
    lines += ["", "Submission files: " + ", ".join(f"`{k}`" for k in report.get("outputs", {})), ""]
    return "\n".join(lines)


# -- the command -------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``track`` command line."""
    p = argparse.ArgumentParser(prog=PROG, description=(__doc__ or "").split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-c", "--config", required=True, help="task YAML (its model and data sections are used)")
    p.add_argument("--ckpt_path", default=None, help="checkpoint written by fit (needed by --tracker lorat)")
    p.add_argument("--tracker", choices=TRACKERS, default="lorat",
                   help="lorat: the trained model; untrained: the same model as built, before training; "
                        "ncc: template matching by normalised cross-correlation (non-learning)")
    p.add_argument("--data", default="task",
                   help="'task': the held-out sequences of the task's datamodule (test_sequences()); otherwise a "
                        "registered tracking dataset (tracking_synthetic, got10k, lasot, trackingnet)")
    p.add_argument("--root", default=None, help="dataset root folder (for --data other than task)")
    p.add_argument("--split", default="test", help="dataset split")
    p.add_argument("--dataset_kwargs", default="{}", help="JSON object of further dataset builder arguments")
    p.add_argument("--max_sequences", type=int, default=None, help="only the first N sequences")
    p.add_argument("--absent", choices=("miss", "exclude", "ignore"), default="miss",
                   help="OPE convention for frames whose object is absent: 'miss' (pytracking / LoRAT's "
                        "Stark-compatible analysis with LaSOT's flags: invalid, counted as misses over all frames), "
                        "'exclude' (the LaSOT MATLAB toolkit: removed from the denominator), 'ignore' (pytracking on "
                        "other datasets: scored against their ground-truth box like any frame)")
    p.add_argument("--out", default=None, help="output folder (default runs/<task>/track/<tracker>_<data>_<split>)")
    p.add_argument("--template_factor", type=float, default=None, help="template area factor (default: the data's)")
    p.add_argument("--search_factor", type=float, default=None, help="search area factor (default: the data's)")
    p.add_argument("--hann_weight", type=float, default=0.45, help="Hann-window penalty weight")
    p.add_argument("--no_merge", action="store_true", help="run the adapters unmerged (same boxes, slower)")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def _read_task(path: str) -> dict[str, Any]:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise UserError(f"task config not found: {file}")
    try:
        cfg = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{file}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise UserError(f"{file}: a task config needs a 'model' section (class_path: visadapt.methods.LoRAT)")
    return cfg


def build_model(cfg: dict[str, Any], source: str) -> LoRAT:
    """Instantiate the task's model section (a :class:`LoRAT`) with jsonargparse, as ``fit`` does."""
    from jsonargparse import ArgumentParser, set_parsing_settings

    from visadapt.adapters import AdapterConfig

    set_parsing_settings(subclasses_enabled=[AdapterConfig])
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LoRAT, "model")
    try:
        parsed = parser.parse_object({"model": cfg["model"]})
    except Exception as err:  # noqa: BLE001 - jsonargparse raises several types; name the file
        raise UserError(f"{source}: the model section does not describe a LoRAT module ({err})") from None
    return parser.instantiate_classes(parsed).model


def build_datamodule(cfg: dict[str, Any], source: str, model: LoRAT) -> Any:
    """Instantiate the task's data section with the model's preprocessing (as ``fit`` links it)."""
    import importlib

    data = cfg.get("data")
    if not isinstance(data, dict) or "class_path" not in data:
        raise UserError(f"{source}: --data task needs a data section with a class_path")
    module, _, name = str(data["class_path"]).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise UserError(f"{source}: data class_path {data['class_path']!r} cannot be imported") from None
    import inspect

    kwargs = dict(data.get("init_args") or {})
    if "preprocess" in inspect.signature(cls).parameters:
        kwargs["preprocess"] = model.preprocess
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise UserError(f"{source}: data section: {err}") from None


def load_trained(model: LoRAT, ckpt_path: str) -> None:
    """Load the trained tensors of a ``fit`` checkpoint into ``model`` (every trained key must be present)."""
    from visadapt.methods.base import MissingCheckpointKeysError, read_checkpoint

    state = read_checkpoint(ckpt_path)["state_dict"]
    missing = sorted(model.trainable_state_keys() - set(state))
    if missing:
        raise MissingCheckpointKeysError(f"{ckpt_path} lacks {len(missing)} trained tensor(s) of this model, e.g. "
                                         f"{missing[:3]}; was it written by this task's config?")
    own = model.state_dict()
    for k, v in state.items():
        if k in own and own[k].shape != v.shape:
            raise UserError(f"{ckpt_path}: tensor {k} has shape {tuple(v.shape)}, the model expects "
                            f"{tuple(own[k].shape)}")
    model.load_state_dict(state, strict=False)


def _sequences(args: argparse.Namespace, cfg: dict[str, Any], model: LoRAT | None) -> tuple[list, dict[str, float]]:
    """The evaluation sequences and the crop factors of the data they come with."""
    factors: dict[str, float] = {}
    if args.data == "task":
        dm = build_datamodule(cfg, args.config, model)
        if hasattr(dm, "prepare_data"):
            dm.prepare_data()
        seqs = list(dm.test_sequences())
        pair_cfg = getattr(dm, "config", None)  # TrackingPairDataModule's PairConfig: the crops it trained on
        for key, attr in (("template_factor", "template_area_factor"), ("search_factor", "search_area_factor")):
            if getattr(pair_cfg, attr, None) is not None:
                factors[key] = float(getattr(pair_cfg, attr))
    else:
        from visadapt.data import DATASETS

        try:
            kwargs = json.loads(args.dataset_kwargs)
        except json.JSONDecodeError as err:
            raise UserError(f"--dataset_kwargs is not a JSON object ({err})") from None
        if args.root is not None:
            kwargs["root"] = args.root
        seqs = list(DATASETS.get(args.data)(split=args.split, **kwargs))
    if args.max_sequences is not None:
        seqs = seqs[: args.max_sequences]
    if not seqs:
        raise UserError(f"no sequences to track ({args.data}, split {args.split})")
    return seqs, factors


def _output_dir(args: argparse.Namespace, cfg: dict[str, Any]) -> Path:
    if args.out:
        return Path(args.out)
    logger = ((cfg.get("trainer") or {}).get("logger") or {})
    name = (logger.get("init_args") or {}).get("name") if isinstance(logger, dict) else None
    task = name or Path(args.config).stem
    data = args.data if args.data != "task" else "task"
    return Path("runs") / task / "track" / f"{args.tracker}_{data}_{args.split}"


def main(argv: list[str]) -> dict[str, Any]:
    """Run ``track``; returns the report (also written to ``report.json`` / ``report.md``)."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = _read_task(args.config)
    seed = int(cfg.get("seed_everything") or 0)
    model = None
    if args.tracker in ("lorat", "untrained") or args.data == "task":
        torch.manual_seed(seed)  # the untrained tracker is the model as fit builds it before its first step
        model = build_model(cfg, args.config)
    if args.tracker == "lorat":
        if not args.ckpt_path:
            raise UserError("--tracker lorat needs --ckpt_path (a checkpoint written by fit); "
                            "--tracker untrained runs the model before training")
        load_trained(model, args.ckpt_path)
    seqs, factors = _sequences(args, cfg, model)
    template_factor = args.template_factor or factors.get("template_factor", 2.0)
    search_factor = args.search_factor or factors.get("search_factor", 4.0)

    if args.tracker == "ncc":
        def make() -> Tracker:
            return NCCTracker()
    else:
        # one merged copy for all sequences: the tracker object itself keeps only per-sequence state
        proto = LoRATTracker(model, template_factor, search_factor, args.hann_weight, merge=not args.no_merge,
                             device=args.device)

        def make() -> Tracker:
            proto.z, proto.state = None, None
            return proto

    out = _output_dir(args, cfg)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results, skipped = run_tracker(make, seqs, out, progress=not args.no_progress)
    wall = time.perf_counter() - t0
    paths = write_submissions(results, out)
    report = score(results, seqs, absent=args.absent)
    frames = sum(len(r.times) - 1 for r in results)
    track_seconds = sum(float(r.times[1:].sum()) for r in results)
    report.update({
        "tracker": args.tracker, "config": args.config, "ckpt_path": args.ckpt_path, "data": args.data,
        "split": args.split, "sequences": len(results), "skipped_finished": skipped, "frames": frames,
        "fps": frames / max(track_seconds, 1e-9),
        "fps_with_init": sum(len(r.times) for r in results) / max(sum(float(r.times.sum()) for r in results), 1e-9),
        "wall_seconds": wall, "merged": not args.no_merge if args.tracker != "ncc" else None,
        "template_factor": template_factor, "search_factor": search_factor, "hann_weight": args.hann_weight,
        "outputs": paths,
    })
    report["plots"] = plot_curves(report, out)
    _write_atomic(out / "report.json", json.dumps(report, indent=1, default=float))
    _write_atomic(out / "report.md", report_markdown(report))
    print(f"visadapt track: {args.tracker} on {len(results)} sequences ({skipped} finished earlier, skipped): "
          f"SUC {report['suc']:.4f}  P {report['precision']:.4f}  P_norm {report['norm_precision']:.4f}  "
          f"AO {report['ao']:.4f}  SR0.5 {report['sr50']:.4f}  SR0.75 {report['sr75']:.4f}  "
          f"FPS {report['fps']:.1f}  -> {out}")
    return report


def track_main(argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point of ``python -m visadapt track`` (``argv`` without the word ``track``)."""
    return main(list(sys.argv[2:] if argv is None else argv))
