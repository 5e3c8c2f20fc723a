"""``python -m visadapt sweep``: run a task over shots x seeds (x datasets) and write the paper-style table.

Every cell is one ``fit`` of the task with ``data.init_args.shots``, ``data.init_args.seed``,
``seed_everything`` (and ``data.init_args.dataset``) overridden. A finished cell leaves ``cells/<cell>.json``; a
rerun skips it, so an interrupted sweep resumes where it stopped. The table holds mean ± std over seeds per cell
and an average column over datasets:

* ``fewshot`` protocol: adapted top-1 on all classes (plus the zero-shot and class-mean rows);
* ``base2novel``: base and novel top-1 and their harmonic mean. HM uses the seed-averaged base and novel
  accuracies, and the average over datasets is the HM of the averaged base and novel — not the mean of per-dataset
  HMs (the mistake KgCoOp issue #9 shows in published tables);
* ``transfer`` (cross-dataset and domain generalisation): train on the source as in ``fewshot`` and score the
  transfer targets of ``data.init_args.targets``; one column per target and their average (the source column is
  not part of the average, as in CoOp's tables).

The sweep does not know how to run a cell: the CLI passes its runner in (``runner``: fit arguments -> the finished
LightningCLI, whose ``model.report`` is kept), so that this protocol layer never imports the CLI. A task whose model
sets ``iters_per_shot`` trains ``iters_per_shot x K`` steps in each cell (CLIP-LoRA's 500 x K).
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser

from visadapt.metrics import harmonic_mean

Runner = Callable[[list[str]], Any]
"""Runs ``python -m visadapt`` with the given arguments and returns the finished LightningCLI."""


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _cell(accs: list[float]) -> tuple[float | None, str]:
    """Seed mean and the ``mean ± std`` table cell of some accuracies (``None`` and ``–`` when there are none)."""
    if not accs:
        return None, "–"
    m, s = _mean_std(accs)
    return m, f"{m:.2f} ± {s:.2f}"


def base2novel_table(cells: dict[str, dict[int, tuple[float, float]]]) -> dict[str, dict[str, float]]:
    """``{dataset: {seed: (base, novel)}}`` -> ``{dataset | 'average': {base, novel, hm}}`` by the CoCoOp rule."""
    rows: dict[str, dict[str, float]] = {}
    for ds, per_seed in cells.items():
        b = statistics.fmean(v[0] for v in per_seed.values())
        n = statistics.fmean(v[1] for v in per_seed.values())
        rows[ds] = {"base": b, "novel": n, "hm": harmonic_mean(b, n)}
    if rows:
        b = statistics.fmean(r["base"] for r in rows.values())
        n = statistics.fmean(r["novel"] for r in rows.values())
        rows["average"] = {"base": b, "novel": n, "hm": harmonic_mean(b, n)}
    return rows


PROTOCOLS = ("fewshot", "base2novel", "transfer")


@dataclass
class Cell:
    dataset: str
    shots: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.dataset}_k{self.shots}_s{self.seed}"


def sweep(task: str, shots: list[int] = [1, 2, 4, 8, 16], seeds: list[int] = [1, 2, 3],  # noqa: B006
          datasets: list[str] | None = None, protocol: str = "fewshot", out: str = "runs/sweeps/sweep",
          overrides: list[str] | None = None, runner: Runner | None = None) -> dict:
    """Run the task ``task`` over shots x seeds (x datasets) and write ``table.csv`` / ``table.md`` under ``out``.

    Args:
        task: Task YAML (as for ``fit -c``).
        shots: Shot counts K.
        seeds: Seeds; each sets both the few-shot selection and ``seed_everything``.
        datasets: Registered dataset names; ``None`` keeps the task's dataset.
        protocol: ``fewshot`` (all classes), ``base2novel`` (train on base, score base and novel) or ``transfer``
            (train on the source, score the task's ``data.init_args.targets``).
        out: Sweep folder: cell runs, ``cells/*.json`` (finished cells) and the tables.
        overrides: Extra ``fit`` arguments for every cell, e.g. ``["--trainer.max_epochs=2"]``.
        runner: Runs one cell from its command-line arguments and returns the finished LightningCLI (the CLI passes
            ``visadapt.cli.cli_main``; from Python, pass it yourself).
    """
    import yaml

    if runner is None:
        raise TypeError("sweep() needs runner=: the function that runs one fit from its arguments, e.g. "
                        "visadapt.cli.cli_main (python -m visadapt sweep passes it)")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    task_cfg = yaml.safe_load(Path(task).read_text())
    default_ds = task_cfg.get("data", {}).get("init_args", {}).get("dataset", "dataset")
    out_dir = Path(out)
    (out_dir / "cells").mkdir(parents=True, exist_ok=True)
    cells = [Cell(d, k, s) for d in (datasets or [default_ds]) for k in shots for s in seeds]
    for i, cell in enumerate(cells, 1):
        done = out_dir / "cells" / f"{cell.name}.json"
        if done.is_file():
            print(f"[{i}/{len(cells)}] {cell.name}: done, skipped")
            continue
        print(f"[{i}/{len(cells)}] {cell.name}: running")
        args = ["fit", "-c", task, f"--seed_everything={cell.seed}", f"--data.init_args.shots={cell.shots}",
                f"--data.init_args.seed={cell.seed}",
                "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
                f"--trainer.logger.init_args.save_dir={out_dir / 'runs'}",
                f"--trainer.logger.init_args.name={cell.name}"]
        if datasets:
            args.append(f"--data.init_args.dataset={cell.dataset}")
        if protocol == "base2novel":
            args += ["--data.init_args.train_classes=base", "--data.init_args.eval_subsets=[base, novel]"]
        cli = runner(args + list(overrides or []))
        report = dict(cli.model.report)
        done.write_text(json.dumps({"cell": cell.__dict__, "report": report}, indent=1, default=str))
    return write_tables(out_dir, cells, protocol)


def write_tables(out_dir: Path, cells: list[Cell], protocol: str) -> dict:
    """Aggregate the finished cells into ``table.csv`` and ``table.md``; return the table."""
    results = {c.name: json.loads((out_dir / "cells" / f"{c.name}.json").read_text())["report"] for c in cells}
    datasets = sorted({c.dataset for c in cells})
    shots = sorted({c.shots for c in cells})
    rows: list[list[str]] = []
    table: dict = {}
    if protocol == "fewshot":
        header = ["method", "shots", *datasets, "average"]
        for kind in ("zeroshot", "class_mean", "adapted"):
            for k in shots:
                per_ds, line = {}, [kind, str(k)]
                for d in datasets:
                    m, text = _cell([results[c.name][kind]["all"] for c in cells if (c.dataset, c.shots) == (d, k)
                                     and kind in results[c.name] and "all" in results[c.name][kind]])
                    line.append(text)
                    if m is not None:
                        per_ds[d] = m
                line.append(f"{statistics.fmean(per_ds.values()):.2f}" if per_ds else "–")
                table[f"{kind}_k{k}"] = per_ds
                rows.append(line)
    elif protocol == "transfer":
        targets = list(dict.fromkeys(t for r in results.values() for t in r.get("adapted", {}) if t != "all"))
        if not targets:
            raise ValueError("protocol 'transfer' needs transfer targets: set data.init_args.targets in the task "
                             "or pass e.g. --overrides '[--data.init_args.targets={digits: {dataset: digits}}]'")
        header = ["method", "shots", "source", "source top-1", *targets, "target average"]
        for kind in ("zeroshot", "adapted"):
            for k in shots:
                for d in datasets:
                    runs = [results[c.name][kind] for c in cells if (c.dataset, c.shots) == (d, k)
                            and kind in results[c.name]]
                    if not runs:
                        continue
                    line, means = [kind, str(k), d], {}
                    for col in ["all", *targets]:
                        m, text = _cell([r[col] for r in runs if col in r])
                        line.append(text)
                        if m is not None:
                            means[col] = m
                    tm = [means[t] for t in targets if t in means]
                    line.append(f"{statistics.fmean(tm):.2f}" if tm else "–")
                    table[f"{kind}_k{k}_{d}"] = {**means, "target_average": statistics.fmean(tm) if tm else None}
                    rows.append(line)
    else:
        header = ["method", "shots", "dataset", "base", "novel", "hm"]
        for kind in ("zeroshot", "adapted"):
            for k in shots:
                per = {d: {c.seed: (results[c.name][kind]["base"], results[c.name][kind]["novel"])
                           for c in cells if (c.dataset, c.shots) == (d, k) and kind in results[c.name]}
                       for d in datasets}
                t = base2novel_table({d: v for d, v in per.items() if v})
                table[f"{kind}_k{k}"] = t
                for d, r in t.items():
                    rows.append([kind, str(k), d, f"{r['base']:.2f}", f"{r['novel']:.2f}", f"{r['hm']:.2f}"])
    with (out_dir / "table.csv").open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
    (out_dir / "table.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"tables written to {out_dir / 'table.md'} and table.csv")
    return table


def sweep_main(args: list[str] | None = None, runner: Runner | None = None) -> dict:
    """Entry point of ``python -m visadapt sweep``; ``runner`` runs one cell (the CLI passes its own)."""
    if runner is None:
        raise TypeError("sweep_main() needs runner=, e.g. visadapt.cli.cli_main")
    parser = ArgumentParser(prog="python -m visadapt sweep", description=(sweep.__doc__ or "").split("\n\n")[0],
                            parser_mode="yaml")
    parser.add_function_arguments(sweep, skip={"runner"}, as_positional=True)
    cfg = parser.parse_args(args)
    kwargs = {k: v for k, v in vars(parser.instantiate_classes(cfg)).items() if not k.startswith("__")}
    return sweep(**kwargs, runner=runner)
