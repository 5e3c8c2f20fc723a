"""Every training-time companion fragment in ``configs/companions/`` side by side with plain LoRA: accuracy and cost.

    python benchmarks/companions.py accuracy --seeds 1 2   # offline CLIP few-shot task, resumable, lock files
    python benchmarks/companions.py cost                   # step time, memory, trainable parameters vs plain LoRA
    python benchmarks/companions.py tables                 # print both tables (Markdown) from the saved JSON

Each row is ``python -m visadapt fit -c tasks/clip_fewshot.yaml --model.init_args.adapter configs/adapters/lora.yaml
-c configs/companions/<fragment>.yaml``: the table's plain LoRA adapter (r=8 on the task's 69 layers), replaced only
where the fragment sets its own adapter (LoRA-SB's core, ALLoRA's unscaled dropout-free LoRA), plus the fragment's
callbacks. The ``lora`` reference row is ``benchmarks/adapter_variants.py``'s own ``lora`` cell (the same command
without a fragment, the same schedule): it is read from that benchmark's results when present, else run by its code.

**Accuracy** (``accuracy``): the SAME reduced schedule as ``benchmarks/adapter_variants.py accuracy`` — 16 shots, seeds
1 and 2 (``seed_everything`` and the few-shot draw), ``--max-epochs 3`` (15 optimiser steps of batch 32),
``--image-size 64`` (the task ships 112), ``--test-per-class 50`` (ships 100), no per-epoch validation, and one
thread per run. A finished cell is ``benchmarks/results/companions/cells/<fragment>_seed<k>.json`` (with the fragment's
text and the schedule); a rerun skips finished cells whose fragment, reference adapter and schedule are unchanged. A
cell being run holds a ``.lock`` file, so several ``accuracy`` workers can share the queue (remove stale locks after a
kill); a failed cell writes ``.failed.json`` (shown in the table, retried on the next run).

**Cost** (``cost``): each fragment trains ``--warmup`` + ``--steps`` optimiser steps through the same CLI, on the task's
model (``--backbone``, default the task's own) at a small size (``--image-size`` 64, ``--batch-size`` 8), and the
configurations are interleaved: ``--rounds`` rounds, one fit per configuration per round, the order rotated every
round. Step time: the median over all timed steps (from one ``on_train_batch_start`` to the next, so everything a
companion does in the step counts: extra passes, gradient adjustments, perturbations), and its ratio to ``lora``.
Init: the seconds from ``on_fit_start`` to the first batch, minus ``lora``'s (the data-driven initialisers' one-time
cost). Memory (CPU, counted exactly rather than sampled): the unique storages autograd saves for backward in one step
(parameters excluded) + 4 x the trainable bytes (parameter, gradient, two AdamW moments) + the tensors the companion
callbacks hold during the step (GGPO's exact copy of the perturbed base weights, LoRA-GA's offset factors, ...).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRAGMENTS = ROOT / "configs" / "companions"
REFERENCE = ROOT / "configs" / "adapters" / "lora.yaml"
TASK = ROOT / "tasks" / "clip_fewshot.yaml"
RESULTS = ROOT / "benchmarks" / "results"
CELLS = RESULTS / "companions" / "cells"
sys.path.insert(0, str(Path(__file__).resolve().parent))
if str(ROOT) not in sys.path:  # run from anywhere, installed or not
    sys.path.insert(1, str(ROOT))
import adapter_variants  # the reference row's cell logic (its behaviour is unchanged)


def fragments(only: list[str] | None = None) -> list[str]:
    """Fragment stems under ``configs/companions/`` (all, or ``only`` in the order given)."""
    found = sorted(p.stem for p in FRAGMENTS.glob("*.yaml"))
    if only:
        unknown = sorted(set(only) - set(found))
        if unknown:
            raise SystemExit(f"unknown fragment(s) {unknown}; available: {found}")
        return list(dict.fromkeys(only))
    return found


def _schedule(args) -> dict:
    return {"max_epochs": args.max_epochs, "image_size": args.image_size, "test_per_class": args.test_per_class}


# --- accuracy --------------------------------------------------------------------------------------------------------


def fit_command(stem: str, seed: int, args, log_root: Path) -> list[str]:
    """The cell's command line: the reference adapter first, so that a fragment's own adapter replaces it."""
    return [
        sys.executable, "-m", "visadapt", "fit", "-c", str(TASK),
        "--model.init_args.adapter", str(REFERENCE), "-c", str(FRAGMENTS / f"{stem}.yaml"),
        "--seed_everything", str(seed), "--data.init_args.seed", str(seed), "--data.init_args.shots", "16",
        "--trainer.max_epochs", str(args.max_epochs), "--data.init_args.image_size", str(args.image_size),
        "--data.init_args.test_per_class", str(args.test_per_class), "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(log_root),
        "--trainer.logger.init_args.name", f"{stem}_seed{seed}", "--trainer.logger.init_args.version", "0",
        "--model.init_args.eval_baselines", "false",
    ]


def run_cell(stem: str, seed: int, args) -> dict | None:
    """The finished cell (run now, or read back when its inputs are unchanged); ``None`` when another worker holds
    its lock."""
    cell = CELLS / f"{stem}_seed{seed}.json"
    inputs = {"fragment_text": (FRAGMENTS / f"{stem}.yaml").read_text(), "reference_text": REFERENCE.read_text(),
              "schedule": _schedule(args)}
    if cell.exists():
        done = json.loads(cell.read_text())
        if all(done.get(k) == v for k, v in inputs.items()):
            return done
    CELLS.mkdir(parents=True, exist_ok=True)
    lock = cell.with_suffix(".lock")
    try:
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return None
    try:
        log_root = ROOT / "runs" / "companions"
        cmd = fit_command(stem, seed, args, log_root)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
                              capture_output=True, text=True, check=False)
        wall = round(time.perf_counter() - t0, 1)
        report_path = log_root / f"{stem}_seed{seed}" / "version_0" / "report.json"
        if proc.returncode != 0 or not report_path.exists():
            tail = (proc.stderr or proc.stdout)[-2000:]
            print(f"{stem} seed {seed}: failed (exit {proc.returncode})\n{tail}", flush=True)
            failed = {"fragment": stem, "seed": seed, "error": tail[-1500:], **inputs}
            cell.with_suffix(".failed.json").write_text(json.dumps(failed, indent=2))
            return failed
        report = json.loads(report_path.read_text())
        cell.with_suffix(".failed.json").unlink(missing_ok=True)
        out = {"fragment": stem, "seed": seed, "adapted": report.get("adapted"),
               "trainable_params": report.get("trainable_params"), "steps": report.get("steps"),
               "train_seconds": report.get("train_seconds"), "wall_seconds": wall,
               "command": " ".join(cmd[1:]), **inputs}
        tmp = cell.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=2))
        os.replace(tmp, cell)
        return out
    finally:
        lock.unlink(missing_ok=True)


def bench_accuracy(args) -> dict:
    from tqdm.auto import tqdm

    stems = fragments(args.only)
    cells = [(s, k) for k in args.seeds for s in ["lora", *stems]]  # seed-major: a partial run covers every row once
    for stem, seed in tqdm(cells, desc="cells"):
        if stem == "lora":
            if args.skip_reference:
                continue
            out = adapter_variants.run_cell("lora", seed, args)  # the adapter_variants table's own reference cell
        else:
            out = run_cell(stem, seed, args)
        print(f"{stem} seed {seed}: {'held by another worker' if out is None else out.get('adapted')}", flush=True)
    results = []
    for stem, seed in cells:
        folder = adapter_variants.CELLS if stem == "lora" else CELLS
        path = folder / f"{stem}_seed{seed}.json"
        for candidate in (path, path.with_suffix(".failed.json")):
            if candidate.exists():
                done = json.loads(candidate.read_text())
                if stem != "lora" or done.get("schedule") == _schedule(args):
                    results.append(done)
                break
    return {"task": "tasks/clip_fewshot.yaml", "reference": "configs/adapters/lora.yaml", "schedule": _schedule(args),
            "seeds": args.seeds, "cells": results}


def accuracy_table(result: dict) -> str:
    per: dict[str, dict[int, dict]] = {}
    for cell in result["cells"]:
        per.setdefault(cell["fragment"], {})[cell["seed"]] = cell
    subsets = sorted({s for c in result["cells"] for s in (c.get("adapted") or {})}) or ["all"]
    ref = per.get("lora", {})
    head = " | ".join(f"{s} top-1 (mean ± std)" for s in subsets)
    lines = [f"| fragment | trainable | {head} | vs lora | per seed | train s (mean) |",
             "|---|---:|" + "---:|" * len(subsets) + "---:|---|---:|"]
    ref_mean = None
    if ref and all(c.get("adapted") for c in ref.values()):
        ref_mean = statistics.fmean(_pct(c["adapted"][subsets[0]]) for c in ref.values())
    for stem, seeds in per.items():
        ok = {k: c for k, c in seeds.items() if c.get("adapted")}
        if not ok:
            lines.append(f"| {stem} | – |" + " – |" * len(subsets) + " – | failed | – |")
            continue
        cells = []
        for s in subsets:
            accs = [_pct(c["adapted"][s]) for c in ok.values()]
            cells.append(f"{statistics.fmean(accs):.1f} ± {statistics.stdev(accs) if len(accs) > 1 else 0.0:.1f}")
        mean = statistics.fmean(_pct(c["adapted"][subsets[0]]) for c in ok.values())
        delta = "–" if ref_mean is None or stem == "lora" else f"{mean - ref_mean:+.1f}"
        per_seed = ", ".join(f"s{k}: {_pct(c['adapted'][subsets[0]]):.1f}" for k, c in sorted(ok.items()))
        secs = statistics.fmean(c.get("train_seconds") or 0 for c in ok.values())
        trainable = next(iter(ok.values())).get("trainable_params") or 0
        lines.append(f"| {stem} | {trainable:,} | " + " | ".join(cells) + f" | {delta} | {per_seed} | {secs:.0f} |")
    return "\n".join(lines)


def _pct(v: float) -> float:
    return 100 * v if v <= 1 else v


# --- cost ------------------------------------------------------------------------------------------------------------


def _tensors(obj, depth: int = 0):
    """Tensors reachable from a callback's attributes (dicts, lists, tuples, objects), a few levels deep."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 4:
        if isinstance(obj, dict):
            items = obj.values()
        elif isinstance(obj, (list, tuple)):
            items = obj
        elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
            items = vars(obj).values()
        else:
            items = ()
        for item in items:
            yield from _tensors(item, depth + 1)


