"""Manipulation detection, localisation and cue metrics (pure NumPy; tensors are accepted and converted).

Image level (IMDL-BenCo's ``ImageAccuracy`` / ``ImageF1`` / ``ImageAUC``, computed once over the whole dataset):

* ACC and F1 threshold the score with ``score > threshold`` (strict, 0.5 by default); F1 is the binary F1 of the
  manipulated class (scikit-learn's ``f1_score`` with ``zero_division=0``; BenCo's 2PR/(P+R) with its 1e-9 guards
  gives the same value up to ~1e-9);
* AUC is the ROC AUC of the raw scores with ties counted half (the Mann-Whitney statistic, equal to scikit-learn's
  ``roc_auc_score``); ``nan`` when only one class is present.

Pixel level (IMDL-BenCo's ``PixelF1`` / ``PixelIOU`` / ``PixelAUC`` in mode ``"origin"``): per image, then averaged.

* The prediction is binarised with ``pred > threshold`` (0.5); TP / FP / FN are counted inside each image (inside
  its ``shape_mask`` when given: padded pixels do not count);
* F1_i = 2 P_i R_i / (P_i + R_i) with P_i = TP/(TP+FP+1e-8), R_i = TP/(TP+FN+1e-8) and 1e-8 in the denominator;
  IoU_i = TP / (TP + FP + FN + 1e-8); AUC_i is the ROC AUC of the pixel scores (ties counted half; BenCo sorts
  and integrates with the trapezoid rule, which is the same value when no two scores tie);
* **Empty-mask rule.** An image whose ground-truth mask is empty (an authentic image) has TP = 0, so BenCo scores its
  F1 and IoU 0 even for a perfect all-zero prediction, and its AUC 0 (``PixelAUC`` returns 0.0 for an empty mask).
  :func:`pixel_scores` returns exactly these per-image values. :func:`pixel_metrics` averages them over the
  *manipulated images only* by default (``empty="skip"``), as the ManipShield notes prescribe; ``empty="zero"``
  averages over every image with BenCo's zeros (BenCo's number on a mixed test set) and ``empty="sklearn"`` scores
  an empty mask as BenCo's scikit-learn cross-check does (``f1_score`` / ``jaccard_score`` with
  ``zero_division=1``): F1 and IoU 1 when nothing is predicted either, 0 otherwise; its AUC is undefined and left
  out. A full mask (no authentic pixel) has no defined AUC either: ``nan``, left out of the AUC mean.

Boxes: IoU of ``xyxy`` boxes (any consistent unit), its mean, and the share with IoU >= 0.5.
Cues: multi-label F1, micro (pooled TP/FP/FN over all labels) and macro (mean of per-label F1, a label without any
true or predicted positive scoring ``zero_division``), as scikit-learn's ``f1_score(average="micro"/"macro")``; and
the threshold-free multi-label AUC, micro and macro (:func:`cue_auc`).
Breakdowns: :func:`breakdown` applies any metric per group (category, editor); :func:`per_editor_image_metrics`
scores each editor's edits against all authentic images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

AUTHENTIC = "authentic"


def _np(x: Any, dtype: Any = np.float64) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


# -- image level ------------------------------------------------------------------------------------------------------
def _check_image_inputs(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    s, y = _np(scores).ravel(), _np(labels).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in length")
    if len(s) == 0:
        raise ValueError("no samples")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (authentic) or 1 (manipulated)")
    return s, y.astype(np.int64)


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given the mean of their ranks."""
    x = np.asarray(x).ravel()
    order = np.argsort(x, kind="mergesort")
    _, start, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(start + (counts + 1) / 2.0, counts)
    return ranks


