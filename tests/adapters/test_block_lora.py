"""Block-LoRA's two forms: the literal n arms and the shared (summed) up-projection train identically under AdamW."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from visadapt.adapters import BlockLoRAConfig, LoRAConfig, adapter_layers, count_parameters, inject


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 36), nn.Tanh(), nn.Linear(36, 5))


def _inject(model: nn.Module, config) -> nn.Module:
    torch.manual_seed(1)  # the same A_s in every form (A is drawn first and has the same shape)
    inject(model, config, verbose=False)
    return model


def _train(model: nn.Module, steps: int, dropout_seed: int | None = None, optimiser: str = "adamw",
           eps: float = 1e-8) -> list[float]:
    gen = torch.Generator().manual_seed(2)
    x, goal = torch.randn(64, 12, generator=gen), torch.randn(64, 5, generator=gen)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimiser == "adamw":
        optimiser = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, eps=eps)
    else:
        optimiser = torch.optim.SGD(params, lr=0.3, momentum=0.9, weight_decay=0.01)
    losses = []
    if dropout_seed is not None:
        torch.manual_seed(dropout_seed)
    for _ in range(steps):
        optimiser.zero_grad()
        loss = nn.functional.mse_loss(model(x), goal)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("optimiser", ["adamw", "sgd"])
@pytest.mark.parametrize("n_blocks,scale_rank", [(2, "rank"), (4, "block")])
def test_shared_form_trains_like_the_literal_arms(n_blocks, scale_rank, optimiser):
    """200 optimiser steps with weight decay: the n arms stay bitwise identical, and the shared form (one tied B)
    gives the same outputs and the same update (bitwise at n=2, where n*B is the arms' sum exactly)."""
    config = dict(target=r"0|2", r=8, alpha=4.0, n_blocks=n_blocks, scale_rank=scale_rank)
    arms = _inject(_model(), BlockLoRAConfig(**config, form="arms"))
    shared = _inject(_model(), BlockLoRAConfig(**config))
    for name, layer in adapter_layers(arms):
        assert torch.equal(layer.adapters["default"].lora_A, shared.get_submodule(name).adapters["default"].lora_A)
    losses = [_train(m, 200, optimiser=optimiser) for m in (arms, shared)]
    x = torch.randn(16, 12)
    with torch.no_grad():
        out_arms, out_shared, out_base = arms(x), shared(x), _model()(x)
    assert losses[0][-1] < 0.75 * losses[0][0]  # it trained
    assert not torch.allclose(out_arms, out_base, atol=1e-2)
    if n_blocks == 2:
        assert torch.equal(out_shared, out_arms)
    torch.testing.assert_close(out_shared, out_arms, rtol=1e-5, atol=1e-6)
    for name, layer in adapter_layers(arms):
        blocks = list(layer.adapters["default"].lora_B)
        assert all(torch.equal(b, blocks[0]) for b in blocks[1:]), "the arms diverged"
        torch.testing.assert_close(shared.get_submodule(name).delta_weight(), layer.delta_weight(),
                                   rtol=1e-5, atol=1e-7)


def test_shared_form_is_a_rank_r_over_n_lora_with_n_times_the_scale_under_adam():
    """Under AdamW the 1/n gradient only rescales Adam's eps: with eps negligible the plain rank-r/n LoRA with
    scale n*s trains to the same outputs."""
    shared = _inject(_model(), BlockLoRAConfig(target=r"0|2", r=8, alpha=4.0, n_blocks=4))
    lora = _inject(_model(), LoRAConfig(target=r"0|2", r=2, alpha=4 * (4.0 / 8) * 2))  # scale n*s = 4 * 4/8
    assert adapter_layers(lora)[0][1].adapters["default"].scale == 4 * shared[0].adapters["default"].scale
    for m in (shared, lora):
        _train(m, 200, eps=1e-16)
    x = torch.randn(16, 12)
    with torch.no_grad():
        torch.testing.assert_close(shared(x), lora(x), rtol=1e-5, atol=1e-6)


def test_parameter_counts_per_form():
    layer = nn.Sequential(nn.Linear(40, 24))
    counts = {}
    for key, config in {
        "lora": LoRAConfig(target="0", r=8),
        "shared": BlockLoRAConfig(target="0", r=8, n_blocks=4),
        "arms": BlockLoRAConfig(target="0", r=8, n_blocks=4, form="arms"),
    }.items():
        model = copy.deepcopy(layer)
        inject(model, config, verbose=False)
        counts[key] = count_parameters(model)[0]
    assert counts == {"lora": 8 * (40 + 24), "shared": 2 * (40 + 24), "arms": 2 * 40 + 8 * 24}


def test_arm_dropout_makes_the_arms_differ_and_shared_dropout_does_not():
    for arm_dropout in (False, True):
        model = _inject(_model(), BlockLoRAConfig(target=r"0|2", r=4, alpha=4.0, n_blocks=2, form="arms",
                                                  dropout=0.3, arm_dropout=arm_dropout))
        model.train()
        _train(model, 20, dropout_seed=3)
        b0, b1 = model[2].adapters["default"].lora_B
        assert torch.equal(b0, b1) != arm_dropout


def test_arm_dropout_draws_one_mask_per_arm():
    """Reference: sum_i B_i A_s drop_i(x), with the masks drawn in arm order from the same seed."""
    model = _inject(nn.Sequential(nn.Linear(12, 9)), BlockLoRAConfig(target="0", r=3, alpha=3.0, n_blocks=3,
                                                                      form="arms", dropout=0.5, arm_dropout=True))
    core = model[0].adapters["default"]
    with torch.no_grad():
        for i, b in enumerate(core.lora_B):
            b.copy_(torch.randn(b.shape) * (i + 1))
    x = torch.randn(7, 12)
    model.train()
    torch.manual_seed(5)
    out = model(x)
    torch.manual_seed(5)
    expected = model[0].base_layer(x) + sum(
        core.scale * nn.functional.dropout(x, 0.5) @ core.lora_A.T @ b.T for b in core.lora_B
    )
    torch.testing.assert_close(out, expected)


def test_form_validation():
    with pytest.raises(ValueError, match="form"):
        BlockLoRAConfig(form="tied")
    with pytest.raises(ValueError, match="arm_dropout"):
        BlockLoRAConfig(r=8, dropout=0.1, arm_dropout=True)
