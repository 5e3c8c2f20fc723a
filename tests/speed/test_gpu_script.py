"""The prepared GPU run (benchmarks/gpu.py) parses and dry-runs every measurement on the CPU, and the harness
(benchmarks/run.py) turns its numbers into the README table."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_gpu_script_dry_run(tmp_path):
    gpu = _load("gpu")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = gpu.main(["--dry-run", "--out", str(tmp_path)])
    finally:
        torch._dynamo.reset()
        torch.set_num_threads(before)
    m = summary["measurements"]
    assert set(m) == {"train_inference", "fscil", "lorat_fps"} and not summary["skipped"]
    rates = m["train_inference"]["images_per_s"]
    assert {"lora_qv|bf16", "peft_lora_qkv|bf16", "frozen|bf16", "lora_qv|compile"} <= set(rates)
    assert all(v > 0 for v in rates.values())
    assert len(m["fscil"]["sessions"]) == 2 and all(s["train_s"] > 0 for s in m["fscil"]["sessions"])
    assert set(m["lorat_fps"]) == {"plain", "merged", "unmerged"}
    run = json.loads((tmp_path / "train_inference.json").read_text())
    # the step's FLOPs are counted, not guessed: the adapted step does more work than the frozen one, less than full
    flops = {(r["config"], r["variant"]): r["flops"] for r in run["training"]}
    assert flops[("frozen", "bf16")] < flops[("lora_qv", "bf16")] == flops[("lora_qv", "compile")]
    assert run["gemm_flops"]["bf16"]["median"] > 0 and (tmp_path / "summary.md").is_file()
    table = _load("run").markdown(run)
    assert "| visadapt LoRA r=16 on q,v slices (CoACT, CLIP-LoRA) | compile |" in table