def _timer_class():
    import lightning.pytorch as pl
    import torch

    class StepTimer(pl.Callback):
        """Times every step (one ``on_train_batch_start`` to the next), the fit start to the first batch, and counts
        one step's saved-for-backward storages and the companions' tensors (added last to ``trainer.callbacks``)."""

        def __init__(self, measure_step: int = 1) -> None:
            self.measure_step, self.times, self.init_s = measure_step, [], None
            self.activation_bytes, self.companion_bytes, self.trainable = 0, 0, 0
            self._t, self._fit_t, self._hooks, self._saved = None, None, None, {}

        def on_fit_start(self, trainer, module):
            self._fit_t = time.perf_counter()

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            now = time.perf_counter()
            if self._t is None:
                self.init_s = now - self._fit_t
            else:
                self.times.append(now - self._t)
            self._t = now
            if trainer.global_step == self.measure_step:
                exclude = {p.untyped_storage().data_ptr() for p in module.parameters()}
                exclude |= {b.untyped_storage().data_ptr() for b in module.buffers()}

                def pack(t, saved=self._saved, exclude=exclude):
                    ptr = t.untyped_storage().data_ptr()
                    if ptr not in exclude:
                        saved[ptr] = t.untyped_storage().nbytes()
                    return t

                self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
                self._hooks.__enter__()
                self._exclude = exclude

        def on_before_backward(self, trainer, module, loss):
            if self._hooks is not None:
                self._hooks.__exit__(None, None, None)
                self._hooks = None
                self.activation_bytes = sum(self._saved.values())
                seen = {}
                for cb in trainer.callbacks:
                    if cb is not self:
                        for t in _tensors(cb):
                            ptr = t.untyped_storage().data_ptr()
                            if ptr not in self._exclude:
                                seen[ptr] = t.untyped_storage().nbytes()
                self.companion_bytes = sum(seen.values())
                self.trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
                self._trainable_bytes = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)

    return StepTimer


