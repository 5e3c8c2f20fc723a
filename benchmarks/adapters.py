"""Speed and memory of visadapt adapters on ViT-B/16 against a frozen backbone, full fine-tuning and PEFT LoRA.

    python benchmarks/adapters.py                      # CPU defaults: batch 8, 224 px, 1 warmup + 2 timed rounds
    python benchmarks/adapters.py --device cuda --steps 20 --warmup 3

What is measured (timm ``vit_base_patch16_224``, random init, ``pretrained=False``; the classifier head is
trainable in every configuration, as a classification fine-tune would have it):

* training step = ``zero_grad`` + forward + cross-entropy + backward + AdamW step, median over ``--steps`` rounds.
  Configurations run interleaved (one step of each per round, the order rotated every round) after ``--warmup``
  rounds, so that drift of the machine and the configuration run just before affect all of them alike;
* memory: on every device, the bytes of activations saved for backward (unique storages, parameters excluded),
  counted with ``torch.autograd.graph.saved_tensors_hooks`` during a warmup step; on CUDA also the step's peak
  allocation above what was allocated before it (``torch.cuda.max_memory_allocated``);
* inference: forward in ``torch.inference_mode`` of the plain backbone against visadapt LoRA merged into it;
* layer level: forward + backward of one ``qkv`` Linear (768 -> 2304, batch x 197 tokens), the place where the
  implementations differ, over ``--layer-reps`` interleaved repetitions.

PEFT cannot adapt only the q and v slices of timm's fused ``qkv`` Linear, so it adapts the whole ``qkv``; visadapt
is measured both on the whole ``qkv`` (the like-for-like comparison) and on the q, v slices.
Writes ``benchmarks/results/adapters.json`` (or ``--out``) and prints the tables.
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
from pathlib import Path

import torch
from torch import nn

from visadapt.adapters import (
    BlockLoRAConfig,
    CompLoRAConfig,
    LoRAConfig,
    count_parameters,
    inject,
    is_adapter_param,
    merge_adapters,
)

QKV = r"blocks\.\d+\.attn\.qkv"
QV = QKV + "[q,v]"


def build_vit(seed: int = 0) -> nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model("vit_base_patch16_224", pretrained=False)


def _train_head(model: nn.Module) -> None:
    for p in model.head.parameters():
        p.requires_grad_(True)


def make_frozen() -> nn.Module:
    model = build_vit()
    model.requires_grad_(False)
    _train_head(model)
    return model


def make_full() -> nn.Module:
    return build_vit()


def make_visadapt(config) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        model = build_vit()
        inject(model, config, verbose=False)
        _train_head(model)
        return model

    return make


def make_peft(rank: int) -> nn.Module:
    import peft

    model = build_vit()
    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=QKV)
    model = peft.inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    _train_head(model)
    return model


def configurations(
    rank: int, with_peft: bool, only: list[str] | None = None
) -> dict[str, tuple[str, Callable[[], nn.Module]]]:
    """Key -> (label, builder); ``only`` keeps those keys (and ``frozen``, the reference)."""
    configs = {
        "frozen": ("backbone frozen, head trained", make_frozen),
        "full": ("full fine-tuning", make_full),
        "visadapt_lora_qkv": (
            f"visadapt LoRA r={rank} on whole qkv",
            make_visadapt(LoRAConfig(QKV, r=rank, alpha=rank)),
        ),
        "visadapt_lora_qv": (
            f"visadapt LoRA r={rank} on q,v slices",
            make_visadapt(LoRAConfig(QV, r=rank, alpha=rank)),
        ),
        "visadapt_block_lora_qv": (
            f"visadapt Block-LoRA r={rank} n=4 on q,v (shared form)",
            make_visadapt(BlockLoRAConfig(QV, r=rank, alpha=rank, n_blocks=4)),
        ),
        "visadapt_block_lora_arms_qv": (
            f"visadapt Block-LoRA r={rank} n=4 on q,v (literal arms)",
            make_visadapt(BlockLoRAConfig(QV, r=rank, alpha=rank, n_blocks=4, form="arms")),
        ),
        "visadapt_comp_lora_qv": (
            f"visadapt Comp-LoRA r={rank} k={rank} on q,v",
            make_visadapt(CompLoRAConfig(QV, r=rank, alpha=rank, protected=rank)),
        ),
    }
    if with_peft:
        configs["peft_lora_qkv"] = (f"PEFT LoRA r={rank} on whole qkv", lambda: make_peft(rank))
    if only:
        unknown = sorted(set(only) - set(configs))
        if unknown:
            raise SystemExit(f"--only: unknown configuration(s) {unknown}; choose from {sorted(configs)}")
        configs = {k: v for k, v in configs.items() if k in only or k == "frozen"}
    return configs


def _rotated(items: dict, shift: int) -> list:
    """The dict's items, rotated by ``shift``: over the rounds every configuration runs in every position, so that
    whatever a neighbour leaves behind (freed gradients, cold caches) does not always fall on the same one."""
    pairs = list(items.items())
    shift %= len(pairs)
    return pairs[shift:] + pairs[:shift]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def saved_activation_bytes(model: nn.Module, step: Callable[[], None]) -> int:
    """Run ``step`` and return the bytes of the unique non-parameter storages autograd saved for backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def bench_training(args, device: torch.device) -> dict:
    with_peft = _has_peft() and (not args.only or "peft_lora_qkv" in args.only)
    configs = configurations(args.rank, with_peft, args.only)
    x = torch.randn(args.batch_size, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    runs = {}
    for key, (label, make) in configs.items():
        t0 = time.perf_counter()
        model = make().to(device).train()
        trainable, total = count_parameters(model)
        optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        runs[key] = {
            "label": label,
            "model": model,
            "optimiser": optimiser,
            "trainable": trainable,
            "total": total,
            "times": [],
            "cuda_peak": [],
            "build_s": time.perf_counter() - t0,
        }
        print(f"built {key:<24} trainable {trainable:>12,}  ({runs[key]['build_s']:.1f} s)", flush=True)

    def step(run: dict) -> None:
        run["optimiser"].zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(run["model"](x), y)
        loss.backward()
        run["optimiser"].step()

    for rnd in range(args.warmup + args.steps):
        for key, run in _rotated(runs, rnd):
            if rnd == 0:
                run["activations"] = saved_activation_bytes(run["model"], lambda run=run: step(run))
                continue
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            step(run)
            _sync(device)
            elapsed = time.perf_counter() - t0
            if rnd >= args.warmup:
                run["times"].append(elapsed)
                if device.type == "cuda":
                    run["cuda_peak"].append(torch.cuda.max_memory_allocated(device) - before)
        print(f"round {rnd + 1}/{args.warmup + args.steps} done", flush=True)

    results = {}
    for key, run in runs.items():
        state = sum(
            t.numel() * t.element_size()
            for s in run["optimiser"].state.values()
            for t in s.values()
            if torch.is_tensor(t)
        )
        results[key] = {
            "label": run["label"],
            "trainable_params": run["trainable"],
            "total_params": run["total"],
            "step_s_median": statistics.median(run["times"]),
            "step_s_all": run["times"],
            "saved_activations_MB": run["activations"] / 2**20,
            "optimizer_state_MB": state / 2**20,
            "cuda_step_peak_MB": statistics.median(run["cuda_peak"]) / 2**20 if run["cuda_peak"] else None,
        }
    del runs
    return results


@torch.inference_mode()
def bench_inference(args, device: torch.device) -> dict:
    plain = build_vit().to(device).eval()
    merged = build_vit()
    inject(merged, LoRAConfig(QV, r=args.rank, alpha=args.rank), verbose=False)
    with torch.no_grad():
        for name, p in merged.named_parameters():
            if is_adapter_param(name):
                p.normal_(std=0.02)
    merge_adapters(merged)
    merged = merged.to(device).eval()
    x = torch.randn(args.batch_size, 3, 224, 224, device=device)
    times = {"plain": [], "visadapt_merged": []}
    models = {"plain": plain, "visadapt_merged": merged}
    for rnd in range(args.warmup + args.infer_steps):
        for key, model in _rotated(models, rnd):
            _sync(device)
            t0 = time.perf_counter()
            model(x)
            _sync(device)
            if rnd >= args.warmup:
                times[key].append(time.perf_counter() - t0)
    return {key: {"forward_s_median": statistics.median(v), "forward_s_all": v} for key, v in times.items()}


def bench_layer(args, device: torch.device) -> dict:
    """Forward + backward of one qkv Linear with each implementation (input requires grad, as mid-network)."""
    tokens, dim = args.batch_size * 197, 768
    torch.manual_seed(0)
    impls: dict[str, nn.Module] = {}

    def fresh() -> nn.Module:
        torch.manual_seed(0)
        layer = nn.Sequential()
        layer.add_module("qkv", nn.Linear(dim, 3 * dim))
        return layer.to(device)

    impls["frozen_linear"] = fresh().requires_grad_(False)
    r = args.rank
    for key, config in [
        ("visadapt_lora_qkv", LoRAConfig("qkv", r=r, alpha=r)),
        ("visadapt_lora_qv", LoRAConfig("qkv[q,v]", r=r, alpha=r)),
        ("visadapt_block_lora_qv", BlockLoRAConfig("qkv[q,v]", r=r, alpha=r, n_blocks=4)),
        ("visadapt_block_lora_arms_qv", BlockLoRAConfig("qkv[q,v]", r=r, alpha=r, n_blocks=4, form="arms")),
    ]:
        layer = fresh()
        inject(layer, config, verbose=False)
        impls[key] = layer
    if _has_peft():
        import peft

        impls["peft_lora_qkv"] = peft.inject_adapter_in_model(
            peft.LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=["qkv"]), fresh()
        )
    x = torch.randn(tokens, dim, device=device, requires_grad=True)
    grad = torch.randn(tokens, 3 * dim, device=device)
    flops = {}
    from torch.utils.flop_counter import FlopCounterMode

    for key, layer in impls.items():  # exact FLOPs of fwd+bwd (matmuls), immune to the machine's load
        with FlopCounterMode(display=False) as counter:
            layer(x).backward(grad)
        flops[key] = counter.get_total_flops()
        x.grad = None
        for p in layer.parameters():
            p.grad = None
    times: dict[str, list[float]] = {k: [] for k in impls}
    for rnd in range(3 + args.layer_reps):
        for key, layer in _rotated(impls, rnd):
            _sync(device)
            t0 = time.perf_counter()
            layer(x).backward(grad)
            _sync(device)
            if rnd >= 3:
                times[key].append(time.perf_counter() - t0)
            x.grad = None
            for p in layer.parameters():
                p.grad = None
    return {key: {"fwd_bwd_ms_median": 1e3 * statistics.median(v), "fwd_bwd_flops": flops[key]}
            for key, v in times.items()}


