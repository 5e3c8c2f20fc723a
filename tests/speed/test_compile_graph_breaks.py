"""torch.compile: an adapted model traces without graph breaks (dynamo's own count, ``torch._dynamo.explain``), the
compiled training step equals the eager one, and ``configs/speed/compile.yaml`` compiles the main task's blocks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from visadapt.adapters import BlockLoRAConfig, LoRAConfig, inject, is_adapter_param, merge_adapters
from visadapt.methods.compile import compile_targets

ROOT = Path(__file__).resolve().parents[2]
TINY_DATA = ["--data.init_args.dataset=procedural_shapes", "--data.init_args.dataset_kwargs={num_per_class: 6}",
             "--data.init_args.root=null", "--data.init_args.val_split=null", "--data.init_args.split_file=null"]
TARGET = r"blocks\.\d+\.attn\.qkv[q,v]|blocks\.\d+\.attn\.proj|blocks\.\d+\.mlp\.fc1"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(before)


def _adapted(dropout: float, config: type = LoRAConfig, **kwargs) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=5)
    inject(model, config(TARGET, r=4, alpha=8.0, dropout=dropout, **kwargs), verbose=False)  # q,v slices + Linears
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter_param(name):
                p.normal_(std=0.05)
    return model


def _breaks(model: nn.Module, x: torch.Tensor) -> tuple[int, list[str]]:
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    in_adapters = [r.reason for r in explained.break_reasons
                   if any("visadapt/adapters" in frame.filename for frame in r.user_stack)]
    return explained.graph_break_count, in_adapters


@pytest.mark.parametrize("state", ["train_dropout", "eval", "merged", "block_lora_train"])
def test_adapted_vit_has_no_graph_break(state):
    extra = {"config": BlockLoRAConfig, "n_blocks": 2} if state.startswith("block_lora") else {}  # the main task's
    model = _adapted(dropout=0.0 if state in ("eval", "merged") else 0.1, **extra).train(state != "eval")
    if state == "merged":
        merge_adapters(model)
    total, in_adapters = _breaks(model, torch.randn(2, 3, 32, 32))
    assert in_adapters == [] and total == 0


def test_compiled_training_step_equals_eager():
    # fullgraph: any graph break is an error; aot_eager traces forward and backward (the adapter layer's autograd
    # Function included) without generating kernels, so the check is fast and exact up to float reassociation
    eager, compiled = _adapted(0.0).train(), _adapted(0.0).train()
    fast = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 4, 2])
    for model, run in ((eager, eager), (compiled, fast)):
        nn.functional.cross_entropy(run(x), y).backward()
    grads = {n: p.grad for n, p in eager.named_parameters() if p.requires_grad}
    assert grads and all(is_adapter_param(n) for n in grads)
    for name, p in compiled.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_compile_targets_are_the_adapted_blocks():
    model = _adapted(0.0)
    assert compile_targets(model) == ["blocks.0", "blocks.1"]
    assert compile_targets(model, r"blocks\.\d+|blocks\.0\.attn") == ["blocks.0", "blocks.1"]  # outermost only
    with pytest.raises(ValueError, match="matches no module"):
        compile_targets(model, "nothing")


def test_compile_fragment_compiles_the_main_task(tmp_path):
    from torch._dynamo.utils import counters

    from visadapt.cli import cli_main

    counters.clear()
    cli = cli_main(["fit", "-c", str(ROOT / "tasks" / "clip_fewshot.yaml"), "-c",
                    str(ROOT / "configs" / "speed" / "compile.yaml"),
                    "--trainer.callbacks.backend=eager",  # dynamo without kernel generation: seconds
                    "--trainer.fast_dev_run=1", "--trainer.accelerator=cpu",
                    "--model.init_args.backbone=tiny_open_clip", "--model.init_args.backbone_kwargs={}",
                    "--model.init_args.adapter.init_args.target=attn_qv", *TINY_DATA,
                    "--data.init_args.shots=2", "--data.init_args.image_size=32",
                    f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}"])
    compiled = cli.model.report["compiled"]
    assert compiled["backend"] == "eager" and compiled["modules"] >= 2
    blocks = [m for m in cli.model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert len(blocks) == compiled["modules"]
    assert counters["stats"]["unique_graphs"] >= 1 and cli.trainer.global_step == 1  # dynamo traced them and trained