def _cost_fit(stem: str, args) -> dict:
    import torch

    from visadapt.cli import cli_main

    timer = _timer_class()(measure_step=1)
    fragment = [] if stem == "lora" else ["-c", str(FRAGMENTS / f"{stem}.yaml")]
    argv = ["fit", "-c", str(TASK), "--model.init_args.adapter", str(REFERENCE), *fragment,
            "--model.init_args.eval_baselines", "false", "--data.init_args.image_size", str(args.image_size),
            "--data.init_args.batch_size", str(args.batch_size), "--data.init_args.test_per_class", "1",
            "--trainer.max_steps", str(args.warmup + args.steps + 1), "--trainer.max_epochs", "-1",
            "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.logger", "false", "--seed_everything", "1",
            "--trainer.default_root_dir", str(ROOT / "runs" / "companions_cost")]
    if args.backbone:
        argv += ["--model.init_args.backbone", args.backbone, "--model.init_args.adapter.init_args.target", args.target]
    if args.dataset:
        argv += ["--data.init_args.dataset", args.dataset]
    # the timer joins the fragment's callbacks (a list given on the command line with += appends)
    import __main__

    __main__.StepTimer = type(timer)
    argv += ["--trainer.callbacks+=__main__.StepTimer"]
    torch.manual_seed(0)
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # the method's report is not needed here
        cli = cli_main(argv)
    timer = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "StepTimer")
    return {"times": timer.times[args.warmup:], "init_s": timer.init_s, "activation_bytes": timer.activation_bytes,
            "companion_bytes": timer.companion_bytes, "trainable": timer.trainable,
            "trainable_bytes": getattr(timer, "_trainable_bytes", 0)}


