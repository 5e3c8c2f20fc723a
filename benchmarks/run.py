"""One speed harness for every adapter method: training step and inference, fp32 / bf16 / frozen-bf16-base / compiled.

    python benchmarks/run.py --size small                      # CPU, a small ViT (minutes)
    python benchmarks/run.py --size paper --device cuda        # ViT-B/16 at 224 px, batch 32
    python benchmarks/run.py --size small --variants fp32,bf16 # no torch.compile (it compiles for minutes on a CPU)
    python benchmarks/run.py --markdown --from-json benchmarks/results/run.json   # the README table, no run

What runs (a timm ViT, random init: speed does not depend on the weights; the classifier head trains everywhere):

* configurations, each the adapter family one of visadapt's methods trains, plus three anchors:
  ``frozen`` (plain backbone, head only), ``full`` (full fine-tuning), ``peft_lora_qkv`` (PEFT LoRA on the same
  model and targets as ``lora_qkv``); ``lora_qkv`` / ``lora_qv`` (LoRA on the whole fused qkv / its q,v slices: CoACT,
  CLIP-LoRA), ``block_lora_qv`` (the CLIP main task's Block-LoRA), ``comp_lora_qv`` (Comp-LoRA),
  ``lorat`` (LoRAT: LoRA r=64, trunc-normal A and B, on qkv, proj, fc1, fc2);
* variants: ``fp32``; ``bf16`` (autocast, fp32 weights); ``bf16_base`` (autocast and the frozen Linear weights
  stored in bf16, :func:`visadapt.adapters.cast_frozen_base`); ``compile`` / ``compile_fp32`` (``torch.compile`` of
  the whole model, inductor, under bf16 autocast / in fp32; only for ``--compile-configs``, since each compilation
  takes minutes on a CPU);
* training step = zero_grad + forward + cross-entropy + backward + AdamW step; inference = forward in
  ``torch.inference_mode`` of the plain backbone, visadapt LoRA q,v unmerged and merged, PEFT LoRA unmerged and merged;
* every (configuration, variant) pair runs one step per round, the order rotated every round, after ``--warmup``
  rounds (which also absorb compilation), so machine drift and neighbours hit all pairs alike; medians and ranges;
* FLOPs of one step are counted exactly (``torch.utils.flop_counter``); achieved FLOP/s divided by the matmul rate
  of the same machine and dtype, measured in the same run (a square GEMM, interleaved with the steps), is the
  utilisation;
* memory: on CUDA the step's peak allocation (``max_memory_allocated`` above the resting state); on every device
  the bytes autograd saved for backward plus parameters, gradients and optimiser state (exact, load-independent).

Writes ``benchmarks/results/run.json`` (``--out``); ``--markdown`` prints the table the README shows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout runs it without being installed

from visadapt.adapters import (
    BlockLoRAConfig,
    CompLoRAConfig,
    LoRAConfig,
    cast_frozen_base,
    count_parameters,
    inject,
    is_adapter_param,
    merge_adapters,
)

SIZES = {
    # name: (timm ViT kwargs, batch, classes)
    "small": ({"img_size": 64, "patch_size": 8, "embed_dim": 192, "depth": 4, "num_heads": 3}, 8, 10),
    "paper": ({"img_size": 224, "patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12}, 32, 1000),
    "tiny": ({"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}, 2, 5),  # dry runs, tests
}
QKV = r"blocks\.\d+\.attn\.qkv"
QV = QKV + "[q,v]"
LORAT = r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
VARIANTS = ("fp32", "bf16", "bf16_base", "compile", "compile_fp32")
LOW = {"bf16", "bf16_base", "compile"}  # variants whose matmuls run in bf16


def build_vit(size: str, seed: int = 0) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    kwargs, _, classes = SIZES[size]
    torch.manual_seed(seed)
    return VisionTransformer(num_classes=classes, **kwargs)


def _head_trains(model: nn.Module) -> nn.Module:
    for p in model.head.parameters():
        p.requires_grad_(True)
    return model


def _visadapt(config) -> Callable[[str], nn.Module]:
    def make(size: str) -> nn.Module:
        model = build_vit(size)
        inject(model, config, verbose=False)
        return _head_trains(model)

    return make


def _peft_lora(rank: int, alpha: float, target: str = QKV) -> Callable[[str], nn.Module]:
    def make(size: str) -> nn.Module:
        import peft

        model = peft.inject_adapter_in_model(peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=target),
                                             build_vit(size))
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
        return _head_trains(model)

    return make


def _frozen(size: str) -> nn.Module:
    return _head_trains(build_vit(size).requires_grad_(False))


def configurations(rank: int) -> dict[str, tuple[str, Callable[[str], nn.Module]]]:
    """Key -> (label, builder(size))."""
    return {
        "frozen": ("plain backbone (head only)", _frozen),
        "full": ("full fine-tuning", build_vit),
        "peft_lora_qkv": (f"PEFT LoRA r={rank} on qkv", _peft_lora(rank, rank)),
        "lora_qkv": (f"visadapt LoRA r={rank} on qkv", _visadapt(LoRAConfig(QKV, r=rank, alpha=rank))),
        "lora_qv": (f"visadapt LoRA r={rank} on q,v slices (CoACT, CLIP-LoRA)",
                    _visadapt(LoRAConfig(QV, r=rank, alpha=rank))),
        "block_lora_qv": (f"visadapt Block-LoRA r={rank} n=2 on q,v (CLIP main task)",
                          _visadapt(BlockLoRAConfig(QV, r=rank, alpha=rank, n_blocks=2))),
        "comp_lora_qv": (f"visadapt Comp-LoRA r={rank} on q,v",
                         _visadapt(CompLoRAConfig(QV, r=rank, alpha=rank, protected=rank))),
        "lorat": ("visadapt LoRA r=64 on qkv, proj, fc1, fc2 (LoRAT)",
                  _visadapt(LoRAConfig(LORAT, r=64, alpha=64.0, init="trunc_normal", init_std=0.02))),
    }


# --- measuring ----------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rotated(items: list, shift: int) -> list:
    """Every item runs in every position over the rounds: what a neighbour leaves behind falls on all alike."""
    shift %= len(items)
    return items[shift:] + items[:shift]


def _autocast(device: torch.device, variant: str):
    return torch.autocast(device.type, dtype=torch.bfloat16) if variant in LOW else nullcontext()


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int) -> Callable[[], float]:
    """A closure timing one ``n x n @ n x n`` GEMM in ``dtype``; returns FLOP/s of that call."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def once() -> float:
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        return 2 * n**3 / (time.perf_counter() - t0)

    return once


