"""Few-shot class-incremental learning metrics: pure functions on predictions and per-session results.

Definitions (standard FSCIL, e.g. CEC / CoACT; see ``docs/fscil.md``):

* **session accuracy** ``A_t``: top-1 accuracy over every test image of the classes seen up to session ``t``, in
  the joint label space of those classes (no task id; classes not seen yet are masked out of the prediction);
* **base / novel accuracy** ``A_b``, ``A_n``: the same predictions, scored on the test images of the base classes
  and of the incremental classes only;
* **harmonic mean** ``HM = 2 A_b A_n / (A_b + A_n)`` (0 when both are 0; undefined -> ``None`` in session 0, which
  has no novel class);
* **average accuracy**: the mean of ``A_t`` over all sessions;
* **performance drop** ``PD = A_0 - A_{T-1}``;
* **base forgetting** ``A_b(0) - A_b(T-1)``: how much base-class accuracy was lost along the way.

Accuracies are fractions in [0, 1]; tables print them as percentages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from visadapt.metrics.classification import harmonic_mean, top1

NEG_INF = float("-inf")


def mask_unseen(logits: torch.Tensor, seen_classes: int | Sequence[int]) -> torch.Tensor:
    """Logits with every class not seen yet set to ``-inf``, so that ``argmax`` only picks seen classes.

    Args:
        logits: ``(B, C_total)`` scores over all classes that will ever exist.
        seen_classes: The number of seen classes (labels ``0 .. n-1``, the usual contiguous session order) or the
            explicit list of seen labels.
    """
    if isinstance(seen_classes, int):
        if seen_classes <= 0 or seen_classes > logits.shape[1]:
            raise ValueError(f"seen_classes={seen_classes} must be in 1..{logits.shape[1]}")
        out = logits.clone()
        out[:, seen_classes:] = NEG_INF
        return out
    keep = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
    keep[torch.as_tensor(list(seen_classes), dtype=torch.long, device=logits.device)] = True
    return logits.masked_fill(~keep, NEG_INF)


def masked_predictions(logits: torch.Tensor, seen_classes: int | Sequence[int]) -> torch.Tensor:
    """``argmax`` over the seen classes only (see :func:`mask_unseen`)."""
    return mask_unseen(logits, seen_classes).argmax(dim=1)


def session_accuracy(preds: torch.Tensor | Sequence[int], labels: torch.Tensor | Sequence[int],
                     num_base_classes: int) -> dict[str, float | int | None]:
    """Overall, base-class and novel-class accuracy of one session, plus their harmonic mean.

    Per-sample means (not means of per-batch accuracies, which the CoACT code reports).

    Returns:
        ``{"acc", "base_acc", "novel_acc", "hm", "n", "n_base", "n_novel"}``; ``novel_acc`` and ``hm`` are ``None``
        when no test image of a novel class was given (session 0).
    """
    preds = torch.as_tensor(preds).long().flatten()
    labels = torch.as_tensor(labels).long().flatten()
    if preds.shape != labels.shape:
        raise ValueError(f"preds {tuple(preds.shape)} and labels {tuple(labels.shape)} differ in length")
    if len(labels) == 0:
        raise ValueError("no test samples")
    is_base = labels < num_base_classes
    n_base, n_novel = int(is_base.sum()), int((~is_base).sum())
    base = top1(preds[is_base], labels[is_base]) if n_base else None
    novel = top1(preds[~is_base], labels[~is_base]) if n_novel else None
    return {"acc": top1(preds, labels), "base_acc": base, "novel_acc": novel,
            "hm": harmonic_mean(base, novel), "n": len(labels), "n_base": n_base, "n_novel": n_novel}


def summarize_sessions(sessions: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Run-level summary of per-session results (each a dict with ``acc``, ``base_acc``, ``novel_acc``, ``hm``).

    Returns:
        ``avg_acc`` (mean of the session accuracies), ``first_acc``, ``last_acc``, ``pd`` (first minus last),
        ``base_forgetting`` (base accuracy in session 0 minus in the last session), ``last_base_acc``,
        ``last_novel_acc`` and ``last_hm``.
    """
    if not sessions:
        raise ValueError("no sessions to summarise")
    accs = [float(s["acc"]) for s in sessions]
    first, last = sessions[0], sessions[-1]
    forgetting = None
    if first.get("base_acc") is not None and last.get("base_acc") is not None:
        forgetting = float(first["base_acc"]) - float(last["base_acc"])
    return {
        "avg_acc": sum(accs) / len(accs),
        "first_acc": accs[0],
        "last_acc": accs[-1],
        "pd": accs[0] - accs[-1],
        "base_forgetting": forgetting,
        "last_base_acc": last.get("base_acc"),
        "last_novel_acc": last.get("novel_acc"),
        "last_hm": last.get("hm"),
    }


def _pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100.0 * x:.{digits}f}"


def session_table_markdown(sessions: Sequence[dict[str, Any]], title: str | None = None) -> str:
    """A Markdown table with one row per session (accuracies in %), followed by the run summary line."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| session | classes | acc | base | novel | HM |", "|---:|---:|---:|---:|---:|---:|"]
    for s in sessions:
        lines.append(f"| {s['session']} | {s['num_classes']} | {_pct(s['acc'])} | {_pct(s['base_acc'])} | "
                     f"{_pct(s['novel_acc'])} | {_pct(s['hm'])} |")
    summ = summarize_sessions(sessions)
    lines += ["", (f"average acc {_pct(summ['avg_acc'])}, performance drop (first - last) {_pct(summ['pd'])}, "
                   f"base forgetting {_pct(summ['base_forgetting'])}, last-session HM {_pct(summ['last_hm'])}")]
    return "\n".join(lines)


def comparison_table_markdown(results: dict[str, Sequence[dict[str, Any]]]) -> str:
    """One row per method: first, last and average accuracy, performance drop, base forgetting, last HM (%)."""
    lines = ["| method | first acc | last acc | avg acc | PD | base forgetting | last base | last novel | last HM |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, sessions in results.items():
        s = summarize_sessions(sessions)
        lines.append(f"| {name} | {_pct(s['first_acc'])} | {_pct(s['last_acc'])} | {_pct(s['avg_acc'])} | "
                     f"{_pct(s['pd'])} | {_pct(s['base_forgetting'])} | {_pct(s['last_base_acc'])} | "
                     f"{_pct(s['last_novel_acc'])} | {_pct(s['last_hm'])} |")
    return "\n".join(lines)


__all__ = [
    "comparison_table_markdown", "harmonic_mean", "mask_unseen", "masked_predictions", "session_accuracy",
    "session_table_markdown", "summarize_sessions",
]
