"""SLoRA / NLoRA / IntTune: the Nyström init (values, offset start at W, the official no-offset start), the core-only
mode trains only the r x r core, and the updates export to PEFT with identical outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from visadapt.adapters import adapter_layers, export_peft, inject, is_adapter_param
from visadapt.adapters.nlora import NLoRA, NLoRAConfig


def _layer(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 14), nn.Tanh(), nn.Linear(14, 6))


def test_nystrom_values_and_official_start():
    model = _layer()
    w = model[0].weight.detach().clone()
    inject(model, NLoRAConfig(target="0", r=3, alpha=6, offset=False), verbose=False)
    core = model[0].adapters["default"]
    assert torch.equal(core.lora_A, w[:3]) and torch.equal(core.lora_B, w[:, :3])  # R = W[I, :], C = W[:, J]
    torch.testing.assert_close(core.lora_N, torch.linalg.pinv(w[:3, :3].double()).float())
    # without the offset the model starts at W + s C U^+ R (the official code's start, with the Nyström core)
    torch.testing.assert_close(core.delta_weight(), 2.0 * w[:, :3] @ torch.linalg.pinv(w[:3, :3]) @ w[:3],
                               rtol=1e-4, atol=1e-5)
    # the official core is W[I, J] itself; "norm" picks the rows / columns of largest norm
    raw = NLoRA(w, NLoRAConfig(target="x", r=3, core="raw", select="norm"))
    rows, cols = w.norm(dim=1).topk(3).indices.sort().values, w.norm(dim=0).topk(3).indices.sort().values
    assert torch.equal(raw.lora_N, w[rows][:, cols]) and torch.equal(raw.lora_A, w[rows])


def test_full_rank_nystrom_reproduces_the_weight():
    w = torch.randn(12, 8)
    core = NLoRA(w, NLoRAConfig(target="x", r=8, alpha=8, offset=False))  # C U^+ R = W when rank(U) = rank(W)
    torch.testing.assert_close(core.delta_weight(), w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["nlora", "inttune", "slora"])
def test_starts_at_the_pretrained_function_and_trains(mode):
    model, x = _layer(), torch.randn(16, 10)
    base = copy.deepcopy(model)
    inject(model, NLoRAConfig(target="0|2", r=3, alpha=3, mode=mode), verbose=False)
    with torch.no_grad():
        assert torch.equal(model(x), base(x))  # bitwise, also with the Nyström init (the offset)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    expected = {"nlora": {"lora_A", "lora_B", "lora_N"}, "inttune": {"lora_N"}, "slora": {"lora_A", "lora_B", "lora_N"}}
    assert {n.rsplit(".", 1)[1] for n in names} == expected[mode] and all(is_adapter_param(n) for n in names)
    counts = {"nlora": 3 * (10 + 14) + 9 + 3 * (14 + 6) + 9, "inttune": 9 + 9, "slora": 3 * (10 + 14) + 9 + 3 * (14 + 6) + 9}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == counts[mode]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    goal = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), goal)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]  # learning measurably happens
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != p.requires_grad, n  # exactly the trainable tensors moved
    if mode == "inttune":  # only the core moved: ΔW = s B0 (N - N0) A0
        core = model[0].adapters["default"]
        w = base[0].weight.detach()
        n0 = torch.linalg.pinv(w[:3, :3].double()).float()
        torch.testing.assert_close(core.delta_weight(), w[:, :3] @ (core.lora_N.detach() - n0) @ w[:3],
                                   rtol=1e-4, atol=1e-5)


def test_core_only_stores_only_the_core(tmp_path):
    from visadapt.adapters import adapter_state_dict

    model = _layer()
    inject(model, NLoRAConfig(target="0|2", r=3, mode="inttune"), verbose=False)
    assert {k.rsplit(".", 1)[1] for k in adapter_state_dict(model)} == {"lora_N"}
    assert [tuple(v.shape) for v in adapter_state_dict(model).values()] == [(3, 3), (3, 3)]


@pytest.mark.parametrize("mode", ["nlora", "inttune"])
def test_exports_to_peft_with_identical_outputs(toy, tmp_path, mode):
    peft = pytest.importorskip("peft")
    case = toy("vit")
    base = copy.deepcopy(case.model)
    inject(case.model, NLoRAConfig(target=r"blocks\.\d+\.(attn\.qkv|mlp\.fc2)", r=3, alpha=3, mode=mode), verbose=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in case.model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05 * p.abs().mean())
        adapted, unadapted = case.run(case.model), case.run(base)
    export_peft(case.model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path)
    assert loaded.get_submodule("blocks.0.attn.qkv").r["default"] == (6 if mode == "nlora" else 3)  # rank 2r / r
    with torch.no_grad():
        out = case.run(loaded)
    assert (adapted - unadapted).abs().max() > 1e-3 * unadapted.abs().max()
    torch.testing.assert_close(out, adapted, rtol=1e-5, atol=1e-5 * adapted.abs().max().item())


def test_nystrom_rank_must_fit():
    with pytest.raises(ValueError, match="needs r=12 <= min"):
        inject(_layer(), NLoRAConfig(target="0", r=12), verbose=False)
    assert [type(layer.adapters["default"]) for _, layer in adapter_layers(inject_slora())] == [NLoRA]


def inject_slora() -> nn.Module:
    model = _layer()
    inject(model, NLoRAConfig(target="0", r=12, mode="slora"), verbose=False)  # no Nyström: any rank
    return model
