"""Side-by-side accuracy of the CLIP few-shot methods on the offline preset (one process, one run per method).

Runs ``tasks/clip_fewshot.yaml`` with each adapter fragment of ``configs/adapters/`` (and GLAD), in the
all-class 16-shot protocol and in base-to-novel (5 base / 5 novel Fashion-MNIST classes), and prints one Markdown
table: zero-shot, class-mean, linear-probe and adapted top-1, trainable parameters and training seconds.
Writes ``benchmarks/results/clip_methods.json``.

    python benchmarks/clip_methods.py                      # every run (about half an hour on 2 CPU cores)
    python benchmarks/clip_methods.py --only block_lora    # one row
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASK = str(ROOT / "tasks" / "clip_fewshot.yaml")
RUNS = {  # name -> (protocol, extra fit arguments)
    "block_lora": ("fewshot", []),
    "lora": ("fewshot", ["--model.init_args.adapter", "configs/adapters/lora.yaml"]),
    "comp_lora": ("fewshot", ["--model.init_args.adapter", "configs/adapters/comp_lora.yaml"]),
    "glad": ("fewshot", ["--model.init_args.adapter", "configs/adapters/lora.yaml",
                         "--model.init_args.glad", "configs/methods/glad.yaml"]),
    "lora_b2n": ("base2novel", ["--model.init_args.adapter", "configs/adapters/lora.yaml"]),
    "comp_lora_b2n": ("base2novel", ["--model.init_args.adapter", "configs/adapters/comp_lora.yaml"]),
    "clip_lora": ("fewshot", ["--model.init_args.adapter", "configs/adapters/clip_lora.yaml"]),
}
B2N = ["--data.init_args.train_classes=base", "--data.init_args.eval_subsets=[base, novel]"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=list(RUNS), help="runs to do (default: all)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "clip_methods.json"))
    parser.add_argument("--extra", nargs="*", default=[], help="extra fit arguments for every run")
    args = parser.parse_args()
    from visadapt.cli import cli_main

    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    for name in args.only or list(RUNS):
        protocol, extra = RUNS[name]
        argv = ["fit", "-c", TASK, f"--trainer.logger.init_args.name=methods_{name}", *extra,
                *(B2N if protocol == "base2novel" else []), *args.extra]
        cli = cli_main(argv)
        results[name] = {"protocol": protocol, **cli.model.report}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1, default=str))
    print(table(results))


def table(results: dict) -> str:
    rows = ["| run | protocol | subset | zero-shot | class mean | linear probe | adapted | trainable | train s |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        for subset in r.get("adapted", {}):
            def get(kind: str) -> str:
                v = r.get(kind, {}).get(subset)
                return "–" if v is None else f"{v:.1f}"
            rows.append(f"| {name} | {r['protocol']} | {subset} | {get('zeroshot')} | {get('class_mean')} | "
                        f"{get('linear_probe')} | {get('adapted')} | {r.get('trainable_params', 0):,} | "
                        f"{r.get('train_seconds', 0):.0f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
