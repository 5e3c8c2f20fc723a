"""Fused-qkv slices behave as separate q, k, v Linears with their own LoRA (CLIP-LoRA's layout): independent A and B
per slice, and an independent dropout mask per slice; without active dropout the slices share one down GEMM."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import visadapt.adapters.base as adapter_base
from visadapt.adapters import LoRAConfig, inject


def _fused_and_separate(dropout: float, seed: int = 0):
    """A fused qkv Linear with a [q,k,v] LoRA, and three separate Linears holding the same numbers."""
    torch.manual_seed(seed)
    fused = nn.Sequential()
    fused.add_module("qkv", nn.Linear(8, 24))
    separate = nn.ModuleDict({s: nn.Linear(8, 8) for s in "qkv"})
    with torch.no_grad():
        for i, s in enumerate("qkv"):
            separate[s].weight.copy_(fused.qkv.weight[8 * i : 8 * (i + 1)])
            separate[s].bias.copy_(fused.qkv.bias[8 * i : 8 * (i + 1)])
    config = LoRAConfig(target="qkv[q,k,v]", r=2, alpha=1.0, rslora=True, dropout=dropout)
    inject(fused, config, verbose=False)
    inject(separate, LoRAConfig(target="q|k|v", r=2, alpha=1.0, rslora=True, dropout=dropout), verbose=False)
    with torch.no_grad():
        for s in "qkv":
            ours, theirs = fused.qkv.adapters["default"][s], separate[s].adapters["default"]
            theirs.lora_A.copy_(ours.lora_A)
            ours.lora_B.normal_()
            theirs.lora_B.copy_(ours.lora_B)
    return fused, separate


def _run_separate(separate: nn.ModuleDict, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([separate[s](x) for s in "qkv"], dim=-1)


def test_slices_have_independent_factors():
    fused, _ = _fused_and_separate(0.0)
    slices = fused.qkv.adapters["default"]
    assert list(slices) == ["q", "k", "v"]
    params = [p for s in "qkv" for p in (slices[s].lora_A, slices[s].lora_B)]
    assert len({p.data_ptr() for p in params}) == 6
    assert not torch.equal(slices["q"].lora_A, slices["k"].lora_A)


def test_dropout_draws_one_mask_per_slice_like_separate_linears():
    """Same seed, same draw order (q, k, v): the fused layer equals three separate LoRA Linears in training mode,
    output and gradients. With one mask shared by the slices it would not."""
    fused, separate = _fused_and_separate(0.5)
    fused.train(), separate.train()
    x = torch.randn(3, 5, 8, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    torch.manual_seed(7)
    out = fused(x)
    torch.manual_seed(7)
    expected = _run_separate(separate, x2)
    torch.testing.assert_close(out, expected)
    goal = torch.randn_like(out)
    (out * goal).sum().backward()
    (expected * goal).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    for s in "qkv":
        torch.testing.assert_close(fused.qkv.adapters["default"][s].lora_A.grad,
                                   separate[s].adapters["default"].lora_A.grad)
    # one mask shared by the three slices gives another output (the old behaviour)
    torch.manual_seed(7)
    mask = nn.functional.dropout(torch.ones(15, 8), 0.5)
    shared = torch.cat([separate[s].base_layer(x2) + separate[s].adapters["default"].scale
                        * (x2.reshape(15, 8) * mask).reshape(3, 5, 8) @ separate[s].adapters["default"].lora_A.T
                        @ separate[s].adapters["default"].lora_B.T for s in "qkv"], dim=-1)
    assert not torch.allclose(shared, expected, atol=1e-3)


@pytest.mark.parametrize("mode", ["dropout0", "eval"])
def test_without_active_dropout_one_down_gemm_and_same_outputs(monkeypatch, mode):
    """dropout=0 (or eval mode) keeps the fast path: one GEMM for the base layer and one for the stacked A of all
    three slices (the per-slice path needs three), with the outputs of the per-slice (separate Linears) path."""
    fused, separate = _fused_and_separate(0.0 if mode == "dropout0" else 0.5)
    if mode == "eval":
        fused.eval(), separate.eval()
    x = torch.randn(4, 8)
    calls = []
    linear = adapter_base.F.linear
    monkeypatch.setattr(adapter_base.F, "linear", lambda *a, **k: calls.append(1) or linear(*a, **k))
    with torch.no_grad():
        out = fused(x)
    monkeypatch.undo()
    assert len(calls) == 2, calls
    with torch.no_grad():
        torch.testing.assert_close(out, _run_separate(separate, x), rtol=1e-6, atol=1e-6)
