"""The prepared GPU run: one command, under 8 minutes on one GPU, for the figures the README gives with the GPU's name.

    python benchmarks/gpu.py                  # on a machine with a CUDA GPU: writes benchmarks/results/gpu/*.json
    python benchmarks/gpu.py --dry-run        # CPU, tiny sizes, one step of each measurement (CI runs this)

Four measurements, each written to its own JSON under ``--out`` and summarised in ``summary.json`` / ``summary.md``:

1. **ViT-B/16 CLIP-LoRA training throughput**: ``benchmarks/run.py --size paper`` (ViT-B/16 at 224 px, batch 32,
   random init) for visadapt LoRA (whole qkv; q,v slices as CLIP-LoRA's fused-qkv form) against PEFT LoRA on the same
   model and targets, the plain backbone and full fine-tuning, under bf16 autocast, bf16 with the frozen base stored
   in bf16, and compiled (inductor, bf16); images/s = batch / median step time.
2. **Merged against unmerged inference** (same run): plain backbone, visadapt LoRA q,v unmerged / merged, PEFT.
3. **FSCIL session time**: CoACT (the CIFAR-100 paper settings: LoRA r=16 on q,v of a ViT-B/16, batch 64, bf16) on
   generated 224 px images, one base session of ``--fscil-base-classes`` classes x ``--fscil-base-shot`` images and
   two 5-way 5-shot sessions, with a random ViT-B/16 saved as a local Hugging Face folder; seconds per session.
4. **LoRAT tracker FPS**: ``benchmarks/tracking_fps.py --variant b224`` (DINOv2 ViT-B/14, 112/224 crops), plain,
   merged and unmerged models, bf16, batch 1.

Every measurement is timed and the whole run stops adding measurements once ``--budget-s`` would be exceeded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a fresh machine runs it from the checkout without installing
sys.path.insert(0, str(ROOT / "benchmarks"))

import run as harness  # benchmarks/run.py
import tracking_fps

FSCIL_DATA = "gpu_bench_shapes"


def _fscil_dataset(root=None, split="train", transform=None, num_classes=20, per_class=100, on_bad_image="raise"):
    """Coloured 32 px squares with a class-specific stripe (upsampled to the run's image size by the transforms)."""
    from visadapt.data.base import ArrayImageDataset

    rng = np.random.default_rng(0 if split == "train" else 1)
    n = per_class if split == "train" else max(per_class // 5, 2)
    images, labels = [], []
    for c in range(num_classes):
        colour = np.array([(37 * c) % 256, (91 * c + 40) % 256, (151 * c + 80) % 256], dtype=np.float64)
        for _ in range(n):
            img = np.tile(colour, (32, 32, 1)) + rng.normal(0, 25, (32, 32, 3))
            row = (c * 3) % 29
            img[row: row + 3] = 255 - img[row: row + 3]
            images.append(np.clip(img, 0, 255).astype(np.uint8))
            labels.append(c)
    ds = ArrayImageDataset(np.stack(images), labels, [f"class{c}" for c in range(num_classes)],
                           name=f"{FSCIL_DATA}/{split}", transform=transform)
    ds.on_bad_image = on_bad_image
    return ds


def train_and_inference(args, out: Path) -> dict:
    argv = ["--size", "tiny" if args.dry_run else "paper", "--device", args.device,
            "--variants", "bf16,bf16_base,compile", "--only", "full,lora_qkv,lora_qv",
            "--compile-configs", "lora_qkv,peft_lora_qkv",  # each ViT-B/16 compilation takes about a minute
            "--rounds", "1" if args.dry_run else str(args.rounds), "--warmup", "1" if args.dry_run else "3",
            "--out", str(out / "train_inference.json")]
    if args.dry_run:  # dynamo without code generation, and one adapted configuration besides the anchors
        argv += ["--compile-backend", "eager", "--gemm-size", "64", "--only", "lora_qv", "--compile-configs", "lora_qv",
                 "--variants", "bf16,compile"]
    results = harness.main(argv)
    batch = results["batch_size"]
    throughput = {f"{row['config']}|{row['variant']}": batch / row["step_s"]["median"] for row in results["training"]}
    return {"images_per_s": throughput, "table": harness.markdown(results)}


def fscil_sessions(args, out: Path) -> dict:
    from transformers import ViTConfig, ViTModel

    from visadapt.data import DATASETS
    from visadapt.data._registry import register_dataset
    from visadapt.protocols.fscil import fscil_main

    if FSCIL_DATA not in DATASETS:
        register_dataset(FSCIL_DATA)(_fscil_dataset)
    model_dir = out / "vit-b16-random"
    config = (ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                        patch_size=8) if args.dry_run else ViTConfig())  # ViTConfig() is ViT-B/16 at 224 px
    if not (model_dir / "config.json").is_file() or args.dry_run:
        torch.manual_seed(0)
        ViTModel(config, add_pooling_layer=True).save_pretrained(model_dir)
    size = 32 if args.dry_run else 224
    base_classes, base_shot = (3, 4) if args.dry_run else (args.fscil_base_classes, args.fscil_base_shot)
    argv = ["-c", str(ROOT / "configs" / "paper" / "fscil" / "cifar100.yaml"), "--methods=[coact]",
            f"--model.backbone_kwargs={{model_dir: {model_dir}, pooling: pooler}}",
            f"--data.dataset={FSCIL_DATA}", "--data.root=null", "--data.index_dir=null", "--data.split_rule=auto",
            f"--data.base_classes={base_classes}", "--data.way=5" if not args.dry_run else "--data.way=1",
            "--data.shot=5", "--data.sessions=2" if not args.dry_run else "--data.sessions=1",
            f"--data.base_shot={base_shot}", "--data.test_per_class=null", f"--data.image_size={size}",
            # one base epoch, with the paper's controlled fine-tuning (block 11 on) from its start so that it is timed
            "--coact.epochs_base=1", "--coact.ft_start_epoch=0",
            "--coact.ft_start_layer=1" if args.dry_run else "--coact.ft_start_layer=11",
            "--coact.batch_size=4" if args.dry_run else "--coact.batch_size=64",
            "--trainer.accelerator=cpu" if args.dry_run else "--trainer.accelerator=gpu",
            "--trainer.precision=bf16-mixed", "--show_progress=false", f"--out_dir={out / 'fscil'}"]
    t0 = time.perf_counter()
    report = fscil_main(argv)
    rows = report["methods"]["coact"]["sessions"]
    sessions = [{"session": r["session"], "train_s": r.get("train_seconds"), "eval_s": r.get("eval_seconds"),
                 "acc": r.get("acc")} for r in rows]
    result = {"sessions": sessions, "wall_s": time.perf_counter() - t0, "base_classes": base_classes,
              "base_shot": base_shot, "image_size": size}
    (out / "fscil.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def lorat_fps(args, out: Path) -> dict:
    argv = ["--variant", "tiny" if args.dry_run else "b224", "--device", args.device, "--dtype", "bfloat16",
            "--json", str(out / "lorat_fps.json")]
    argv += (["--repeats", "1", "--iters", "1", "--warmup", "1"] if args.dry_run
             else ["--repeats", "10", "--iters", "20"])
    res = tracking_fps.main(argv)
    return {row["model"]: row["fps"] for row in res["rows"]}


MEASUREMENTS = {"train_inference": train_and_inference, "fscil": fscil_sessions, "lorat_fps": lorat_fps}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, one step of each measurement")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    p.add_argument("--only", default=",".join(MEASUREMENTS), help=f"comma-separated from {list(MEASUREMENTS)}")
    p.add_argument("--rounds", type=int, default=10, help="timed interleaved rounds of the training benchmark")
    p.add_argument("--fscil-base-classes", type=int, default=10)
    p.add_argument("--fscil-base-shot", type=int, default=100)
    p.add_argument("--budget-s", type=float, default=450.0, help="stop starting measurements after this many seconds")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu")
    return p


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.device = args.device or ("cpu" if args.dry_run else "cuda")
    wanted = [m for m in args.only.split(",") if m]
    unknown = sorted(set(wanted) - set(MEASUREMENTS))
    if unknown:
        parser.error(f"--only: unknown {unknown}; choose from {list(MEASUREMENTS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or --dry-run to check the script on the CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu (dry run)"
    summary: dict = {"gpu": gpu, "torch": torch.__version__, "dry_run": args.dry_run, "measurements": {},
                     "seconds": {}, "skipped": []}
    start = time.perf_counter()
    for name in wanted:
        if time.perf_counter() - start > args.budget_s:
            summary["skipped"].append(name)
            continue
        t0 = time.perf_counter()
        summary["measurements"][name] = MEASUREMENTS[name](args, args.out)
        summary["seconds"][name] = time.perf_counter() - t0
        print(f"gpu.py: {name} done in {summary['seconds'][name]:.0f} s", flush=True)
    summary["total_s"] = time.perf_counter() - start
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    lines = [f"# GPU run: {gpu} (torch {torch.__version__}){' DRY RUN' if args.dry_run else ''}", ""]
    m = summary["measurements"]
    if "train_inference" in m:
        lines += ["## training throughput (images/s)", ""]
        lines += [f"- {k}: {v:.1f}" for k, v in m["train_inference"]["images_per_s"].items()]
        lines += ["", m["train_inference"]["table"], ""]
    if "fscil" in m:
        lines += ["## FSCIL (CoACT) sessions", ""]
        lines += [f"- session {s['session']}: train {s['train_s']} s, eval {s['eval_s']} s"
                  for s in m["fscil"]["sessions"]]
        lines.append("")
    if "lorat_fps" in m:
        lines += ["## LoRAT tracker (bf16, batch 1)", ""]
        lines += [f"- {k}: {v:.1f} frames/s" for k, v in m["lorat_fps"].items()]
    lines += ["", f"total {summary['total_s']:.0f} s; skipped (over budget): {summary['skipped'] or 'none'}"]
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


if __name__ == "__main__":
    main()
