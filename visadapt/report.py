"""The small human report every run writes next to its metrics: ``report.json``, ``report.md`` and plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any


def _accuracy_kinds(report: dict[str, Any]) -> list[str]:
    """Keys of the ``{subset: accuracy}`` entries of a report (zeroshot, class_mean, adapted, ...)."""
    return [k for k, v in report.items() if isinstance(v, dict) and v and all(isinstance(x, float) for x in v.values())]


def _table(report: dict[str, Any]) -> list[str]:
    """Markdown rows of ``{kind: {subset: accuracy}}`` entries, one column per subset."""
    kinds = _accuracy_kinds(report)
    subsets = sorted({s for k in kinds for s in report[k]})
    if not kinds:
        return []
    rows = ["| | " + " | ".join(f"top-1 {s} (%)" for s in subsets) + " |", "|---" * (len(subsets) + 1) + "|"]
    for k in kinds:
        cells = [f"{report[k][s]:.2f}" if s in report[k] else "–" for s in subsets]
        rows.append(f"| {k} | " + " | ".join(cells) + " |")
    return rows


def _plot(log_dir: Path, report: dict[str, Any]) -> list[str]:
    """Training-loss curve from the CSV logger's metrics.csv and a bar chart of the accuracies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    metrics = log_dir / "metrics.csv"
    if metrics.is_file():
        steps, losses = [], []
        with metrics.open() as f:
            for row in csv.DictReader(f):
                if row.get("train_loss"):
                    steps.append(int(row["step"]))
                    losses.append(float(row["train_loss"]))
        if losses:
            fig, ax = plt.subplots(figsize=(5, 3))
            ax.plot(steps, losses)
            ax.set(xlabel="step", ylabel="training loss", title="training loss")
            fig.tight_layout()
            fig.savefig(log_dir / "train_loss.png", dpi=100)
            plt.close(fig)
            made.append("train_loss.png")
    kinds = _accuracy_kinds(report)
    if kinds:
        subsets = sorted({s for k in kinds for s in report[k]})
        fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(kinds) * len(subsets), 3))
        width = 0.8 / len(kinds)
        for i, k in enumerate(kinds):
            xs = [j + i * width for j, s in enumerate(subsets) if s in report[k]]
            ys = [report[k][s] for s in subsets if s in report[k]]
            bars = ax.bar(xs, ys, width, label=k)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(subsets))], subsets)
        ax.set(ylabel="top-1 (%)", ylim=(0, 100), title="accuracy")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(log_dir / "accuracy.png", dpi=100)
        plt.close(fig)
        made.append("accuracy.png")
    return made


def write_report(log_dir: str | Path, report: dict[str, Any], title: str = "visadapt run") -> Path:
    """Write ``report.json``, ``report.md`` and plots into ``log_dir``; return the Markdown path."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    plots = _plot(log_dir, report)
    lines = [f"# {title}", ""]
    lines += _table(report)
    lines += [""] + [f"- {k}: {v}" for k, v in report.items() if not isinstance(v, dict)]
    lines += [""] + [f"![{p}]({p})" for p in plots]
    md = log_dir / "report.md"
    md.write_text("\n".join(lines) + "\n")
    return md
