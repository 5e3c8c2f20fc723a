"""Single-object tracking metrics (pure NumPy): OPE success / precision / normalised precision, and GOT-10k AO / SR.

Boxes are ``(N, 4)`` ``(x, y, w, h)`` arrays. The toolkits disagree on details that move the third decimal, so every
function takes an explicit ``convention``:

``"pytracking"`` (default; pytracking's ``analysis/extract_results.py``, the Stark copy, and LoRAT's "compatible"
handler, which LoRAT reports)
    Pixel-inclusive IoU (``x2 = x + w - 1``, intersection ``+ 1``); centre ``x + (w - 1) / 2``; the first prediction
    is replaced by the ground truth; a prediction with zero width or height is replaced by the previous one. A frame
    is *valid* when its ground truth has ``w, h > 0`` (``valid_rule="wh"``, Stark; ``"all4"``: all four
    coordinates > 0, the pytracking commit LoRAT's README cites; coordinates are tested 1-based, i.e. ``x + 1 > 0``
    for our 0-based boxes, as the toolkit sees LaSOT files). Invalid frames get IoU -1 (a miss), centre error inf (a
    miss) and normalised centre error -1 (which counts as a **hit** at every threshold, a pytracking quirk kept for
    parity). With ``absent`` given (pytracking passes it for LaSOT only: full occlusion or out of view) absent frames
    are invalid too and both centre errors are inf. The denominator is **all frames**
    (``exclude_invalid_frames=False``, LoRAT's default) or the valid ones.
``"lasot_toolkit"`` (the official LaSOT MATLAB toolkit, ``calc_seq_err_robust.m``)
    Absent frames are **removed** before anything is computed (out of the denominator). A prediction that is NaN or
    has ``w <= 0`` or ``h <= 0`` is replaced by the previous one; the first by the ground truth. Pixel-inclusive IoU.
    Ground truth with any coordinate <= 0 (1-based) gets IoU -1 (a miss) and centre error -1 (a hit).
``"got10k"`` (the ``got10k`` PyPI toolkit's OTB-style experiment)
    Continuous IoU ``inter / (union + eps)`` clipped to [0, 1]; centre ``x + (w - 1) / 2``; the first prediction is
    replaced by the ground truth; no validity handling; all frames count.

All three use 21 overlap thresholds ``0, 0.05, ..., 1`` with ``IoU > t``, 51 pixel thresholds ``0..50`` with
``error <= t`` (P is the value at 20 px) and 51 normalised thresholds ``0, 0.01, ..., 0.5`` (P_norm at 0.20).
SUC (AUC) is the mean of the success curve averaged over sequences.

GOT-10k (:func:`got10k_metrics`, as ``got10k.experiments.ExperimentGOT10k.report``): the first frame is left out,
frames with ``cover == 0`` are left out, boxes are clipped to the image resolution, IoUs are pooled over all frames of
all sequences (frame-weighted); AO is their mean, SR_t the fraction above t; the success curve has 101 thresholds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CONVENTIONS = ("pytracking", "lasot_toolkit", "got10k")
OVERLAP_THRESHOLDS = np.linspace(0.0, 1.0, 21)
"""21 thresholds 0, 0.05, ..., 1 (got10k's ``np.linspace``)."""
PYTRACKING_OVERLAP_THRESHOLDS = np.arange(21) * 0.05
PYTRACKING_OVERLAP_THRESHOLDS[[13, 15]] = np.nextafter(PYTRACKING_OVERLAP_THRESHOLDS[[13, 15]], 2.0)
"""The same 21 thresholds as pytracking builds them (``torch.arange(0, 1.05, 0.05, dtype=float64)``: 0.65 and 0.75
come out one ulp higher than in ``np.linspace``, which decides IoUs that equal them exactly)."""
CENTER_THRESHOLDS = np.arange(0, 51, dtype=np.float64)
"""51 pixel thresholds 0..50; P is read at index 20 (20 px)."""
NORM_CENTER_THRESHOLDS = np.arange(0, 51, dtype=np.float64) / 100.0
"""51 normalised thresholds 0..0.5; P_norm is read at index 20 (0.20)."""
GOT10K_THRESHOLDS = np.linspace(0.0, 1.0, 101)
"""GOT-10k's 101 success-curve thresholds."""


def _boxes(b: np.ndarray, name: str) -> np.ndarray:
    b = np.array(b, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"{name} must be an (N, 4) array of x, y, w, h; got shape {b.shape}")
    return b


def iou(pred: np.ndarray, gt: np.ndarray, pixel_inclusive: bool = False,
        bound: tuple[float, float] | None = None) -> np.ndarray:
    """Per-frame IoU of ``(N, 4)`` xywh boxes.

    Args:
        pixel_inclusive: pytracking / LaSOT-toolkit IoU (``x2 = x + w - 1``, intersection side ``+ 1``, no epsilon);
            otherwise got10k's continuous IoU (``inter / (union + eps)``, clipped to [0, 1]).
        bound: ``(width, height)``: clip both boxes to the image first (got10k's ``rect_iou(..., bound=...)``).
    """
    p, g = _boxes(pred, "pred"), _boxes(gt, "gt")
    if len(p) != len(g):
        raise ValueError(f"{len(p)} predictions for {len(g)} ground-truth boxes")
    if bound is not None:
        for r in (p, g):
            r[:, 0] = np.clip(r[:, 0], 0, bound[0])
            r[:, 1] = np.clip(r[:, 1], 0, bound[1])
            r[:, 2] = np.clip(r[:, 2], 0, bound[0] - r[:, 0])
            r[:, 3] = np.clip(r[:, 3], 0, bound[1] - r[:, 1])
    if pixel_inclusive:
        tl = np.maximum(p[:, :2], g[:, :2])
        br = np.minimum(p[:, :2] + p[:, 2:] - 1.0, g[:, :2] + g[:, 2:] - 1.0)
        inter = np.clip(br - tl + 1.0, 0, None).prod(1)
        union = p[:, 2:].prod(1) + g[:, 2:].prod(1) - inter
        with np.errstate(divide="ignore", invalid="ignore"):
            return inter / union
    x1 = np.maximum(p[:, 0], g[:, 0])
    y1 = np.maximum(p[:, 1], g[:, 1])
    x2 = np.minimum(p[:, 0] + p[:, 2], g[:, 0] + g[:, 2])
    y2 = np.minimum(p[:, 1] + p[:, 3], g[:, 1] + g[:, 3])
    inter = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    union = p[:, 2:].prod(1) + g[:, 2:].prod(1) - inter
    return np.clip(inter / (union + np.finfo(float).eps), 0.0, 1.0)


def centers(boxes: np.ndarray) -> np.ndarray:
    """Box centres as the toolkits compute them: ``x + (w - 1) / 2``, ``y + (h - 1) / 2``."""
    b = _boxes(boxes, "boxes")
    return b[:, :2] + (b[:, 2:] - 1.0) / 2.0


def center_error(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Euclidean distance between centres, in pixels."""
    return np.sqrt(((centers(pred) - centers(gt)) ** 2).sum(1))


def normalized_center_error(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Centre distance with both centres divided by the ground-truth ``w, h`` (TrackingNet's normalisation)."""
    g = _boxes(gt, "gt")
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt((((centers(pred) - centers(g)) / g[:, 2:]) ** 2).sum(1))


def success_curve(ious: np.ndarray, thresholds: np.ndarray = OVERLAP_THRESHOLDS,
                  denominator: float | None = None) -> np.ndarray:
    """Fraction of frames with ``IoU > t`` for each threshold (``denominator`` defaults to the frame count)."""
    ious = np.asarray(ious, dtype=np.float64).reshape(-1, 1)
    n = len(ious) if denominator is None else denominator
    return (ious > np.asarray(thresholds)[None]).sum(0) / n if n else np.full(len(thresholds), np.nan)


def precision_curve(errors: np.ndarray, thresholds: np.ndarray = CENTER_THRESHOLDS,
                    denominator: float | None = None) -> np.ndarray:
    """Fraction of frames with ``error <= t`` for each threshold."""
    errors = np.asarray(errors, dtype=np.float64).reshape(-1, 1)
    n = len(errors) if denominator is None else denominator
    return (errors <= np.asarray(thresholds)[None]).sum(0) / n if n else np.full(len(thresholds), np.nan)


def _replace_bad_predictions(pred: np.ndarray, gt: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """Replace frame i >= 1 flagged ``bad`` (and with a ground truth) by frame i - 1, in order, so that a run of bad
    frames takes the last good one (the toolkits' loop)."""
    pred = pred.copy()
    for i in range(1, len(pred)):
        if bad[i] and not np.isnan(gt[i]).any():
            pred[i] = pred[i - 1]
    return pred


def sequence_errors(pred: np.ndarray, gt: np.ndarray, absent: np.ndarray | None = None,
                    convention: str = "pytracking", valid_rule: str = "wh",
                    exclude_invalid_frames: bool = False) -> dict[str, np.ndarray | float]:
    """Per-frame IoU, centre error and normalised centre error of one sequence under ``convention``, plus the
    denominator of its curves (see the module docstring for the conventions).

    Returns:
        ``{"iou", "center_error", "norm_center_error", "valid", "denominator"}``.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if valid_rule not in ("wh", "all4"):
        raise ValueError(f"valid_rule must be 'wh' or 'all4', got {valid_rule!r}")
    p, g = _boxes(pred, "pred"), _boxes(gt, "gt")
    if len(p) > len(g):  # e.g. LaSOT monkey-17 has more frames than annotations
        p = p[:len(g)]
    if len(p) < len(g):
        raise ValueError(f"{len(p)} predictions for {len(g)} ground-truth boxes")
    absent_mask = None if absent is None else np.asarray(absent, dtype=bool).reshape(-1)
    if absent_mask is not None and len(absent_mask) != len(g):
        raise ValueError(f"{len(absent_mask)} absence flags for {len(g)} ground-truth boxes")

    if convention == "got10k":
        p[0] = g[0]
        return {"iou": iou(p, g), "center_error": center_error(p, g), "norm_center_error":
                normalized_center_error(p, g), "valid": np.ones(len(g), bool), "denominator": float(len(g))}

    if convention == "lasot_toolkit":
        p = _replace_bad_predictions(p, g, np.isnan(p).any(1) | (p[:, 2] <= 0) | (p[:, 3] <= 0))
        p[0] = g[0]
        if absent_mask is not None:
            p, g = p[~absent_mask], g[~absent_mask]
        valid = ((g + np.array([1.0, 1.0, 0.0, 0.0])) > 0).all(1)
        ov = -np.ones(len(g))
        ov[valid] = iou(p[valid], g[valid], pixel_inclusive=True)
        ce, nce = center_error(p, g), normalized_center_error(p, g)
        ce[~valid] = -1.0
        nce[~valid] = -1.0
        return {"iou": ov, "center_error": ce, "norm_center_error": nce, "valid": valid,
                "denominator": float(len(g))}

    # pytracking / Stark
    if np.isnan(p).any() or (p[:, 2:] < 0).any():
        raise ValueError("predictions hold NaN or negative sizes (pytracking rejects such results)")
    p = _replace_bad_predictions(p, g, (p[:, 2:] == 0).any(1))
    p[0] = g[0]
    if valid_rule == "wh":
        valid = (g[:, 2:] > 0).all(1)
    else:
        valid = ((g + np.array([1.0, 1.0, 0.0, 0.0])) > 0).all(1)
    if absent_mask is not None:
        valid &= ~absent_mask
    with np.errstate(divide="ignore", invalid="ignore"):
        ov = iou(p, g, pixel_inclusive=True)
        ce, nce = center_error(p, g), normalized_center_error(p, g)
    ov[~valid] = -1.0
    ce[~valid] = np.inf
    nce[~valid] = -1.0
    if absent_mask is not None:
        ce[absent_mask] = np.inf
        nce[absent_mask] = np.inf
    if np.isnan(ov).any():
        raise ValueError("NaN in the overlaps (a valid frame with an empty union)")
    denominator = float(valid.sum()) if exclude_invalid_frames else float(len(g))
    return {"iou": ov, "center_error": ce, "norm_center_error": nce, "valid": valid, "denominator": denominator}


def sequence_curves(pred: np.ndarray, gt: np.ndarray, absent: np.ndarray | None = None,
                    convention: str = "pytracking", valid_rule: str = "wh",
                    exclude_invalid_frames: bool = False) -> dict[str, np.ndarray]:
    """Success (21), precision (51) and normalised precision (51) curves of one sequence."""
    e = sequence_errors(pred, gt, absent, convention, valid_rule, exclude_invalid_frames)
    n = e["denominator"]
    thr = PYTRACKING_OVERLAP_THRESHOLDS if convention == "pytracking" else OVERLAP_THRESHOLDS
    return {"success": success_curve(e["iou"], thr, n), "precision": precision_curve(e["center_error"],
            CENTER_THRESHOLDS, n), "norm_precision": precision_curve(e["norm_center_error"], NORM_CENTER_THRESHOLDS,
                                                                     n)}


def ope_metrics(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray],
                absents: Sequence[np.ndarray | None] | None = None, convention: str = "pytracking",
                valid_rule: str = "wh", exclude_invalid_frames: bool = False) -> dict:
    """One-pass-evaluation scores over sequences: the curves are averaged over sequences (each sequence weighs the
    same), SUC is the mean of the averaged success curve, P its precision at 20 px, P_norm at 0.20.

    A sequence without any frame in its denominator (e.g. every frame absent under ``lasot_toolkit``) is left out.

    Returns:
        ``{"SUC", "P", "P_norm", "success_curve", "precision_curve", "norm_precision_curve", "per_sequence"}`` with
        fractions in [0, 1] (the toolkits print them x100); ``per_sequence`` lists each sequence's curves.
    """
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} prediction sequences for {len(gts)} ground-truth sequences")
    if absents is None:
        absents = [None] * len(gts)
    per = [sequence_curves(p, g, a, convention, valid_rule, exclude_invalid_frames)
           for p, g, a in zip(preds, gts, absents)]
    kept = [c for c in per if np.isfinite(c["success"]).all()]
    if not kept:
        raise ValueError("no sequence with frames to score")
    succ = np.mean([c["success"] for c in kept], 0)
    prec = np.mean([c["precision"] for c in kept], 0)
    norm = np.mean([c["norm_precision"] for c in kept], 0)
    return {"SUC": float(succ.mean()), "P": float(prec[20]), "P_norm": float(norm[20]), "success_curve": succ,
            "precision_curve": prec, "norm_precision_curve": norm, "per_sequence": per}


def got10k_metrics(preds: Sequence[np.ndarray] | Sequence[Sequence[np.ndarray]], gts: Sequence[np.ndarray],
                   covers: Sequence[np.ndarray | None] | None = None,
                   resolutions: Sequence[tuple[float, float] | None] | None = None) -> dict:
    """GOT-10k AO, SR0.5, SR0.75 and the 101-bin success curve, pooled over frames as got10k-toolkit 0.1.3 does.

    Args:
        preds: Per sequence an ``(N, 4)`` array, or a list of them (repeated runs; all are pooled).
        gts: Per sequence the ``(N, 4)`` ground truth.
        covers: Per sequence the ``cover.label`` values; frames with 0 are left out (``None``: keep all).
        resolutions: Per sequence ``(width, height)`` to clip boxes to (``None``: no clipping).

    Returns:
        ``{"AO", "SR0.5", "SR0.75", "success_curve", "per_sequence"}`` (``per_sequence``: AO of each sequence).
    """
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} prediction sequences for {len(gts)} ground-truth sequences")
    covers = covers if covers is not None else [None] * len(gts)
    resolutions = resolutions if resolutions is not None else [None] * len(gts)
    pooled, per = [], []
    for runs, g, c, r in zip(preds, gts, covers, resolutions):
        g = _boxes(g, "gt")
        runs = [runs] if np.asarray(runs[0]).ndim == 1 else list(runs)
        seq = []
        for p in runs:
            p = _boxes(p, "pred")
            if p.shape != g.shape:
                raise ValueError(f"predictions of shape {p.shape} for ground truth of shape {g.shape}")
            v = iou(p[1:], g[1:], bound=r)
            if c is not None:
                v = v[np.asarray(c).reshape(-1)[1:] > 0]
            seq.append(v)
        seq_ious = np.concatenate(seq)
        per.append(float(seq_ious.mean()) if len(seq_ious) else float("nan"))
        pooled.append(seq_ious)
    ious = np.concatenate(pooled)
    if not len(ious):
        raise ValueError("no frame to score (every frame after the first has cover 0)")
    return {"AO": float(ious.mean()), "SR0.5": float((ious > 0.5).mean()), "SR0.75": float((ious > 0.75).mean()),
            "success_curve": success_curve(ious, GOT10K_THRESHOLDS), "per_sequence": per}


__all__ = ["CENTER_THRESHOLDS", "CONVENTIONS", "GOT10K_THRESHOLDS", "NORM_CENTER_THRESHOLDS", "OVERLAP_THRESHOLDS",
           "PYTRACKING_OVERLAP_THRESHOLDS", "center_error", "centers", "got10k_metrics", "iou",
           "normalized_center_error", "ope_metrics", "precision_curve", "sequence_curves", "sequence_errors",
           "success_curve"]
