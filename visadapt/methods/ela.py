"""Error-level analysis (ELA): the non-learning forensic baseline for manipulation detection.

ELA (Krawetz, 2007) re-saves an image as JPEG and looks at how much each part changes. A region whose compression
history differs from the rest of the photo (pasted from an uncompressed source, retouched, recompressed at another
quality) changes by a different amount than its surroundings. The steps, all fixed:

1. **Re-save** the RGB image as JPEG at ``quality`` (90 by default; PIL, 4:2:0 chroma subsampling) and decode it.
2. **Error map**: the absolute difference to the original, averaged over the three channels (0-255 per pixel).
3. **Block map**: the mean error in each ``block`` x ``block`` tile (8, the JPEG grid), which evens out
   single-pixel noise.
4. **Score** in [0, 1]: ``(p99 - p50) / (p99 + p50 + 1e-6)`` of the block map, the contrast between the most
   deviating blocks and the typical block: 0 when every block changes alike, towards 1 when a few blocks change far
   more than the rest. It ranks images (AUC); as a probability its 0.5 threshold is uncalibrated.
5. **Heatmap** (HxW in [0, 1]): ``clip((E - p50) / (max - p50), 0, 1)`` of the block map ``E``, upsampled to pixels.
6. **Box** (xyxy normalised to [0, 1]): the bounding box of the largest 8-connected group of blocks whose heatmap
   exceeds ``box_threshold`` (0.5); ``None`` when none does.

:func:`evaluate_ela` scores it on a manipulation dataset with the metrics of :mod:`visadapt.metrics.manipulation`,
overall and per editor.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from visadapt.metrics.manipulation import box_metrics, breakdown, per_editor_image_metrics, pixel_scores


class ErrorLevelAnalysis:
    """Error-level analysis with a fixed score, heatmap and box (see the module docstring).

    Args:
        quality: JPEG quality of the re-save.
        block: Side of the tiles the error is averaged over (8: the JPEG grid).
        box_threshold: Heatmap level above which blocks form the predicted region.
    """

    def __init__(self, quality: int = 90, block: int = 8, box_threshold: float = 0.5) -> None:
        if not 1 <= quality <= 100:
            raise ValueError(f"ELA quality must be in 1..100, got {quality}")
        if block < 1:
            raise ValueError(f"ELA block must be >= 1, got {block}")
        self.quality, self.block, self.box_threshold = quality, block, box_threshold

    def error_map(self, image: Image.Image) -> np.ndarray:
        """Per-pixel absolute difference to the JPEG re-save, mean over RGB (float HxW, 0-255)."""
        rgb = image.convert("RGB")
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=self.quality)
        buf.seek(0)
        resaved = np.asarray(Image.open(buf).convert("RGB"), np.float32)
        return np.abs(np.asarray(rgb, np.float32) - resaved).mean(-1)

    def block_map(self, error: np.ndarray) -> np.ndarray:
        """Mean error per ``block`` x ``block`` tile (partial tiles at the right / bottom edge included)."""
        h, w = error.shape
        b = self.block
        hb, wb = -(-h // b), -(-w // b)
        padded = np.full((hb * b, wb * b), np.nan, np.float32)
        padded[:h, :w] = error
        return np.nanmean(padded.reshape(hb, b, wb, b), axis=(1, 3))

    def predict(self, image: Image.Image) -> dict[str, Any]:
        """``{"score": float in [0, 1], "heatmap": HxW float array in [0, 1], "box": [x0, y0, x1, y1] normalised or
        None}`` for one PIL image."""
        from scipy import ndimage

        w, h = image.size
        blocks = self.block_map(self.error_map(image))
        p50, p99, top = np.percentile(blocks, 50), np.percentile(blocks, 99), float(blocks.max())
        score = float((p99 - p50) / (p99 + p50 + 1e-6))
        heat_blocks = np.clip((blocks - p50) / max(top - p50, 1e-6), 0.0, 1.0)
        b = self.block
        heatmap = np.repeat(np.repeat(heat_blocks, b, 0), b, 1)[:h, :w]
        box = None
        labels, n = ndimage.label(heat_blocks > self.box_threshold, structure=np.ones((3, 3)))
        if n:
            largest = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
            ys, xs = np.nonzero(labels == largest)
            box = [xs.min() * b / w, ys.min() * b / h, min((xs.max() + 1) * b, w) / w, min((ys.max() + 1) * b, h) / h]
            box = [float(v) for v in box]
        return {"score": min(max(score, 0.0), 1.0), "heatmap": heatmap.astype(np.float32), "box": box}


def evaluate_ela(dataset: Any, ela: ErrorLevelAnalysis | None = None, threshold: float = 0.5,
                 progress: bool = True) -> dict[str, Any]:
    """Score ELA on a :class:`~visadapt.data.manipulation.ManipulationDataset` (images at their stored size).

    Returns:
        ``image``: ACC / F1 / AUC over the whole set; ``image_per_editor``: each editor's edits against all
        authentic images; ``image_per_category``; ``pixel``: mean per-image F1 / IoU / AUC over the manipulated
        images that have a pixel mask (IMDL-BenCo's rules, authentic images skipped) and ``pixel_per_editor``;
        ``box``: mean IoU and share with IoU >= 0.5 over manipulated images with a box (a missing predicted box
        counts as IoU 0) and ``box_per_editor``; ``n``, ``quality``, ``threshold``.
    """
    from tqdm.auto import tqdm

    ela = ela or ErrorLevelAnalysis()
    scores, labels, editors, categories = [], [], [], []
    pix: dict[str, list[float]] = {"f1": [], "iou": [], "auc": []}
    pix_editors: list[str] = []
    pred_boxes, gt_boxes, box_editors = [], [], []
    for i in tqdm(range(len(dataset)), desc="ELA", disable=not progress):
        s = dataset.sample(i)
        rec = s["record"]
        out = ela.predict(s["image"])
        editor = dataset.editors[i]
        scores.append(out["score"])
        labels.append(rec.label)
        editors.append(editor)
        categories.append(rec.category or ("authentic" if rec.label == 0 else "unknown"))
        if rec.label == 1 and s["has_mask"]:
            ps = pixel_scores(out["heatmap"][None], s["mask"][None], threshold)
            for k, values in pix.items():
                values.append(float(ps[k][0]))
            pix_editors.append(editor)
        if rec.label == 1 and s["box_pixels"] is not None:
            w, h = s["image"].size
            bx = s["box_pixels"]
            gt_boxes.append([bx[0] / w, bx[1] / h, bx[2] / w, bx[3] / h])
            pred_boxes.append(out["box"] or [0.0, 0.0, 0.0, 0.0])
            box_editors.append(editor)
    scores_a, labels_a = np.asarray(scores), np.asarray(labels)
    per_editor = per_editor_image_metrics(scores_a, labels_a, editors, threshold)
    result: dict[str, Any] = {
        "image": per_editor.pop("all"), "image_per_editor": per_editor,
        "image_per_category": per_editor_image_metrics(scores_a, labels_a, categories, threshold),
        "n": len(scores), "quality": ela.quality, "threshold": threshold,
    }
    result["image_per_category"].pop("all")

    def mean_pixels(f1: list, iou: list, auc: list) -> dict[str, float]:
        return {"f1": float(np.mean(f1)), "iou": float(np.mean(iou)), "auc": float(np.nanmean(auc)), "n": len(f1)}

    if pix_editors:
        result["pixel"] = mean_pixels(pix["f1"], pix["iou"], pix["auc"])
        result["pixel_per_editor"] = breakdown(mean_pixels, pix_editors, pix["f1"], pix["iou"], pix["auc"])
    if box_editors:
        result["box"] = box_metrics(pred_boxes, gt_boxes)
        result["box_per_editor"] = breakdown(box_metrics, box_editors, np.asarray(pred_boxes), np.asarray(gt_boxes))
    return result


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table of :func:`evaluate_ela`'s result: one row per editor, then all images."""
    rows = ["| editor | images | AUC | ACC | F1 | pixel F1 | pixel IoU | pixel AUC | box IoU | IoU>=0.5 |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    pixel, box = result.get("pixel_per_editor", {}), result.get("box_per_editor", {})

    def f(d: dict | None, k: str) -> str:
        return f"{d[k]:.3f}" if d and k in d else "-"

    def row(name: str, im: dict, px: dict | None, bx: dict | None) -> str:
        return (f"| {name} | {im['n']} | {f(im, 'auc')} | {f(im, 'acc')} | {f(im, 'f1')} | {f(px, 'f1')} | "
                f"{f(px, 'iou')} | {f(px, 'auc')} | {f(bx, 'iou')} | {f(bx, 'iou50')} |")

    for e, im in result["image_per_editor"].items():
        rows.append(row(e, im, pixel.get(e), box.get(e)))
    rows.append(row("all", result["image"], result.get("pixel"), result.get("box")))
    return "\n".join(rows)


def plot_examples(dataset: Any, path: str, ela: ErrorLevelAnalysis | None = None) -> str:
    """A figure with one column per editor: the authentic twin, the edit, the true mask and box (green), and the ELA
    heatmap with its box (red). Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    ela = ela or ErrorLevelAnalysis()
    first: dict[str, int] = {}
    for i, e in enumerate(dataset.editors):
        if dataset.records[i].label == 1:
            first.setdefault(e, i)
    twins = {r.pair_id: i for i, r in enumerate(dataset.records) if r.label == 0}
    cols = sorted(first)
    fig, axes = plt.subplots(4, len(cols), figsize=(1.6 * len(cols), 6.8), squeeze=False)
    for c, editor in enumerate(cols):
        s = dataset.sample(first[editor])
        real = dataset.sample(twins[s["record"].pair_id])["image"] if s["record"].pair_id in twins else None
        out = ela.predict(s["image"])
        w, h = s["image"].size
        panels = [(real, None, None), (s["image"], None, None), (s["mask"], s["box_pixels"], "lime"),
                  (out["heatmap"], [v * d for v, d in zip(out["box"], (w, h, w, h))] if out["box"] else None, "red")]
        for r, (img, box, colour) in enumerate(panels):
            ax = axes[r, c]
            ax.axis("off")
            if img is None:
                continue
            ax.imshow(img, cmap="gray" if r >= 2 else None, vmin=0, vmax=1 if r >= 2 else None)
            if box is not None:
                ax.add_patch(Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False,
                                       edgecolor=colour, linewidth=1.2))
        axes[0, c].set_title(editor.replace("_", " "), fontsize=8)
        axes[3, c].set_title(f"ELA score {out['score']:.2f}", fontsize=7)
    for r, name in enumerate(("authentic", "edited", "true mask", "ELA heatmap")):
        axes[r, 0].text(-0.08, 0.5, name, transform=axes[r, 0].transAxes, rotation=90, va="center", ha="right",
                        fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=70)
    plt.close(fig)
    buf.seek(0)  # a 128-colour palette keeps the PNG small enough to commit
    Image.open(buf).convert("RGB").quantize(colors=128, method=Image.MEDIANCUT).save(path, optimize=True)
    return path


def main(argv: list[str] | None = None) -> None:
    """``python -m visadapt.methods.ela``: ELA on generated manipulations (or any registered manipulation dataset),
    per editor, as a Markdown table (and JSON with ``--json``)."""
    import argparse
    import json

    from visadapt.data import create_dataset

    ap = argparse.ArgumentParser(prog="python -m visadapt.methods.ela", description=main.__doc__)
    ap.add_argument("--dataset", default="generated_manipulations")
    ap.add_argument("--root", default=None, help="dataset root (cache folder for the generator)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--num-images", type=int, default=200, help="authentic images (generator only)")
    ap.add_argument("--size", type=int, default=224, help="image side (generator only)")
    ap.add_argument("--seed", type=int, default=0, help="generator seed")
    ap.add_argument("--editors", nargs="+", default=None, help="generator editors (default: all)")
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--json", default=None, help="also write the full result to this file")
    ap.add_argument("--plot", default=None, help="also draw one example per editor with its ELA heatmap (PNG)")
    args = ap.parse_args(argv)
    kwargs: dict[str, Any] = {"root": args.root, "split": args.split}
    if args.dataset == "generated_manipulations":
        kwargs.update(num_images=args.num_images, size=args.size, seed=args.seed, editors=args.editors)
    dataset = create_dataset(args.dataset, **kwargs)
    if args.plot:
        print(f"wrote {plot_examples(dataset, args.plot, ErrorLevelAnalysis(args.quality))}")
    result = evaluate_ela(dataset, ErrorLevelAnalysis(args.quality))
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1, default=float)


if __name__ == "__main__":
    main()


__all__ = ["ErrorLevelAnalysis", "evaluate_ela", "format_table", "plot_examples"]
