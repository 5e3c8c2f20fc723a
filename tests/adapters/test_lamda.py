"""LaMDA: what trains, the freezing schedule (which columns, at which step, exact vs official gradient-only), A rebuilt
without being stored, LaMDA++'s rank rule against a direct computation, and the PEFT export."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from visadapt.adapters import SCHEDULES, LaMDAConfig, adapter_layers, inject, load_adapter, save_adapter
from visadapt.adapters.lamda import LaMDA


def _model(config: LaMDAConfig) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 6))
    inject(model, config, verbose=False)
    return model


def _train(model: nn.Module, steps: int, total: int, optimiser: torch.optim.Optimizer, record=None) -> None:
    """Optimiser steps with the ``lamda`` schedule called after each, as AdapterModule.on_train_batch_end does."""
    schedule = SCHEDULES.get("lamda")()
    gen = torch.Generator().manual_seed(2)
    for step in range(1, steps + 1):
        x = torch.randn(8, 10, generator=gen)
        optimiser.zero_grad()
        model(x).pow(2).mean().backward()
        optimiser.step()
        schedule.on_train_step_end(model, step, total, lr=0.0)
        if record is not None:
            record.append(model[0].adapters["default"].lora_B.detach().clone())


def test_only_core_and_b_train_and_a_is_rebuilt_not_stored(tmp_path):
    model = _model(LaMDAConfig(target="0|2", r=4, alpha=8))
    core = model[0].adapters["default"]
    assert {n for n, p in core.named_parameters()} == {"lamda_S", "lora_B"}
    assert core.num_parameters() == 4 * 4 + 16 * 4  # r^2 + out r; A is a buffer
    assert "lamda_A" not in dict(model.state_dict()) and torch.equal(core.lora_B, torch.zeros(16, 4))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    save_adapter(model, tmp_path, base_identity="toy")
    other = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 6))
    other.load_state_dict({k.replace("base_layer.", ""): v for k, v in model.state_dict().items()
                           if ".adapters." not in k})
    load_adapter(other, tmp_path)
    assert torch.equal(other[0].adapters["default"].lamda_A, core.lamda_A)  # same seed, same draw
    x = torch.randn(3, 10)
    assert torch.equal(other(x), model(x))
    a, b = core.factors()
    torch.testing.assert_close(core.delta_weight(), core.scale * b @ core.lamda_S @ core.lamda_A)


@pytest.mark.parametrize("freeze", ["exact", "gradient"])
def test_schedule_freezes_the_right_columns_at_the_right_step(freeze):
    # r = 4, eta = 0.25, 12 steps: after step s the first floor((s / 12) / 0.25) = s // 3 columns are frozen
    model = _model(LaMDAConfig(target="0", r=4, alpha=8, freeze_eta=0.25, freeze=freeze))
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    record: list[torch.Tensor] = []
    _train(model, 12, 12, optimiser, record)
    core = model[0].adapters["default"]
    assert core.frozen_columns == 4 and [core.columns_to_freeze(s, 12) for s in range(13)] == [s // 3 for s in range(13)]
    for step in range(1, 12):  # record[step - 1] is B after optimiser step `step`
        frozen = step // 3  # columns frozen after step `step`, i.e. during step `step + 1`
        before, after = record[step - 1], record[step]
        if freeze == "exact":
            assert torch.equal(after[:, :frozen], before[:, :frozen]), f"a frozen column moved at step {step + 1}"
        else:  # official: gradient zeroed, but AdamW momentum and weight decay keep moving the column
            assert frozen == 0 or not torch.equal(after[:, :frozen], before[:, :frozen])
        assert not torch.equal(after[:, frozen:], before[:, frozen:]), f"a free column did not move at step {step + 1}"


def test_eta_zero_freezes_b_from_the_first_step_and_only_the_core_trains():
    model = _model(LaMDAConfig(target="0", r=3, alpha=3, freeze_eta=0.0))
    core = model[0].adapters["default"]
    with torch.no_grad():
        core.lora_B.normal_()
    b0, s0 = core.lora_B.detach().clone(), core.lamda_S.detach().clone()
    SCHEDULES.get("lamda")().on_train_step_end(model, 0, 10, 0.0)  # freezing at step 0, before any step
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    _train(model, 3, 10, optimiser)
    assert torch.equal(core.lora_B, b0) and not torch.equal(core.lamda_S, s0)


def test_lamda_plus_plus_rank_follows_the_energy_rule():
    torch.manual_seed(0)
    flat = torch.linalg.qr(torch.randn(24, 24))[0] * 3.0  # all singular values equal: rank r
    peaked = torch.randn(24, 3) @ torch.randn(3, 24) + 1e-3 * torch.randn(24, 24)  # energy in 3 directions
    model = nn.ModuleDict({"flat": nn.Linear(24, 24), "peaked": nn.Linear(24, 24), "wide": nn.Linear(24, 20)})
    with torch.no_grad():
        model.flat.weight.copy_(flat)
        model.peaked.weight.copy_(peaked)
    inject(model, LaMDAConfig(target="flat|peaked|wide", r=4, rank_allocation="energy", r_min=2, r_max=12),
           verbose=False)
    ranks = {n: layer.adapters["default"].r for n, layer in adapter_layers(model)}
    assert ranks["flat"] == 4 and ranks["peaked"] == 2
    s2 = torch.linalg.svdvals(model.wide.base_weight.double()).pow(2)
    expected = round(4 * (1 - float(s2[:4].sum() / s2.sum())) / (1 - 4 / 20))
    assert ranks["wide"] == max(2, min(12, expected))
    assert model.wide.adapters["default"].lamda_S.shape == (ranks["wide"],) * 2


def test_peft_export_has_identical_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    model = _model(LaMDAConfig(target="0|2", r=4, alpha=8, a_init="svd"))
    base = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 6))
    base.load_state_dict({k.replace("base_layer.", ""): v for k, v in model.state_dict().items()
                          if ".adapters." not in k})
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.adapters["default"].lora_B.normal_()
    from visadapt.adapters import export_peft

    export_peft(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    x = torch.randn(5, 10)
    with torch.no_grad():
        assert (model(x) - base(x)).abs().max() > 1e-2
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-6)
    core = model[0].adapters["default"]
    vh = torch.linalg.svd(model[0].base_weight.double())[2][:4]
    assert isinstance(core, LaMDA) and math.isclose((core.lamda_A.double() @ vh.T).abs().diag().min(), 1.0,
                                                    rel_tol=1e-5)