def roc_auc(scores: Any, labels: Any) -> float:
    """ROC AUC of ``scores`` for binary ``labels`` (Mann-Whitney U / (n_pos n_neg), ties counted half); ``nan``
    when a class is missing."""
    s, y = _np(scores).ravel(), _np(labels).ravel().astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = average_ranks(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def image_accuracy(scores: Any, labels: Any, threshold: float = 0.5) -> float:
    """Share of images whose verdict ``score > threshold`` equals the label."""
    s, y = _check_image_inputs(scores, labels)
    return float(((s > threshold).astype(np.int64) == y).mean())


def image_f1(scores: Any, labels: Any, threshold: float = 0.5) -> float:
    """Binary F1 of the manipulated class at ``score > threshold`` (0 when there is no true positive)."""
    s, y = _check_image_inputs(scores, labels)
    p = s > threshold
    tp = float((p & (y == 1)).sum())
    fp, fn = float((p & (y == 0)).sum()), float((~p & (y == 1)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def image_auc(scores: Any, labels: Any) -> float:
    """Dataset-level ROC AUC of the image scores (``nan`` with one class only)."""
    s, y = _check_image_inputs(scores, labels)
    return roc_auc(s, y)


def image_metrics(scores: Any, labels: Any, threshold: float = 0.5) -> dict[str, float]:
    """``{"acc", "f1", "auc", "n"}`` over the whole dataset (never averaged over batches)."""
    s, y = _check_image_inputs(scores, labels)
    return {"acc": image_accuracy(s, y, threshold), "f1": image_f1(s, y, threshold), "auc": roc_auc(s, y),
            "n": len(s)}


# -- boxes ------------------------------------------------------------------------------------------------------------
def _area(b: np.ndarray) -> np.ndarray:
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def box_iou(pred: Any, target: Any) -> np.ndarray:
    """Row-wise IoU of ``(N, 4)`` xyxy boxes (0 where the union is empty)."""
    p, t = _np(pred).reshape(-1, 4), _np(target).reshape(-1, 4)
    if p.shape != t.shape:
        raise ValueError(f"pred boxes {p.shape} and target boxes {t.shape} differ")
    iw = np.clip(np.minimum(p[:, 2], t[:, 2]) - np.maximum(p[:, 0], t[:, 0]), 0, None)
    ih = np.clip(np.minimum(p[:, 3], t[:, 3]) - np.maximum(p[:, 1], t[:, 1]), 0, None)
    inter = iw * ih
    union = _area(p) + _area(t) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def box_metrics(pred: Any, target: Any, valid: Any = None, iou_threshold: float = 0.5) -> dict[str, float]:
    """``{"iou": mean IoU, "iou50": share with IoU >= iou_threshold, "n"}`` over the rows where ``valid`` (e.g. the
    manipulated images with a ground-truth box; all rows when ``None``). ``nan`` when no row is valid."""
    ious = box_iou(pred, target)
    if valid is not None:
        ious = ious[_np(valid, bool).ravel()]
    if len(ious) == 0:
        return {"iou": float("nan"), "iou50": float("nan"), "n": 0}
    return {"iou": float(ious.mean()), "iou50": float((ious >= iou_threshold).mean()), "n": len(ious)}


# -- cues -------------------------------------------------------------------------------------------------------------
def cue_f1(pred: Any, target: Any, threshold: float = 0.5, zero_division: float = 0.0,
           valid: Any = None) -> dict[str, float]:
    """Multi-label F1 of cue predictions: ``{"micro", "macro"}``.

    Args:
        pred: ``(N, C)`` probabilities (thresholded with ``> threshold``) or 0/1 values.
        target: ``(N, C)`` multi-hot ground truth.
        zero_division: F1 of a label with no true and no predicted positive (scikit-learn's ``zero_division``).
        valid: Rows to score (e.g. ``has_cues``); all when ``None``.
    """
    p, t = _np(pred) > threshold, _np(target) > 0.5
    if p.shape != t.shape or p.ndim != 2:
        raise ValueError(f"cue predictions {p.shape} and targets {t.shape} must both be (N, C)")
    if valid is not None:
        keep = _np(valid, bool).ravel()
        p, t = p[keep], t[keep]
    tp = (p & t).sum(0).astype(np.float64)
    fp, fn = (p & ~t).sum(0).astype(np.float64), (~p & t).sum(0).astype(np.float64)
    denom = 2 * tp + fp + fn
    per_label = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1.0), zero_division)
    micro_den = denom.sum()
    micro = 2 * tp.sum() / micro_den if micro_den > 0 else zero_division
    return {"micro": float(micro), "macro": float(per_label.mean()), "n": len(p)}


def cue_auc(scores: Any, target: Any, valid: Any = None) -> dict[str, float]:
    """Multi-label ROC AUC of cue scores: ``{"micro"}`` (every (image, cue) pair pooled) and ``{"macro"}`` (mean of
    the per-cue AUCs, over the cues that have both a positive and a negative image; scikit-learn raises instead when
    one has not), as ``roc_auc_score(average=...)``."""
    p, t = _np(scores), _np(target) > 0.5
    if p.shape != t.shape or p.ndim != 2:
        raise ValueError(f"cue scores {p.shape} and targets {t.shape} must both be (N, C)")
    if valid is not None:
        keep = _np(valid, bool).ravel()
        p, t = p[keep], t[keep]
    per_cue = [roc_auc(p[:, c], t[:, c]) for c in range(p.shape[1])]
    defined = [a for a in per_cue if not np.isnan(a)]
    return {"micro": roc_auc(p.ravel(), t.ravel()), "macro": float(np.mean(defined)) if defined else float("nan"),
            "n": len(p)}


# -- pixels -----------------------------------------------------------------------------------------------------------
def _flat_masks(pred: Any, target: Any, shape_mask: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    p, t = _np(pred, np.float64), _np(target, np.float64)
    if p.ndim == 2:
        p, t = p[None], t[None]
    if p.shape != t.shape:
        raise ValueError(f"predicted masks {p.shape} and ground-truth masks {t.shape} differ")
    n = p.shape[0]
    s = None if shape_mask is None else _np(shape_mask, np.float64).reshape(n, -1) > 0
    return p.reshape(n, -1), t.reshape(n, -1) > 0.5, s


def pixel_scores(pred: Any, target: Any, threshold: float = 0.5, shape_mask: Any = None) -> dict[str, np.ndarray]:
    """Per-image pixel F1, IoU and AUC with IMDL-BenCo's rules (``origin`` mode; empty ground truth -> 0, see the
    module docstring).

    Args:
        pred: ``(N, H, W)`` or ``(N, 1, H, W)`` probabilities (after the sigmoid), or one ``(H, W)`` mask.
        target: Ground-truth masks of the same shape (> 0.5 is manipulated).
        shape_mask: Optional valid-pixel masks (padding excluded), same shape.

    Returns:
        ``{"f1", "iou", "auc", "empty", "predicted"}``: arrays of length N; ``empty`` marks images with an empty
        ground truth, ``predicted`` those with at least one pixel predicted manipulated.
    """
    p, t, s = _flat_masks(pred, target, shape_mask)
    valid = np.ones_like(t) if s is None else s
    b = p > threshold
    tp = (b & t & valid).sum(1).astype(np.float64)
    fp = (b & ~t & valid).sum(1).astype(np.float64)
    fn = (~b & t & valid).sum(1).astype(np.float64)
    precision, recall = tp / (tp + fp + 1e-8), tp / (tp + fn + 1e-8)
    f1 = 2 * precision * recall / (precision + recall + 1e-8)
    iou = tp / (tp + fp + fn + 1e-8)
    auc = np.zeros(len(p))
    empty = (t & valid).sum(1) == 0
    for i in np.nonzero(~empty)[0]:  # BenCo's PixelAUC returns 0.0 for an empty mask
        auc[i] = roc_auc(p[i][valid[i]], t[i][valid[i]])
    return {"f1": f1, "iou": iou, "auc": auc, "empty": empty, "predicted": (b & valid).sum(1) > 0}


EMPTY_RULES = ("skip", "zero", "sklearn")


def pixel_metrics(pred: Any, target: Any, threshold: float = 0.5, shape_mask: Any = None,
                  empty: str = "skip") -> dict[str, float]:
    """Mean per-image pixel F1, IoU and AUC: ``{"f1", "iou", "auc", "n"}``.

    Args:
        empty: Images with an empty ground-truth mask: ``"skip"`` (default: average over manipulated images only),
            ``"zero"`` (BenCo's per-image value 0, averaged in) or ``"sklearn"`` (F1 / IoU 1 when nothing is
            predicted, else 0: scikit-learn's ``zero_division=1``, BenCo's cross-check; AUC left out).
    """
    if empty not in EMPTY_RULES:
        raise ValueError(f"empty must be one of {EMPTY_RULES}, got {empty!r}")
    sc = pixel_scores(pred, target, threshold, shape_mask)
    keep = ~sc["empty"] if empty == "skip" else np.ones(len(sc["f1"]), bool)
    out: dict[str, float] = {"n": int(keep.sum())}
    for k in ("f1", "iou", "auc"):
        v = sc[k].copy()
        if empty == "sklearn":
            v[sc["empty"]] = np.nan if k == "auc" else (~sc["predicted"][sc["empty"]]).astype(np.float64)
        v = v[keep]
        out[k] = float(np.nanmean(v)) if len(v) and not np.isnan(v).all() else float("nan")
    return out


# -- breakdowns -------------------------------------------------------------------------------------------------------
def breakdown(metric: Callable[..., Any], groups: Sequence[Any], *arrays: Any, **kwargs: Any) -> dict[Any, Any]:
    """``metric(*[a[rows of g] for a in arrays], **kwargs)`` for every group ``g`` in ``groups`` (one label per row,
    e.g. the editor or the category of each image), in sorted group order."""
    keys = np.asarray([str(g) if not isinstance(g, (int, np.integer)) else int(g) for g in groups], dtype=object)
    out = {}
    for g in sorted(set(keys.tolist()), key=str):
        rows = np.nonzero(keys == g)[0]
        out[g] = metric(*[_take(a, rows) for a in arrays], **kwargs)
    return out


def _take(a: Any, rows: np.ndarray) -> Any:
    if hasattr(a, "detach"):
        return a[rows.tolist()] if a.ndim else a
    if isinstance(a, (list, tuple)):
        return [a[i] for i in rows]
    return np.asarray(a)[rows]


def per_editor_image_metrics(scores: Any, labels: Any, editors: Sequence[str], threshold: float = 0.5,
                             authentic: str = AUTHENTIC) -> dict[str, dict[str, float]]:
    """Image ACC / F1 / AUC for each editor: its edits against *all* authentic images of the set (an authentic image
    belongs to no editor, so each editor's AUC is "its edits vs real images"), plus ``"all"``."""
    s, y = _check_image_inputs(scores, labels)
    ed = np.asarray(list(editors), dtype=object)
    if len(ed) != len(s):
        raise ValueError(f"{len(ed)} editors for {len(s)} scores")
    out = {"all": image_metrics(s, y, threshold)}
    real = y == 0
    for e in sorted({str(e) for e in ed[y == 1]}):
        rows = real | ((ed == e) & (y == 1))
        out[e] = image_metrics(s[rows], y[rows], threshold)
    return out


__all__ = ["EMPTY_RULES", "average_ranks", "box_iou", "box_metrics", "breakdown", "cue_auc", "cue_f1", "image_accuracy",
           "image_auc", "image_f1", "image_metrics", "per_editor_image_metrics", "pixel_metrics", "pixel_scores",
           "roc_auc"]
