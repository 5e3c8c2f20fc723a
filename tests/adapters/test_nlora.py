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
    inject(model, NLoRAConfig(target="0", r=3, alpha=6, offset=False, core="pinv"), verbose=False)
    core = model[0].adapters["default"]
    assert torch.equal(core.lora_A, w[:3]) and torch.equal(core.lora_B, w[:, :3])  # R = W[I, :], C = W[:, J]
    torch.testing.assert_close(core.lora_N, torch.linalg.pinv(w[:3, :3].double()).float())
    # without the offset the model starts at W + s C U^+ R (the official code's start, with the Nyström core)
    torch.testing.assert_close(core.delta_weight(), 2.0 * w[:, :3] @ torch.linalg.pinv(w[:3, :3]) @ w[:3],
                               rtol=1e-4, atol=1e-5)
    # the official core (the default) is W[I, J] itself; "norm" picks the rows / columns of largest norm
    raw = NLoRA(w, NLoRAConfig(target="x", r=3, select="norm"))
    rows, cols = w.norm(dim=1).topk(3).indices.sort().values, w.norm(dim=0).topk(3).indices.sort().values
    assert torch.equal(raw.lora_N, w[rows][:, cols]) and torch.equal(raw.lora_A, w[rows])


def test_full_rank_nystrom_reproduces_the_weight():
    w = torch.randn(12, 8)
    core = NLoRA(w, NLoRAConfig(target="x", r=8, alpha=8, offset=False, core="pinv"))  # C U^+ R = W if rank(U) = rank(W)
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
        n0 = w[:3, :3]  # the default core is the official raw W[I, J]
        assert torch.equal(core.nys_N0, n0)
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
    # the raw core (default) makes the products cubic in the small toy weights: a large scale makes them visible
    inject(case.model, NLoRAConfig(target=r"blocks\.\d+\.(attn\.qkv|mlp\.fc2)", r=3, alpha=300, mode=mode), verbose=False)
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


def _sign_step_sensitivity(adapter: nn.Module, weight: torch.Tensor, h: float = 1e-3) -> float:
    """``|ΔW| / (h |W|)`` after AdamW's first step (every trainable entry moves by ``± h``)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter.parameters():
            if p.requires_grad:
                p.add_(h * torch.sign(torch.randn(p.shape, generator=gen)))
        return (adapter.delta_weight().norm() / (h * weight.norm())).item()


def test_a_step_stays_bounded_on_an_ill_conditioned_core():
    """Regression (issue 15): the pinv core of a near-singular W[:r, :r] (EfficientNet-Lite0's 1x1 convs reach
    cond 2e8) turned one AdamW step into ΔW ~ 1e6 |W| and training collapsed to chance. W itself is well conditioned
    here (cond ~11); only its leading 3 x 3 block is nearly singular (cond ~4e8)."""
    from visadapt.adapters.lora import LoRA, LoRAConfig

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 12, generator=gen)
    w[:3, :3] = sum(torch.outer(torch.randn(3, generator=gen), torch.randn(3, generator=gen)) for _ in range(2))
    w[2, 2] += 1e-6
    w = 0.1 * w  # the size of real 1x1-conv entries
    assert torch.linalg.cond(w[:3, :3].double()) > 1e8 and torch.linalg.cond(w) < 20
    lora = _sign_step_sensitivity(LoRA(w, LoRAConfig(target="x", r=3, alpha=3)), w)
    default = _sign_step_sensitivity(NLoRA(w, NLoRAConfig(target="x", r=3, alpha=3)), w)  # the official raw core
    cut = _sign_step_sensitivity(NLoRA(w, NLoRAConfig(target="x", r=3, alpha=3, core="pinv", rcond=1e-2)), w)
    exact = _sign_step_sensitivity(NLoRA(w, NLoRAConfig(target="x", r=3, alpha=3, core="pinv")), w)
    assert default < 5 * lora and cut < 5 * lora  # about LoRA's step
    assert exact > 1e5 * lora  # the paper's exact pseudo-inverse: the amplification the defaults avoid
    # the cutoff bounds the core: |N| <= 1 / (rcond sigma_max(W[I, J]))
    core = NLoRA(w, NLoRAConfig(target="x", r=3, core="pinv", rcond=1e-2)).lora_N
    assert torch.linalg.matrix_norm(core, 2) <= 1.0001 / (1e-2 * torch.linalg.matrix_norm(w[:3, :3], 2))
    with pytest.raises(ValueError, match="rcond"):
        NLoRAConfig(target="x", rcond=1.0)
