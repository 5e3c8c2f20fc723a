"""LoRAT inference speed: the merged tracker model against a plain model with no adapter at all, same input.

LoRAT's claim is that LoRA adds no inference latency because the adapters are merged into the weights. Three models
of one architecture run the tracker's per-frame forward (search crop + the cached template tokens -> score map and
boxes) on the same input:

* ``plain``: the LoRAT architecture built with no adapter (nothing injected): the reference;
* ``merged``: LoRA trained-shape adapters merged and their wrappers removed (what ``track`` runs);
* ``unmerged``: the adapters left as separate low-rank branches (what training runs).

Repeats are interleaved (plain, merged, unmerged, plain, ...) so that machine load hits all three alike; the table
gives the median time per forward and frames per second, and ``merged / plain`` (target: within 5 %).

Usage::

    python benchmarks/tracking_fps.py                         # tiny offline model, CPU
    python benchmarks/tracking_fps.py --variant b224 --device cuda --batch 1
    python benchmarks/tracking_fps.py --json runs/tracking_fps.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from visadapt.methods.lorat import LoRAT, plain_copy

VARIANTS = {
    # name: (backbone, backbone kwargs, template, search)
    "tiny": ("tiny_tracking_vit", {}, 48, 96),
    "b224": ("tracking_vit", {"model_name": "vit_base_patch14_dinov2"}, 112, 224),
    "l224": ("tracking_vit", {"model_name": "vit_large_patch14_dinov2"}, 112, 224),
    "b378": ("tracking_vit", {"model_name": "vit_base_patch14_dinov2"}, 196, 378),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(variant: str, device: torch.device) -> dict[str, LoRAT]:
    backbone, kwargs, t, s = VARIANTS[variant]
    torch.manual_seed(0)
    lora = LoRAT(backbone=backbone, backbone_kwargs=kwargs, template_size=t, search_size=s)
    # a plain model: same backbone weights (same seed), nothing injected (the full-FT module builds no adapter)
    torch.manual_seed(0)
    plain = LoRAT(backbone=backbone, backbone_kwargs=kwargs, template_size=t, search_size=s, finetune=True)
    plain.load_state_dict(lora.state_dict(), strict=False)  # same heads and type embeddings
    models = {"plain": plain, "merged": plain_copy(lora), "unmerged": lora}
    return {k: m.eval().to(device).requires_grad_(False) for k, m in models.items()}


def measure(models: dict[str, LoRAT], batch: int, repeats: int, iters: int, warmup: int,
            device: torch.device, dtype: torch.dtype) -> dict[str, list[float]]:
    m0 = next(iter(models.values()))
    gen = torch.Generator().manual_seed(0)
    template = torch.randn(batch, 3, m0.template_size, m0.template_size, generator=gen).to(device)
    search = torch.randn(batch, 3, m0.search_size, m0.search_size, generator=gen).to(device)
    tbox = torch.tensor([[0.25, 0.25, 0.75, 0.75]] * batch, device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    with torch.inference_mode(), autocast:
        z = {k: m.embed_template(template, tbox) for k, m in models.items()}
        for k, m in models.items():
            for _ in range(warmup):
                m.forward_embedded(z[k], search)
        _sync(device)
        times: dict[str, list[float]] = {k: [] for k in models}
        for _ in range(repeats):
            for k, m in models.items():  # interleaved: load changes hit every model alike
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(iters):
                    m.forward_embedded(z[k], search)
                _sync(device)
                times[k].append((time.perf_counter() - t0) / iters)
    return times


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", choices=sorted(VARIANTS), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default="runs/tracking_fps.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models = build(args.variant, device)
    times = measure(models, args.batch, args.repeats, args.iters, args.warmup, device, getattr(torch, args.dtype))
    med = {k: statistics.median(v) for k, v in times.items()}
    spread = {k: (min(v), max(v)) for k, v in times.items()}
    rows = []
    print(f"LoRAT inference, variant {args.variant}, batch {args.batch}, {args.device} {args.dtype}, "
          f"{args.repeats} interleaved repeats x {args.iters} forwards (median)")
    print(f"{'model':10s} {'ms/forward':>11s} {'min..max':>17s} {'frames/s':>10s} {'vs plain':>9s}")
    for k in times:
        ratio = med[k] / med["plain"]
        rows.append({"model": k, "median_s": med[k], "min_s": spread[k][0], "max_s": spread[k][1],
                     "fps": args.batch / med[k], "ratio_to_plain": ratio})
        print(f"{k:10s} {med[k] * 1e3:11.3f} {spread[k][0] * 1e3:8.3f}..{spread[k][1] * 1e3:<8.3f} "
              f"{args.batch / med[k]:10.1f} {ratio:9.3f}")
    overhead = med["merged"] / med["plain"] - 1
    verdict = "within" if abs(overhead) <= 0.05 else "OUTSIDE"
    print(f"merged vs plain: {overhead * 100:+.1f} % ({verdict} the 5 % target)")
    out = {"variant": args.variant, "device": args.device, "dtype": args.dtype, "batch": args.batch,
           "repeats": args.repeats, "iters": args.iters, "threads": args.threads, "torch": torch.__version__,
           "machine": platform.processor() or platform.machine(),
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
           "rows": rows, "merged_overhead": overhead, "within_5_percent": abs(overhead) <= 0.05,
           "raw_seconds": times}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
