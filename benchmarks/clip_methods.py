"""Side-by-side accuracy of the CLIP few-shot methods on the offline preset, over seeds (one process).

Each method is ``tasks/clip_fewshot.yaml`` plus its fragment in ``configs/methods/`` (the settings chosen on
held-out validation images by ``benchmarks/tune_clip.py``), run through ``python -m visadapt sweep`` over the
seeds, so that finished cells are skipped on a rerun. Every run also scores the transfer targets of
``configs/protocols/transfer_fashion_mnist.yaml`` (evaluation only: training is unchanged by them). Base-to-novel
runs train on the 5 base classes. Prints Markdown tables and writes ``benchmarks/results/clip_methods.json``.

    python benchmarks/clip_methods.py                          # every method, seeds 1 and 2 (about 40 min)
    python benchmarks/clip_methods.py --only comp_lora --seeds 1
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASK = str(ROOT / "tasks" / "clip_fewshot.yaml")
TRANSFER = ["-c", str(ROOT / "configs" / "protocols" / "transfer_fashion_mnist.yaml")]
METHODS = {  # name -> (protocol, fit arguments added to the task)
    "block_lora": ("fewshot", []),
    "lora": ("fewshot", ["-c", str(ROOT / "configs" / "methods" / "lora.yaml")]),
    "comp_lora": ("fewshot", ["-c", str(ROOT / "configs" / "methods" / "comp_lora.yaml")]),
    "glad": ("fewshot", ["-c", str(ROOT / "configs" / "methods" / "glad.yaml")]),
    "lora_b2n": ("base2novel", ["-c", str(ROOT / "configs" / "methods" / "lora.yaml")]),
    "comp_lora_b2n": ("base2novel", ["-c", str(ROOT / "configs" / "methods" / "comp_lora.yaml")]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=list(METHODS), help="methods to run (default: all)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[1, 2])
    parser.add_argument("--out", default=str(ROOT / "runs" / "methods"))
    args = parser.parse_args()
    from visadapt.cli import cli_main
    from visadapt.protocols.sweep import sweep

    results = {}
    for name in args.only or list(METHODS):
        protocol, extra = METHODS[name]
        out = Path(args.out) / name
        sweep(TASK, shots=[16], seeds=args.seeds, protocol=protocol, out=str(out),
              overrides=[*extra, *(TRANSFER if protocol == "fewshot" else [])], runner=cli_main)
        results[name] = {"protocol": protocol, "seeds": {
            s: json.loads((out / "cells" / f"fashion_mnist_k16_s{s}.json").read_text())["report"] for s in args.seeds}}
    path = ROOT / "benchmarks" / "results" / "clip_methods.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**old, **results}, indent=1, default=str))
    print(tables({**old, **results}))


def _ms(xs: list[float]) -> str:
    return f"{statistics.fmean(xs):.1f}" + (f" ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else "")


def tables(results: dict) -> str:
    from visadapt.metrics import harmonic_mean

    few = {n: r for n, r in results.items() if r["protocol"] == "fewshot"}
    b2n = {n: r for n, r in results.items() if r["protocol"] == "base2novel"}
    out = ["| method | trainable | train s | class mean | adapted | per seed (adapted / class mean) | "
           "zero-shot | digits (ZS → adapted) | original polarity (ZS → adapted) |",
           "|---|---:|---:|---:|---:|---|---:|---|---|"]
    for name, r in few.items():
        reps = list(r["seeds"].values())
        seeds = ", ".join(f"s{s}: {x['adapted']['all']:.1f} / {x['class_mean']['all']:.1f}"
                          for s, x in r["seeds"].items())

        def shift(t: str) -> str:
            return f"{_ms([x['zeroshot'][t] for x in reps])} → {_ms([x['adapted'][t] for x in reps])}"

        out.append(f"| {name} | {reps[0]['trainable_params']:,} | {_ms([x['train_seconds'] for x in reps])} | "
                   f"{_ms([x['class_mean']['all'] for x in reps])} | {_ms([x['adapted']['all'] for x in reps])} | "
                   f"{seeds} | {_ms([x['zeroshot']['all'] for x in reps])} | {shift('digits')} | "
                   f"{shift('fashion_mnist_original')} |")
    if b2n:
        out += ["", "| method | base | novel | HM | zero-shot base / novel | novel change vs zero-shot |",
                "|---|---:|---:|---:|---:|---:|"]
        for name, r in b2n.items():
            reps = list(r["seeds"].values())
            b = statistics.fmean(x["adapted"]["base"] for x in reps)
            n = statistics.fmean(x["adapted"]["novel"] for x in reps)
            zb = statistics.fmean(x["zeroshot"]["base"] for x in reps)
            zn = statistics.fmean(x["zeroshot"]["novel"] for x in reps)
            out.append(f"| {name} | {b:.1f} | {n:.1f} | {harmonic_mean(b, n):.1f} | {zb:.1f} / {zn:.1f} | "
                       f"{n - zn:+.1f} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
