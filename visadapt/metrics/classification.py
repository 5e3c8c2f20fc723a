"""Classification metrics shared by every method family: top-1 accuracy and the harmonic mean.

These are the only definitions in the package: the CLIP few-shot module, the sweep tables (CoCoOp's base-to-novel
HM) and the FSCIL session table all call them, so that one rule is written once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def top1(scores: torch.Tensor | Sequence[int], labels: torch.Tensor | Sequence[int], percent: bool = False) -> float:
    """Top-1 accuracy over samples (a per-sample mean, never a mean of per-batch accuracies).

    Args:
        scores: ``(N, C)`` class scores (the prediction is their ``argmax``) or ``(N,)`` predicted labels.
        labels: ``(N,)`` true labels.
        percent: Return a percentage in [0, 100] instead of a fraction in [0, 1].

    Raises:
        ValueError: when predictions and labels differ in length, or there is no sample.
    """
    scores = torch.as_tensor(scores)
    labels = torch.as_tensor(labels, device=scores.device).long().flatten()
    preds = scores.argmax(-1) if scores.ndim == 2 else scores.long().flatten()
    if preds.shape != labels.shape:
        raise ValueError(f"predictions {tuple(preds.shape)} and labels {tuple(labels.shape)} differ in length")
    if len(labels) == 0:
        raise ValueError("top1: no samples")
    acc = preds.eq(labels).float().mean().item()
    return 100.0 * acc if percent else acc


def harmonic_mean(a: float | None, b: float | None) -> float | None:
    """``2ab / (a + b)``: CoCoOp's base-to-novel HM and the FSCIL base/novel HM.

    0 when both are 0; ``None`` when either is ``None`` (e.g. no novel class yet).
    """
    if a is None or b is None:
        return None
    return 0.0 if a + b == 0 else 2.0 * a * b / (a + b)


__all__ = ["harmonic_mean", "top1"]
