"""Every adapter fragment in ``configs/adapters/`` side by side: a cost table and an accuracy table.

    python benchmarks/adapter_variants.py cost                   # ViT-B/16 (random timm), batch 2, 224 px, CPU
    python benchmarks/adapter_variants.py accuracy --seeds 1 2   # offline CLIP few-shot task, resumable
    python benchmarks/adapter_variants.py tables                 # print both tables from the saved JSON

**Cost** (``cost``): each fragment's adapter config (its ``target`` replaced by ViT-B's ``qkv``, ``proj``, ``fc1`` and
``fc2`` Linears of all 12 blocks, since fragment targets name the few-shot backbone's presets; LoFiT, which edits
attention heads, goes on the 12 ``attn.proj`` inputs) injected into a randomly initialised timm
``vit_base_patch16_224`` (``--depth`` of its 12 blocks; all blocks have the same layer shapes, so a shallower model
keeps the per-block costs and ratios). All configurations share one copy of the frozen base weights. One training step =
``zero_grad`` + forward + cross-entropy (+ the variant's registered ``REGULARISERS`` term) + backward + AdamW step (+
its ``SCHEDULES`` companion). Steps run interleaved (one step of each configuration per round, the order rotated every
round) after ``--warmup`` rounds; the table gives the median over ``--repeats`` rounds and its ratio to the ``lora``
fragment (LoRA r=8 on the same layers). Memory: on CUDA the step's peak allocation above what was allocated before
it; on CPU the training memory an adapter adds to the frozen model, counted exactly: the unique storages autograd
saves for backward (activations; base weights excluded) + 4 x the trainable bytes (parameter, gradient, two AdamW
moments) + the adapter's non-persistent buffers (frozen bases, factors). Ratios are against ``lora``.

**Accuracy** (``accuracy``): ``python -m visadapt fit -c tasks/clip_fewshot.yaml --model.init_args.adapter
configs/adapters/<fragment>.yaml`` per fragment and seed (``seed_everything`` and the few-shot draw), 16 shots. The
task's default schedule (20 epochs at 112 px) takes minutes per run on an idle CPU and several times that on a loaded
one (a 5-epoch LoRA run managed 4 optimiser steps in 9 minutes at load 14 on 2 cores), so the table uses a
documented reduced schedule, the SAME for every row: ``--max-epochs 3`` (15 optimiser steps of batch 32),
``--image-size 64`` (the task ships 112), ``--test-per-class 50`` (ships 100) and no per-epoch validation; everything
else as the task ships. The zero-shot and class-mean baselines do not depend on the
adapter and are not measured here: evaluating them before training draws from the global random state, so a cell
that measured them would train on another random stream than the others (the first version of this table did that in
its ``lora`` cells, which made LoRA look 3 points worse than the exactly equivalent Block-LoRA). Each finished cell writes
``benchmarks/results/adapter_variants/cells/<fragment>_seed<k>.json`` (with the fragment's text and the schedule); a
rerun skips finished cells whose fragment and schedule are unchanged. Several workers may share the queue (a cell
being run holds a ``.lock`` file): ``accuracy`` started twice runs two cells at a time.

Results: ``benchmarks/results/adapter_variants_cost.json`` and ``benchmarks/results/adapter_variants_accuracy.json``.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
FRAGMENTS = ROOT / "configs" / "adapters"
RESULTS = ROOT / "benchmarks" / "results"
CELLS = RESULTS / "adapter_variants" / "cells"
VIT_TARGET = r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
COST_TARGETS = {"lofit": r"blocks\.\d+\.attn\.proj"}
"""Fragments whose layers differ from the four Linears on ViT-B (LoFiT edits the heads entering ``attn.proj``)."""


def fragments(only: list[str] | None = None) -> dict[str, dict]:
    """Fragment stem -> its parsed YAML (``class_path`` and ``init_args``), ``lora`` first."""
    found = {p.stem: yaml.safe_load(p.read_text()) for p in sorted(FRAGMENTS.glob("*.yaml"))}
    if only:
        unknown = sorted(set(only) - set(found))
        if unknown:
            raise SystemExit(f"unknown fragment(s) {unknown}; available: {sorted(found)}")
        return {k: found[k] for k in dict.fromkeys(["lora", *only])}  # in the order given
    return dict(sorted(found.items(), key=lambda kv: (kv[0] != "lora", kv[0])))


def build_config(fragment: dict, target: str):
    module_name, _, cls_name = fragment["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(**{**(fragment.get("init_args") or {}), "target": target})


# --- cost ----------------------------------------------------------------------------------------------------------


def _unique_bytes(tensors, exclude: set[int]) -> int:
    seen = {}
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in exclude:
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def bench_cost(args) -> dict:
    import timm

    from visadapt.adapters import REGULARISERS, SCHEDULES, count_parameters, inject, variant_name

    device = torch.device(args.device)
    torch.manual_seed(0)
    base = timm.create_model("vit_base_patch16_224", pretrained=False, depth=args.depth).to(device).eval()
    base.requires_grad_(False)
    shared = {id(p): p for p in base.parameters()} | {id(b): b for b in base.buffers()}
    base_storages = {p.untyped_storage().data_ptr() for p in base.parameters()}
    x = torch.randn(args.batch_size, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    runs = {}
    for stem, fragment in fragments(args.only).items():
        t0 = time.perf_counter()
        model = copy.deepcopy(base, memo=dict(shared))  # new modules, the same frozen base tensors
        config = build_config(fragment, COST_TARGETS.get(stem, VIT_TARGET))
        try:
            inject(model, config, verbose=False)
        except (ValueError, TypeError, NotImplementedError, RuntimeError) as err:  # reported, not hidden
            print(f"{stem}: cannot be injected into ViT-B ({type(err).__name__}: {err})", flush=True)
            runs[stem] = {"error": f"{type(err).__name__}: {err}"}
            continue
        model.train()
        trainable, _ = count_parameters(model)
        params = [p for p in model.parameters() if p.requires_grad]
        variant = variant_name(config)
        runs[stem] = {
            "variant": variant,
            "config": {k: v for k, v in vars(config).items() if k != "target"},
            "target": config.target,
            "model": model,
            "optimiser": torch.optim.AdamW(params, lr=1e-5),
            "regulariser": REGULARISERS.get(variant) if variant in REGULARISERS else None,
            "schedule": SCHEDULES.get(variant)() if variant in SCHEDULES else None,
            "trainable": trainable,
            "buffer_bytes": _unique_bytes([b for n, b in model.named_buffers() if ".adapters." in n], base_storages),
            "times": [],
            "cuda_peak": [],
            "setup_s": round(time.perf_counter() - t0, 2),
        }
        print(f"built {stem:<12} trainable {trainable:>11,}  ({runs[stem]['setup_s']:.1f} s)", flush=True)
    runs = {k: v for k, v in runs.items() if "model" in v} | {k: v for k, v in runs.items() if "model" not in v}
    live = {k: v for k, v in runs.items() if "model" in v}

    def step(run: dict, n: int) -> None:
        run["optimiser"].zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(run["model"](x), y)
        if run["regulariser"] is not None:
            extra = run["regulariser"](run["model"])
            loss = loss if extra is None else loss + extra
        loss.backward()
        run["optimiser"].step()
        if run["schedule"] is not None:
            run["schedule"].on_train_step_end(run["model"], n, args.warmup + args.repeats, 1e-5)

    for rnd in range(args.warmup + args.repeats):
        items = list(live.items())
        shift = rnd % len(items)
        for stem, run in items[shift:] + items[:shift]:
            if rnd == 0:  # the first warmup step also counts what autograd saves for backward
                exclude = base_storages | {p.untyped_storage().data_ptr() for p in run["model"].parameters()}
                saved = {}

                def pack(t: torch.Tensor, saved=saved, exclude=exclude) -> torch.Tensor:
                    s = t.untyped_storage()
                    if s.data_ptr() not in exclude:
                        saved[s.data_ptr()] = s.nbytes()
                    return t

                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    step(run, rnd + 1)
                run["activation_bytes"] = sum(saved.values())
                continue
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            step(run, rnd + 1)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                run["cuda_peak"].append(torch.cuda.max_memory_allocated(device) - before)
            if rnd >= args.warmup:
                run["times"].append(time.perf_counter() - t0)
        print(f"round {rnd + 1}/{args.warmup + args.repeats} done", flush=True)

    rows = {}
    for stem, run in runs.items():
        if "model" not in run:
            rows[stem] = run
            continue
        memory = run["activation_bytes"] + 4 * 4 * run["trainable"] + run["buffer_bytes"]
        if run["cuda_peak"]:
            memory = statistics.median(run["cuda_peak"])
        times = run["times"]
        rows[stem] = {
            "variant": run["variant"],
            "target": run["target"],
            "config": run["config"],
            "trainable": run["trainable"],
            "step_s_median": statistics.median(times),
            "step_s_min": min(times),
            "step_s_max": max(times),
            "activation_bytes": run["activation_bytes"],
            "buffer_bytes": run["buffer_bytes"],
            "memory_bytes": memory,
            "memory_kind": "cuda_peak" if run["cuda_peak"] else "activations+4x trainable+buffers",
            "setup_s": run["setup_s"],
        }
    ref = rows.get("lora")
    for row in rows.values():
        if ref and "step_s_median" in row:
            row["step_ratio"] = row["step_s_median"] / ref["step_s_median"]
            row["memory_ratio"] = row["memory_bytes"] / ref["memory_bytes"]
            row["trainable_ratio"] = row["trainable"] / ref["trainable"]
    return {
        "model": f"timm vit_base_patch16_224 (random init, {args.depth} of its 12 blocks), adapters on " + VIT_TARGET,
        "depth": args.depth,
        "batch_size": args.batch_size,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "rows": rows,
    }


def cost_table(result: dict) -> str:
    lines = [
        "| fragment | variant | trainable | vs LoRA | step (s, median) | step ratio | memory (MiB) | memory ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for stem, row in result["rows"].items():
        if "error" in row:
            lines.append(f"| {stem} | – | – | – | – | – | – | – ({row['error'][:60]}) |")
            continue
        lines.append(
            f"| {stem} | {row['variant']} | {row['trainable']:,} | {row.get('trainable_ratio', float('nan')):.2f} | "
            f"{row['step_s_median']:.3f} ({row['step_s_min']:.3f}–{row['step_s_max']:.3f}) | "
            f"{row.get('step_ratio', float('nan')):.2f} | {row['memory_bytes'] / 2**20:.1f} | "
            f"{row.get('memory_ratio', float('nan')):.2f} |"
        )
    return "\n".join(lines)


# --- accuracy --------------------------------------------------------------------------------------------------------


def run_cell(stem: str, seed: int, args) -> dict | None:
    """Run one cell, or read it back when it is finished with the same fragment and schedule; ``None`` when another
    worker holds it (a ``.lock`` file: several workers can share one queue; remove stale locks after a kill)."""
    cell = CELLS / f"{stem}_seed{seed}.json"
    fragment_text = (FRAGMENTS / f"{stem}.yaml").read_text()
    schedule = {"max_epochs": args.max_epochs, "image_size": args.image_size, "test_per_class": args.test_per_class}
    if cell.exists():
        done = json.loads(cell.read_text())
        if (done.get("fragment_text") == fragment_text and done.get("schedule") == schedule
                and done.get("zeroshot") is None):  # a cell that also measured the baselines is rerun without them
            return done
    CELLS.mkdir(parents=True, exist_ok=True)
    lock = cell.with_suffix(".lock")
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return None
    os.close(fd)
    try:
        return _run_cell(stem, seed, args, cell, fragment_text, schedule)
    finally:
        lock.unlink(missing_ok=True)


def _run_cell(stem: str, seed: int, args, cell: Path, fragment_text: str, schedule: dict) -> dict:
    log_root = ROOT / "runs" / "adapter_variants"
    name = f"{stem}_seed{seed}"
    cmd = [
        sys.executable, "-m", "visadapt", "fit", "-c", str(ROOT / "tasks" / "clip_fewshot.yaml"),
        "--model.init_args.adapter", str(FRAGMENTS / f"{stem}.yaml"),
        "--seed_everything", str(seed), "--data.init_args.seed", str(seed),
        "--data.init_args.shots", "16",
        "--trainer.max_epochs", str(args.max_epochs),
        "--data.init_args.image_size", str(args.image_size),
        "--data.init_args.test_per_class", str(args.test_per_class),
        "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(log_root),
        "--trainer.logger.init_args.name", name,
        "--trainer.logger.init_args.version", "0",
        # no frozen baselines in any cell: evaluating them before training draws from the global random state, so
        # a cell that measured them trained on another random stream than the rest (the old lora rows did)
        "--model.init_args.eval_baselines", "false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log_dir = log_root / name / "version_0"
    if proc.returncode != 0 or not (log_dir / "report.json").exists():
        tail = (proc.stderr or proc.stdout)[-2000:]
        print(f"{name}: failed (exit {proc.returncode})\n{tail}", flush=True)
        failed = {"fragment": stem, "seed": seed, "error": tail[-1500:], "schedule": schedule}
        cell.with_suffix(".failed.json").write_text(json.dumps(failed, indent=2))  # shown in the table; retried
        return failed
    report = json.loads((log_dir / "report.json").read_text())
    cell.with_suffix(".failed.json").unlink(missing_ok=True)
    out = {
        "fragment": stem,
        "seed": seed,
        "adapted": report.get("adapted"),
        "zeroshot": report.get("zeroshot"),
        "class_mean": report.get("class_mean"),
        "trainable_params": report.get("trainable_params"),
        "steps": report.get("steps"),
        "train_seconds": report.get("train_seconds"),
        "wall_seconds": round(wall, 1),
        "schedule": schedule,
        "fragment_text": fragment_text,
        "command": " ".join(cmd[1:]),
    }
    tmp = cell.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2))
    os.replace(tmp, cell)
    return out


def bench_accuracy(args) -> dict:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(x, **_):
            return x
    stems = list(fragments(args.only))
    cells = [(s, k) for k in args.seeds for s in stems]  # seed-major: a partial run still covers every row once
    results = []
    for stem, seed in tqdm(cells, desc="cells"):
        out = run_cell(stem, seed, args)
        print(f"{stem} seed {seed}: {'held by another worker' if out is None else out.get('adapted')}", flush=True)
    # the table reads every finished cell of this schedule, whichever worker ran it
    for stem, seed in cells:
        path = CELLS / f"{stem}_seed{seed}.json"
        for candidate in (path, path.with_suffix(".failed.json")):
            if candidate.exists():
                results.append(json.loads(candidate.read_text()))
                break
    schedule = {"max_epochs": args.max_epochs, "image_size": args.image_size, "test_per_class": args.test_per_class}
    return {"task": "tasks/clip_fewshot.yaml", "schedule": schedule, "seeds": args.seeds, "cells": results}


def accuracy_table(result: dict) -> str:
    per: dict[str, dict[int, dict]] = {}
    for cell in result["cells"]:
        per.setdefault(cell["fragment"], {})[cell["seed"]] = cell
    subsets = sorted({s for c in result["cells"] for s in (c.get("adapted") or {})})
    head = " | ".join(f"{s} top-1 (mean ± std)" for s in subsets)
    lines = [f"| fragment | trainable | {head} | per seed | train s (mean) |",
             "|---|---:|" + "---:|" * len(subsets) + "---|---:|"]
    for stem, seeds in per.items():
        ok = {k: c for k, c in seeds.items() if c.get("adapted")}
        if not ok:
            lines.append(f"| {stem} | – |" + " – |" * len(subsets) + " failed | – |")
            continue
        cells = []
        for s in subsets:
            accs = [100 * c["adapted"][s] if c["adapted"][s] <= 1 else c["adapted"][s] for c in ok.values()]
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            cells.append(f"{statistics.fmean(accs):.1f} ± {sd:.1f}")
        first = subsets[0]
        per_seed = ", ".join(f"s{k}: {100 * c['adapted'][first] if c['adapted'][first] <= 1 else c['adapted'][first]:.1f}"
                             for k, c in sorted(ok.items()))
        trainable = next(iter(ok.values())).get("trainable_params")
        secs = statistics.fmean(c.get("train_seconds") or 0 for c in ok.values())
        lines.append(f"| {stem} | {trainable:,} | " + " | ".join(cells) + f" | {per_seed} | {secs:.0f} |")
    base = [c for c in result["cells"] if c.get("zeroshot")]
    for c in base:
        lines.append(f"\nFrozen baselines, seed {c['seed']}: zero-shot {c['zeroshot']}, class mean {c['class_mean']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    cost = sub.add_parser("cost", help="trainable parameters, step time and memory against LoRA on ViT-B/16")
    cost.add_argument("--device", default="cpu")
    cost.add_argument("--batch-size", type=int, default=2)
    cost.add_argument("--depth", type=int, default=12, help="ViT-B blocks to build (12 = ViT-B/16; every block has the "
                      "same layer shapes, so fewer blocks keep the per-block ratios and cost less)")
    cost.add_argument("--warmup", type=int, default=1, help="untimed rounds (the first also counts saved tensors)")
    cost.add_argument("--repeats", type=int, default=5, help="timed rounds; the table gives their median")
    cost.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    cost.add_argument("--only", nargs="*", help="fragment stems (lora, the reference, is always included)")
    cost.add_argument("--out", type=Path, default=RESULTS / "adapter_variants_cost.json")
    acc = sub.add_parser("accuracy", help="adapted top-1 on the offline CLIP few-shot task per fragment and seed")
    acc.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    acc.add_argument("--max-epochs", type=int, default=3, help="reduced schedule, the same for every row")
    acc.add_argument("--image-size", type=int, default=64, help="reduced schedule (the task ships 112)")
    acc.add_argument("--test-per-class", type=int, default=50, help="test images per class (the task ships 100)")
    acc.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    acc.add_argument("--only", nargs="*", help="fragment stems (lora is always included)")
    acc.add_argument("--out", type=Path, default=RESULTS / "adapter_variants_accuracy.json")
    sub.add_parser("tables", help="print both tables from the saved JSON")
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.command == "cost":
        if args.threads:
            torch.set_num_threads(args.threads)
        result = bench_cost(args)
        args.out.write_text(json.dumps(result, indent=2))
        print(cost_table(result))
    elif args.command == "accuracy":
        result = bench_accuracy(args)
        args.out.write_text(json.dumps(result, indent=2))
        print(accuracy_table(result))
    else:
        for name, render in (("adapter_variants_cost.json", cost_table), ("adapter_variants_accuracy.json", accuracy_table)):
            path = RESULTS / name
            print(f"## {name}\n\n" + (render(json.loads(path.read_text())) if path.exists() else "(not run yet)") + "\n")


if __name__ == "__main__":
    main()
