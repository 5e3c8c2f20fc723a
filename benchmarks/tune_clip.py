"""Choose each CLIP few-shot method's hyperparameters on held-out validation images, then report its test accuracy.

Every candidate is ``tasks/clip_fewshot.yaml`` with one method's settings, trained on the same 16 shots per class.
Its last model is scored on ``--val-shots`` validation images per class drawn from the *unused training images*
(``data.val_shots``), and on the test images. The candidate with the best validation accuracy is selected per
method (ties: the first listed); test accuracy plays no part in the choice. Resumable: finished candidates are kept
in ``benchmarks/results/tune_clip.json`` and skipped.

    python benchmarks/tune_clip.py --only comp_lora glad  # the grids behind configs/methods/ (about 30 min)
    python benchmarks/tune_clip.py                        # also LoRA's and Block-LoRA's learning rate
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASK = str(ROOT / "tasks" / "clip_fewshot.yaml")
ADAPTER = "--model.init_args.adapter"
LR = "--model.init_args.optimizer.init_args.lr"


def _lora(frag: str, **kw) -> list[str]:
    return [ADAPTER, f"configs/adapters/{frag}.yaml", *[f"{ADAPTER}.init_args.{k}={v}" for k, v in kw.items()]]


def _glad(rho: float, rule: str = "project", alpha: float = 0.0) -> list[str]:
    glad = f"{{class_path: visadapt.methods.companions.glad.Glad, init_args: {{rho: {rho}, rule: {rule}, alpha: {alpha}}}}}"
    return [*_lora("lora"), f"--trainer.callbacks=[{glad}]"]  # the GLAD companion callback


# method -> {candidate label: extra fit arguments}
GRIDS: dict[str, dict[str, list[str]]] = {
    "lora": {f"r8 lr{lr}": [*_lora("lora"), f"{LR}={lr}"] for lr in ("5e-4", "1e-3", "2e-3")},
    "block_lora": {f"r{r} lr{lr}": [*_lora("block_lora", r=r), f"{LR}={lr}"]
                   for r in (8, 16) for lr in ("1e-3", "2e-3")},
    "comp_lora": {f"k{k} lr{lr}": [*_lora("comp_lora", protected=k), f"{LR}={lr}"]
                  for k in (8, 4) for lr in ("1e-3", "2e-3")},  # k=r and below (the smallest layer is 16x32)
    # GLAD's default rule (project, alpha 0: ProGrad with the SAM gradient as reference); the README keeps the
    # results of the earlier grid over the mix rule
    "glad": {f"project rho{rho} lr{lr}": [*_glad(rho), f"{LR}={lr}"] for rho in (0.01, 0.05)
             for lr in ("5e-4", "1e-3")},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=list(GRIDS), help="methods to tune (default: all)")
    parser.add_argument("--val-shots", type=int, default=100, help="held-out validation images per class")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tune_clip.json"))
    args = parser.parse_args()
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from visadapt.cli import cli_main

    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    baselines_done = any("class_mean" in r for r in results.values())
    failed: dict[str, str] = {}
    for method in args.only or list(GRIDS):
        for label, extra in GRIDS[method].items():
            key = f"{method} | {label}"
            if key in results:
                print(f"skip {key}: done")
                continue
            name = "tune_" + key.replace(" | ", "_").replace(" ", "_")
            argv = ["fit", "-c", TASK, f"--trainer.logger.init_args.name={name}", "--trainer.limit_val_batches=0",
                    f"--data.init_args.val_shots={args.val_shots}", *extra]
            if baselines_done:  # the frozen baselines are the same for every candidate: compute them once
                argv.append("--model.init_args.eval_baselines=false")
            try:
                cli = cli_main(argv)
            except SIGTERMException:  # a kill stops the grid (it is a SystemExit, caught below otherwise)
                raise
            except (Exception, SystemExit) as e:  # a bad candidate (config error included) is reported, not fatal
                print(f"candidate {key} failed: {e}")
                failed[key] = str(e).splitlines()[0] if str(e) else type(e).__name__
                continue
            results[key] = {"method": method, "candidate": label, "args": extra, **cli.model.report}
            baselines_done = baselines_done or "class_mean" in results[key]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1, default=str))
    print(table(results))
    for key, why in failed.items():
        print(f"FAILED {key}: {why}")


def selected(results: dict) -> dict[str, str]:
    """Per method, the key of the candidate with the best validation accuracy (first listed on ties)."""
    best: dict[str, str] = {}
    for key, r in results.items():
        m = r["method"]
        if m not in best or r["adapted_val_acc"] > results[best[m]]["adapted_val_acc"]:
            best[m] = key
    return best


def table(results: dict) -> str:
    base = next((r for r in results.values() if "class_mean" in r), {})
    chosen = set(selected(results).values())
    rows = [f"Frozen baselines on the test images: zero-shot {base.get('zeroshot', {}).get('all', float('nan')):.1f}, "
            f"class mean {base.get('class_mean', {}).get('all', float('nan')):.1f}, linear probe "
            f"{base.get('linear_probe', {}).get('all', float('nan')):.1f}", "",
            "| method | candidate | val top-1 | test top-1 | trainable | train s | selected on val |",
            "|---|---|---:|---:|---:|---:|:-:|"]
    for key, r in results.items():
        rows.append(f"| {r['method']} | {r['candidate']} | {r['adapted_val_acc']:.1f} | {r['adapted']['all']:.1f} | "
                    f"{r['trainable_params']:,} | {r['train_seconds']:.0f} | {'yes' if key in chosen else ''} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
