"""MixLoRA: routing, top-k mixture and load-balance loss against a direct per-token computation; refusal to merge or
export as a LoRA; its own format round-trips; the balance loss trains the router."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from visadapt.adapters import (
    REGULARISERS,
    MixLoRAConfig,
    export_peft,
    inject,
    load_adapter,
    merge_adapters,
    save_adapter,
)


def _model(**kw) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 6))
    inject(model, MixLoRAConfig(target="0|2", r=2, alpha=4, dropout=0.0, num_experts=4, top_k=2, **kw), verbose=False)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.5)
    return model


@torch.no_grad()
def _reference(layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: softmax over the router, top-k, renormalise, sum of w_e * s * B_e A_e x; and E * sum f P."""
    core = layer.adapters["default"]
    e_count, k = core.num_experts, core.top_k
    out = layer.base_layer(x).clone()
    counts = torch.zeros(k, e_count)
    prob_sum = torch.zeros(e_count)
    for t in range(x.shape[0]):
        logits = core.mix_router @ x[t]
        p = torch.exp(logits - logits.max())
        p = p / p.sum()
        prob_sum += p
        order = sorted(range(e_count), key=lambda e: -float(p[e]))[:k]
        total = sum(float(p[e]) for e in order)
        for slot, e in enumerate(order):
            counts[slot, e] += 1
            out[t] += float(p[e]) / total * core.scale * (core.lora_B[e] @ (core.lora_A[e] @ x[t]))
    n = x.shape[0]
    balance = e_count * ((counts / n) * (prob_sum / n)).sum()
    return out, balance


def test_router_top_k_and_balance_loss_against_a_direct_computation():
    model = _model()
    model.train()
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(3))
    layer = model[0]
    out = layer(x)
    expected, balance = _reference(layer, x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert (out - layer.base_layer(x)).abs().max() > 1e-2
    torch.testing.assert_close(layer.adapters["default"].aux_loss, balance, rtol=1e-5, atol=1e-6)
    # the regulariser: coef x balance of each matrix's last training forward, then cleared
    model(x)
    _, balance2 = _reference(model[2], model[1](model[0](x)))
    reg = REGULARISERS.get("mixlora")(model)
    torch.testing.assert_close(reg, 0.001 * (balance + balance2), rtol=1e-5, atol=1e-7)
    assert REGULARISERS.get("mixlora")(model) is None
    model.eval()
    model(x)
    assert REGULARISERS.get("mixlora")(model) is None  # no balance loss from evaluation passes


def test_not_mergeable_not_exportable_but_own_format_round_trips(tmp_path):
    model = _model()
    x = torch.randn(5, 6)
    with pytest.raises(NotImplementedError, match="routes every token.*no weight to merge"):
        merge_adapters(model)
    assert not model[0].merged  # nothing was merged
    with pytest.raises(NotImplementedError, match="cannot be exported as a LoRA"):
        export_peft(model, tmp_path / "peft")
    save_adapter(model, tmp_path / "own", base_identity="toy")
    other = nn.Sequential(nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 6))
    other.load_state_dict({k.replace("base_layer.", ""): v for k, v in model.state_dict().items()
                           if ".adapters." not in k})
    load_adapter(other, tmp_path / "own")
    model.eval(), other.eval()
    assert torch.equal(other(x), model(x))
    core = model[0].adapters["default"]
    assert core.num_parameters() == 4 * 2 * (6 + 10) + 4 * 6  # E r (in + out) + E in


def test_balance_loss_trains_the_router_towards_balance():
    model = _model()
    with torch.no_grad():  # a router that sends every token to experts 0 and 1
        for layer in (model[0], model[2]):
            router = layer.adapters["default"].mix_router
            router.zero_()
            router[:2] += 5.0 * layer.adapters["default"].mix_router.new_ones(router.shape[1])
    params = [p for n, p in model.named_parameters() if "mix_router" in n]
    optimiser = torch.optim.Adam(params, lr=0.05)
    x = torch.rand(64, 6, generator=torch.Generator().manual_seed(0)) + 0.5  # positive inputs keep 0, 1 on top
    model.train()
    losses = []
    for _ in range(40):
        optimiser.zero_grad()
        model(x)
        loss = REGULARISERS.get("mixlora")(model) / 0.001
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    # 2 layers x E * sum f P: fully collapsed onto 2 of 4 experts is 2 x 4 x (0.5 + 0.5) x 0.5 = 4; balanced is 2 x 2
    assert losses[0] > 3.9 and losses[-1] < 0.8 * losses[0]