def saved_bytes(model: nn.Module, run: Callable[[], None]) -> int:
    """Bytes of the unique non-parameter storages autograd saved for backward while ``run`` ran."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from adapters import saved_activation_bytes  # benchmarks/adapters.py counts them the same way

    return saved_activation_bytes(model, run)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


class TrainRun:
    """One (configuration, variant): its model, optimiser, step closure, FLOPs and timings."""

    def __init__(self, key: str, label: str, make: Callable[[str], nn.Module], variant: str, size: str,
                 device: torch.device, x: torch.Tensor, y: torch.Tensor, backend: str = "inductor") -> None:
        self.key, self.label, self.variant, self.device = key, label, variant, device
        model = make(size)
        if variant == "bf16_base":
            cast_frozen_base(model)
        self.model = model.to(device).train()
        self.trainable, self.total = count_parameters(self.model)
        self.call = torch.compile(self.model, backend=backend) if variant.startswith("compile") else self.model
        self.optimiser = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        self.x, self.y = x, y
        self.times: list[float] = []
        self.cuda_peak: list[int] = []
        self.flops = 0
        self.memory: dict[str, int] = {}

    def step(self) -> None:
        self.optimiser.zero_grad(set_to_none=True)
        with _autocast(self.device, self.variant):
            logits = self.call(self.x)
        nn.functional.cross_entropy(logits.float(), self.y).backward()
        self.optimiser.step()

    def first(self) -> None:
        """The first (untimed) step: FLOPs (eager model, exact) and memory of activations and state."""
        if self.variant.startswith("compile"):
            self.step()  # compiles forward and backward: never timed
        else:
            with FlopCounterMode(display=False) as counter:
                self.step()
            self.flops = counter.get_total_flops()
        activations = 0 if self.variant.startswith("compile") else saved_bytes(self.model, self.step)
        params = _tensor_bytes(self.model.parameters())
        grads = _tensor_bytes(p.grad for p in self.model.parameters() if p.grad is not None)
        state = _tensor_bytes(t for s in self.optimiser.state.values() for t in s.values())
        self.memory = {"saved_activations": activations, "parameters": params, "gradients": grads,
                       "optimizer_state": state}

    def timed(self, keep: bool) -> None:
        device = self.device
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        self.step()
        _sync(device)
        if keep:
            self.times.append(time.perf_counter() - t0)
            if device.type == "cuda":
                self.cuda_peak.append(torch.cuda.max_memory_allocated(device) - before)


def bench(args, device: torch.device, log: Callable[[str], None] = print) -> dict:
    """Training and inference of every requested (configuration, variant), interleaved, with the GEMM rates."""
    kwargs, batch, classes = SIZES[args.size]
    batch = args.batch_size or batch
    size = kwargs["img_size"]
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    configs = configurations(args.rank)
    keys = [k for k in configs if not args.only or k in args.only or k in ("frozen", "peft_lora_qkv")]
    if not _has_peft():
        keys = [k for k in keys if not k.startswith("peft")]
    runs: list[TrainRun] = []
    for variant in args.variants:
        for key in keys:
            if variant.startswith("compile") and key not in args.compile_configs:
                continue
            t0 = time.perf_counter()
            runs.append(TrainRun(key, configs[key][0], configs[key][1], variant, args.size, device, x, y,
                                 args.compile_backend))
            log(f"built {key:<16} {variant:<9} trainable {runs[-1].trainable:>11,} ({time.perf_counter() - t0:.1f} s)")
    infer = inference_models(args, device, keys)
    gemm = {"fp32": matmul_rate(device, torch.float32, args.gemm_size),
            "bf16": matmul_rate(device, torch.bfloat16, args.gemm_size)}
    rates: dict[str, list[float]] = {k: [] for k in gemm}
    infer_times: dict[str, list[float]] = {k: [] for k in infer}
    items = [("train", r) for r in runs] + [("infer", k) for k in infer] + [("gemm", k) for k in gemm]
    for rnd in range(args.warmup + args.rounds):
        t_round = time.perf_counter()
        keep = rnd >= args.warmup
        for kind, item in _rotated(items, rnd):
            if kind == "train":
                item.first() if rnd == 0 else item.timed(keep)
            elif kind == "infer":
                model, variant = infer[item]
                with torch.inference_mode(), _autocast(device, variant):
                    _sync(device)
                    t0 = time.perf_counter()
                    model(x)
                    _sync(device)
                if keep:
                    infer_times[item].append(time.perf_counter() - t0)
            else:
                rate = gemm[item]()
                if keep:
                    rates[item].append(rate)
        log(f"round {rnd + 1}/{args.warmup + args.rounds} ({time.perf_counter() - t_round:.1f} s)")
    return summarise(runs, infer, infer_times, rates, device)


def inference_models(args, device: torch.device, keys: list[str]) -> dict[str, tuple[nn.Module, str]]:
    """``name|variant`` -> (model in eval mode, variant): plain, visadapt LoRA q,v unmerged / merged, PEFT likewise."""
    rank = args.rank

    def perturbed(model: nn.Module) -> nn.Module:  # a trained-looking update (B is zero at injection)
        torch.manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if is_adapter_param(name) or "lora_" in name:
                    p.normal_(std=0.02)
        return model

    def visadapt_model(merged: bool) -> nn.Module:
        model = perturbed(_visadapt(LoRAConfig(QV, r=rank, alpha=rank))(args.size))
        if merged:
            merge_adapters(model)
        return model

    def peft_model(merged: bool) -> nn.Module:
        import peft

        model = perturbed(_peft_lora(rank, rank)(args.size))
        if merged:
            for module in model.modules():
                if isinstance(module, peft.tuners.lora.LoraLayer):
                    module.merge()
        return model

    builders: dict[str, Callable[[], nn.Module]] = {
        "plain": lambda: build_vit(args.size),
        "visadapt_unmerged": lambda: visadapt_model(False),
        "visadapt_merged": lambda: visadapt_model(True),
    }
    if "peft_lora_qkv" in keys:
        builders["peft_unmerged"] = lambda: peft_model(False)
        builders["peft_merged"] = lambda: peft_model(True)
    out = {}
    for variant in args.variants:
        for name, make in builders.items():
            if variant.startswith("compile") and name not in ("plain", "visadapt_merged", "visadapt_unmerged"):
                continue  # each compilation takes minutes on a CPU
            model = make()
            if variant == "bf16_base":
                cast_frozen_base(model)
            model = model.to(device).eval().requires_grad_(False)
            compiled = torch.compile(model, backend=args.compile_backend) if variant.startswith("compile") else model
            out[f"{name}|{variant}"] = (compiled, variant)
    return out


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarise(runs: list[TrainRun], infer: dict, infer_times: dict, rates: dict, device: torch.device) -> dict:
    gemm = {k: _stats(v) for k, v in rates.items()}
    flops_of = {(r.key, "eager"): r.flops for r in runs if not r.variant.startswith("compile")}
    train = []
    for r in runs:
        t = _stats(r.times)
        flops = r.flops or flops_of.get((r.key, "eager"), 0)  # compiled: the same arithmetic as eager
        dtype = "bf16" if r.variant in LOW else "fp32"
        achieved = flops / t["median"] if flops else None
        train.append({
            "config": r.key, "label": r.label, "variant": r.variant, "trainable_params": r.trainable,
            "total_params": r.total, "step_s": t, "flops": flops, "achieved_flops": achieved,
            "utilisation": achieved / gemm[dtype]["median"] if achieved else None, "matmul_dtype": dtype,
            "memory_bytes": r.memory,
            "cuda_step_peak_bytes": statistics.median(r.cuda_peak) if r.cuda_peak else None,
        })
    by = {(row["config"], row["variant"]): row for row in train}
    for row in train:
        for anchor in ("peft_lora_qkv", "frozen", "full"):
            ref = by.get((anchor, row["variant"]))
            row[f"vs_{anchor}"] = row["step_s"]["median"] / ref["step_s"]["median"] if ref else None
        fp32 = by.get((row["config"], "fp32"))
        row["vs_fp32"] = row["step_s"]["median"] / fp32["step_s"]["median"] if fp32 else None
    inference = []
    for name, values in infer_times.items():
        model, variant = name.split("|")
        inference.append({"model": model, "variant": variant, "forward_s": _stats(values)})
    plain = {row["variant"]: row["forward_s"]["median"] for row in inference if row["model"] == "plain"}
    for row in inference:
        row["vs_plain"] = row["forward_s"]["median"] / plain[row["variant"]] if row["variant"] in plain else None
    return {"gemm_flops": gemm, "training": train, "inference": inference}


# --- reporting ------------------------------------------------------------------------------------------------------


def _f(value: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if value is None else fmt.format(value)


def markdown(results: dict) -> str:
    gemm = results["gemm_flops"]
    head = (f"`{results['command']}`: {results['device']}, {results['threads']} thread(s), load average "
            f"{results['load_average']} at the start; ViT {results['model']}, batch {results['batch_size']}; median "
            f"of {results['rounds']} interleaved rounds after {results['warmup']} warm-up (range in brackets). "
            f"Matmul rate measured in the same run: fp32 {gemm['fp32']['median'] / 1e9:.0f} GFLOP/s, bf16 "
            f"{gemm['bf16']['median'] / 1e9:.0f} GFLOP/s.")
    columns = ("| configuration | variant | trainable | step ms | vs PEFT | vs frozen | vs fp32 | GFLOP/step |"
               " achieved GFLOP/s | utilisation | memory MB |")
    lines = [head, "", columns, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results["training"]:
        t = row["step_s"]
        mem = row["cuda_step_peak_bytes"] or sum(row["memory_bytes"].values())
        mem_text = "-" if row["variant"].startswith("compile") and not row["cuda_step_peak_bytes"] else (
            f"{mem / 2**20:.0f}")  # a compiled step's saved activations are not visible to the hooks
        lines.append(
            f"| {row['label']} | {row['variant']} | {row['trainable_params']:,} | {1e3 * t['median']:.1f} "
            f"({1e3 * t['min']:.1f}-{1e3 * t['max']:.1f}) | {_f(row['vs_peft_lora_qkv'])} | {_f(row['vs_frozen'])} | "
            f"{_f(row['vs_fp32'])} | {_f(row['flops'] / 1e9 if row['flops'] else None, '{:.2f}')} | "
            f"{_f(row['achieved_flops'] / 1e9 if row['achieved_flops'] else None, '{:.1f}')} | "
            f"{_f(100 * row['utilisation'] if row['utilisation'] else None, '{:.0f} %')} | {mem_text} |")
    lines += ["", "| inference (forward) | variant | ms | vs plain |", "|---|---|---:|---:|"]
    for row in results["inference"]:
        t = row["forward_s"]
        lines.append(f"| {row['model']} | {row['variant']} | {1e3 * t['median']:.1f} ({1e3 * t['min']:.1f}-"
                     f"{1e3 * t['max']:.1f}) | {_f(row['vs_plain'])} |")
    mem_note = ("memory: CUDA peak of the step above the resting state" if results["device"] != "cpu" else
                "memory: saved activations + parameters + gradients + AdamW state (exact byte counts)")
    lines += ["", (f"{mem_note}; utilisation: FLOPs of the step (counted) / step time / measured matmul rate of the "
                   "variant's dtype (bf16 for bf16, bf16_base and compile).")]
    return "\n".join(lines)


def _has_peft() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        print("benchmarks/run.py: peft is not installed (pip install -e '.[dev]'); the PEFT rows are left out",
              file=sys.stderr)
        return False
    return True


def _load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "n/a"


def _names(value: str) -> list[str]:
    return [v for v in value.split(",") if v]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small",
                   help="small: 4-block 192-wide ViT, 64 px, batch 8 (CPU); paper: ViT-B/16, 224 px, batch 32 (GPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", type=_names, default=["fp32", "bf16", "bf16_base", "compile"],
                   help=f"comma-separated from {VARIANTS}")
    p.add_argument("--only", type=_names, default=None,
                   help="configurations to run (frozen and peft_lora_qkv always run: they are the anchors)")
    p.add_argument("--compile-configs", type=_names, default=["lora_qkv", "peft_lora_qkv"],
                   help="configurations that also run compiled (each compiles for minutes on a CPU)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the compile variant (aot_eager: traces only, for dry runs)")
    p.add_argument("--rounds", type=int, default=5, help="timed interleaved rounds")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (the first counts FLOPs and memory)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the size's batch")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--gemm-size", type=int, default=None, help="side of the square GEMM (default 1024 CPU, 8192 GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "run.json")
    p.add_argument("--markdown", action="store_true", help="print the README table")
    p.add_argument("--from-json", type=Path, default=None, help="with --markdown: print the table of a saved run")
    return p


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.from_json is not None:
        results = json.loads(args.from_json.read_text())
        print(markdown(results))
        return results
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {VARIANTS}")
    if args.warmup < 1 or args.rounds < 1:
        parser.error("--warmup and --rounds must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.gemm_size = args.gemm_size or (8192 if device.type == "cuda" else 1024)
    started = time.perf_counter()
    results = {
        "command": "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(), "load_average": _load_average(), "size": args.size,
        "model": ", ".join(f"{k}={v}" for k, v in SIZES[args.size][0].items()),
        "batch_size": args.batch_size or SIZES[args.size][1], "rank": args.rank, "rounds": args.rounds,
        "warmup": args.warmup, "variants": args.variants, "compile_backend": args.compile_backend,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    results.update(bench(args, device))
    results["load_average_end"] = _load_average()
    results["wall_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown:
        print()
        print(markdown(results))
    print(f"\nwrote {args.out} ({results['wall_s']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