def bench_cost(args) -> dict:
    import warnings

    import torch

    warnings.filterwarnings("ignore", message=".*args parameter is intended.*")

    torch.set_num_threads(args.threads)
    stems = ["lora", *fragments(args.only)]
    runs: dict[str, dict] = {s: {"times": [], "init_s": []} for s in stems}
    for rnd in range(args.rounds):
        shift = rnd % len(stems)
        for stem in stems[shift:] + stems[:shift]:
            if "error" in runs[stem]:
                continue
            try:
                out = _cost_fit(stem, args)
            except (Exception, SystemExit) as err:  # noqa: BLE001  (any failure is reported in the table)
                runs[stem] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
                print(f"{stem}: failed ({runs[stem]['error']})", flush=True)
                continue
            run = runs[stem]
            run["times"] += out["times"]
            run["init_s"].append(out["init_s"])
            for k in ("activation_bytes", "companion_bytes", "trainable", "trainable_bytes"):
                run[k] = out[k]
            print(f"round {rnd + 1}/{args.rounds} {stem}: median step {statistics.median(out['times']):.3f} s", flush=True)
    rows = {}
    for stem, run in runs.items():
        if "error" in run or not run["times"]:
            rows[stem] = {"error": run.get("error", "no timed step")}
            continue
        memory = run["activation_bytes"] + 4 * run["trainable_bytes"] + run["companion_bytes"]
        rows[stem] = {"trainable": run["trainable"], "step_s_median": statistics.median(run["times"]),
                      "step_s_min": min(run["times"]), "step_s_max": max(run["times"]), "steps_timed": len(run["times"]),
                      "init_s_median": statistics.median(run["init_s"]), "activation_bytes": run["activation_bytes"],
                      "companion_bytes": run["companion_bytes"], "memory_bytes": memory}
    ref = rows.get("lora")
    for row in rows.values():
        if ref and "error" not in ref and "error" not in row:
            row["step_ratio"] = row["step_s_median"] / ref["step_s_median"]
            row["memory_ratio"] = row["memory_bytes"] / ref["memory_bytes"]
            row["trainable_ratio"] = row["trainable"] / ref["trainable"]
            row["init_overhead_s"] = row["init_s_median"] - ref["init_s_median"]
    return {"model": args.backbone or "the task's backbone (devise_effnet_minilm)", "target": args.target,
            "image_size": args.image_size, "batch_size": args.batch_size, "rounds": args.rounds, "warmup": args.warmup,
            "steps": args.steps, "threads": args.threads, "torch": torch.__version__, "platform": platform.platform(),
            "rows": rows}