def _load_average() -> str:
    """The 1-minute load average at the start (other processes on the cores distort CPU timings)."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "n/a"


def _has_peft() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        print("benchmarks/adapters.py: peft is not installed (it is in the dev extra: pip install -e '.[dev]'); "
              "the PEFT LoRA rows are left out", file=sys.stderr)
        return False
    return True


def _ratio(a: float, b: float | None) -> str:
    return f"{a / b:.3f}" if b else "-"


def report(results: dict) -> str:
    train, inf, layer = results["training"], results["inference"], results["layer"]
    frozen, peft_run = train["frozen"], train.get("peft_lora_qkv")
    lines = [
        (
            f"ViT-B/16, batch {results['batch_size']}, 224 px, {results['device']} ({results['threads']} thread(s), "
            f"load average {results['load_average']}), median of {results['steps']} interleaved steps after "
            f"{results['warmup']} warmup"
        ),
        "",
        (
            "| configuration | trainable params | step s | vs frozen | vs PEFT | saved activations MB | vs frozen |"
            + (" CUDA step peak MB |" if frozen["cuda_step_peak_MB"] is not None else "")
        ),
        "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if frozen["cuda_step_peak_MB"] is not None else ""),
    ]
    for key, run in train.items():
        row = (
            f"| {run['label']} | {run['trainable_params']:,} | {run['step_s_median']:.3f} | "
            f"{_ratio(run['step_s_median'], frozen['step_s_median'])} | "
            f"{_ratio(run['step_s_median'], peft_run['step_s_median'] if peft_run else None)} | "
            f"{run['saved_activations_MB']:.0f} | {_ratio(run['saved_activations_MB'], frozen['saved_activations_MB'])} |"
        )
        if run["cuda_step_peak_MB"] is not None:
            row += f" {run['cuda_step_peak_MB']:.0f} |"
        lines.append(row)
    plain = inf["plain"]["forward_s_median"]
    lines += [
        "",
        "| inference (forward, batch as above) | s | vs plain |",
        "|---|---:|---:|",
        f"| plain backbone | {plain:.3f} | 1.000 |",
        (
            f"| visadapt LoRA q,v merged | {inf['visadapt_merged']['forward_s_median']:.3f} | "
            f"{_ratio(inf['visadapt_merged']['forward_s_median'], plain)} |"
        ),
        "",
        f"| one qkv Linear, fwd+bwd, {results['batch_size']}x197 tokens | ms | vs PEFT | adapter overhead vs PEFT's |",
        "|---|---:|---:|---:|",
    ]
    base_ms = layer["frozen_linear"]["fwd_bwd_ms_median"]
    peft_ms = layer.get("peft_lora_qkv", {}).get("fwd_bwd_ms_median")
    for key, value in layer.items():
        ms = value["fwd_bwd_ms_median"]
        overhead = _ratio(ms - base_ms, peft_ms - base_ms if peft_ms else None) if key != "frozen_linear" else "-"
        lines.append(f"| {key} | {ms:.1f} | {_ratio(ms, peft_ms)} | {overhead} |")
    lines += block_lora_table(results)
    lines += ["", "targets:"] + [f"  {'met ' if ok else 'MISSED'}  {text}" for text, ok in results["targets"]]
    return "\n".join(lines)


def layer_report(results: dict) -> str:
    """The layer-level table alone (``--layer-only``), with Block-LoRA's ratios to LoRA at the same r."""
    layer = results["layer"]
    base_ms, lora_ms = layer["frozen_linear"]["fwd_bwd_ms_median"], layer["visadapt_lora_qv"]["fwd_bwd_ms_median"]
    lines = [
        f"one qkv Linear (768 -> 2304), fwd+bwd, {results['batch_size']}x197 tokens, r={results['rank']}, "
        f"{results['device']} ({results['threads']} thread(s), load average {results['load_average']}), median of "
        f"{results['layer_reps']} interleaved repetitions",
        "",
        "| implementation | ms | adapter overhead ms (minus frozen) | overhead vs LoRA q,v | adapter GFLOP (fwd+bwd) |"
        " vs LoRA q,v |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    base_flops = layer["frozen_linear"]["fwd_bwd_flops"]
    lora_flops = layer["visadapt_lora_qv"]["fwd_bwd_flops"] - base_flops
    for key, value in layer.items():
        ms, flops = value["fwd_bwd_ms_median"], value["fwd_bwd_flops"] - base_flops
        frozen = key == "frozen_linear"
        extra = "-" if frozen else f"{ms - base_ms:.1f}"
        ratio = "-" if frozen else _ratio(ms - base_ms, lora_ms - base_ms)
        gflop = "-" if frozen else f"{flops / 1e9:.3f}"
        flop_ratio = "-" if frozen else _ratio(flops, lora_flops)
        lines.append(f"| {key} | {ms:.1f} | {extra} | {ratio} | {gflop} | {flop_ratio} |")
    return "\n".join(lines)


def block_lora_table(results: dict) -> list[str]:
    """Block-LoRA (both forms) against LoRA at the same r on the same q,v slices: parameters and time, ratios."""
    train, layer = results["training"], results["layer"]
    head = train["frozen"]["trainable_params"]
    lora = train.get("visadapt_lora_qv")
    if lora is None:
        return []
    base_ms = layer["frozen_linear"]["fwd_bwd_ms_median"]
    lora_ms = layer["visadapt_lora_qv"]["fwd_bwd_ms_median"]
    lines = [
        "",
        f"Block-LoRA against LoRA at the same r={results['rank']} on the q,v slices (ratios to LoRA)",
        "",
        "| configuration | adapter params | ratio | model step s | ratio | qkv layer fwd+bwd ms | ratio |"
        " adapter overhead ms | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key in ("visadapt_lora_qv", "visadapt_block_lora_qv", "visadapt_block_lora_arms_qv"):
        if key not in train:
            continue
        run, ms = train[key], layer[key]["fwd_bwd_ms_median"]
        params = run["trainable_params"] - head
        lines.append(
            f"| {run['label']} | {params:,} | {_ratio(params, lora['trainable_params'] - head)} | "
            f"{run['step_s_median']:.3f} | {_ratio(run['step_s_median'], lora['step_s_median'])} | {ms:.1f} | "
            f"{_ratio(ms, lora_ms)} | {ms - base_ms:.1f} | {_ratio(ms - base_ms, lora_ms - base_ms)} |"
        )
    return lines


def check_targets(results: dict) -> list[tuple[str, bool]]:
    train, inf = results["training"], results["inference"]
    checks = []
    for key, what in (("visadapt_lora_qkv", "whole qkv"), ("visadapt_lora_qv", "q,v slices")):
        if "peft_lora_qkv" in train and key in train:
            ratio = train[key]["step_s_median"] / train["peft_lora_qkv"]["step_s_median"]
            checks.append((f"visadapt LoRA ({what}) step / PEFT LoRA step = {ratio:.3f} <= 1.00", ratio <= 1.0))
    ratio = inf["visadapt_merged"]["forward_s_median"] / inf["plain"]["forward_s_median"]
    checks.append((f"merged inference / plain = {ratio:.3f} <= 1.03", ratio <= 1.03))
    if "visadapt_block_lora_qv" in train and "visadapt_lora_qv" in train:
        block, lora = train["visadapt_block_lora_qv"], train["visadapt_lora_qv"]
        checks.append((f"Block-LoRA trainable {block['trainable_params']:,} < LoRA trainable "
                       f"{lora['trainable_params']:,} (same r, same layers)",
                       block["trainable_params"] < lora["trainable_params"]))
        ratio = block["step_s_median"] / lora["step_s_median"]
        checks.append((f"Block-LoRA step / LoRA step (same r) = {ratio:.3f} <= 1.00", ratio <= 1.0))
    layer = results["layer"]
    ratio = layer["visadapt_block_lora_qv"]["fwd_bwd_ms_median"] / layer["visadapt_lora_qv"]["fwd_bwd_ms_median"]
    checks.append((f"Block-LoRA qkv layer fwd+bwd / LoRA's (same r) = {ratio:.3f} < 1.00", ratio < 1.0))
    return checks


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2, help="timed interleaved training rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (the first also counts memory)")
    parser.add_argument("--infer-steps", type=int, default=3, help="timed inference rounds")
    parser.add_argument("--layer-reps", type=int, default=10, help="timed repetitions of the layer benchmark")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--only", type=lambda v: [k for k in v.split(",") if k], default=None,
                        help="comma-separated training configurations to run (frozen always runs), e.g. "
                             "visadapt_lora_qv,visadapt_block_lora_qv,visadapt_block_lora_arms_qv")
    parser.add_argument("--layer-only", action="store_true", help="only the layer-level benchmark (minutes less)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "adapters.json")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started = time.perf_counter()
    results = {
        "command": "python benchmarks/adapters.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "load_average": _load_average(),
        "batch_size": args.batch_size,
        "rank": args.rank,
        "steps": args.steps,
        "warmup": args.warmup,
        "layer_reps": args.layer_reps,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    results["layer"] = bench_layer(args, device)
    if args.layer_only:
        results["wall_s"] = time.perf_counter() - started
        print()
        print(layer_report(results))
    else:
        results["training"] = bench_training(args, device)
        results["inference"] = bench_inference(args, device)
        results["targets"] = check_targets(results)
        results["wall_s"] = time.perf_counter() - started
        print()
        print(report(results))
    print(f"\ntotal {results['wall_s']:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