def cost_table(result: dict) -> str:
    head = ("| fragment | trainable | vs lora | step (s, median; min–max) | step ratio | init overhead (s) | "
            "memory (MiB) | memory ratio |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for stem, row in result["rows"].items():
        if "error" in row:
            lines.append(f"| {stem} | – | – | – | – | – | – | – ({row['error'][:80]}) |")
            continue
        lines.append(
            f"| {stem} | {row['trainable']:,} | {row.get('trainable_ratio', float('nan')):.2f} | "
            f"{row['step_s_median']:.3f} ({row['step_s_min']:.3f}–{row['step_s_max']:.3f}) | "
            f"{row.get('step_ratio', float('nan')):.2f} | {row.get('init_overhead_s', float('nan')):+.2f} | "
            f"{row['memory_bytes'] / 2**20:.1f} | {row.get('memory_ratio', float('nan')):.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    acc = sub.add_parser("accuracy", help="adapted top-1 on the offline CLIP few-shot task per fragment and seed")
    acc.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    acc.add_argument("--max-epochs", type=int, default=3, help="reduced schedule, the same as adapter_variants.py")
    acc.add_argument("--image-size", type=int, default=64, help="reduced schedule (the task ships 112)")
    acc.add_argument("--test-per-class", type=int, default=50, help="test images per class (the task ships 100)")
    acc.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    acc.add_argument("--only", nargs="*", help="fragment stems (the lora reference row is always included)")
    acc.add_argument("--skip-reference", action="store_true", help="do not run the lora reference cells (finished "
                     "ones are still read)")
    acc.add_argument("--out", type=Path, default=RESULTS / "companions_accuracy.json")
    cost = sub.add_parser("cost", help="step time, init time, memory and trainable parameters against plain LoRA")
    cost.add_argument("--rounds", type=int, default=2, help="interleaved rounds (one fit per configuration each)")
    cost.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each fit")
    cost.add_argument("--steps", type=int, default=5, help="timed steps per fit")
    cost.add_argument("--image-size", type=int, default=64)
    cost.add_argument("--batch-size", type=int, default=8)
    cost.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    cost.add_argument("--backbone", default=None, help="another registered dual encoder (e.g. tiny_open_clip for a "
                      "smoke run); default: the task's")
    cost.add_argument("--target", default="attn_qkv", help="adapter target with --backbone (fragment targets name the "
                      "task backbone's presets)")
    cost.add_argument("--dataset", default=None, help="another dataset (e.g. procedural_shapes) for a smoke run")
    cost.add_argument("--only", nargs="*", help="fragment stems (lora is always included)")
    cost.add_argument("--out", type=Path, default=RESULTS / "companions_cost.json")
    sub.add_parser("tables", help="print both tables from the saved JSON")
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.command == "accuracy":
        result = bench_accuracy(args)
        args.out.write_text(json.dumps(result, indent=2))
        print(accuracy_table(result))
    elif args.command == "cost":
        result = bench_cost(args)
        args.out.write_text(json.dumps(result, indent=2))
        print(cost_table(result))
    else:
        for name, render in (("companions_accuracy.json", accuracy_table), ("companions_cost.json", cost_table)):
            path = RESULTS / name
            print(f"## {name}\n\n" + (render(json.loads(path.read_text())) if path.exists() else "(not run yet)") + "\n")


if __name__ == "__main__":
    main()
