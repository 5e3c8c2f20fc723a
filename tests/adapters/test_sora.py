"""SoRA: the proximal gate step is soft-thresholding, it runs after each optimiser step of a Lightning fit, and pruning
yields a plain LoRA with the same outputs (which PEFT loads with the same outputs)."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from visadapt.adapters import (
    REGULARISERS,
    SCHEDULES,
    LoRA,
    adapter_layers,
    count_parameters,
    export_peft,
    inject,
    load_adapter,
    save_adapter,
)
from visadapt.adapters.sora import SoRA, SoRAConfig, proximal_step, prune_sora, soft_threshold, sora_cores
from visadapt.methods.base import AdapterModule


def test_soft_threshold_closed_form():
    g = torch.tensor([-2.0, -0.25, -0.1, 0.0, 0.05, 0.3, 1.5])
    expected = torch.tensor([-1.8, -0.05, 0.0, 0.0, 0.0, 0.1, 1.3])
    torch.testing.assert_close(soft_threshold(g, 0.2), expected)
    # it is the proximal operator of xi*|g|_1: argmin_x 0.5 (x - g)^2 + xi |x|, checked on a dense grid
    grid = torch.linspace(-3, 3, 60001)
    objective = 0.5 * (grid[None] - g[:, None]) ** 2 + 0.2 * grid.abs()[None]
    torch.testing.assert_close(grid[objective.argmin(1)], expected, atol=2e-4, rtol=0)


def test_threshold_schedule():
    cfg = SoRAConfig(target="x", xi=1e-3, xi_max=4e-3, xi_stages=4)
    assert [cfg.threshold(s, 8, lr=0.5) for s in range(1, 9)] == pytest.approx([1e-3, 1e-3, 2e-3, 2e-3, 3e-3, 3e-3,
                                                                                  4e-3, 4e-3])
    assert SoRAConfig(target="x", xi=1e-3, xi_multiply_lr=True).threshold(5, 8, lr=0.5) == pytest.approx(5e-4)


class _Toy(AdapterModule):
    def __init__(self, config: SoRAConfig) -> None:
        super().__init__(optimizer=lambda p: torch.optim.SGD(p, lr=0.0), schedule="constant")
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        inject(self.net, config, verbose=False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        extra = self.adapter_regularisation()
        return loss if extra is None else loss + extra


def test_proximal_step_runs_after_each_optimiser_step_of_a_fit():
    """lr = 0: only the companion moves the gates, so after k steps g = soft(g0, k xi) exactly."""
    config = SoRAConfig(target="0|2", r=4, xi=0.15, l1_lambda=0.5)
    module = _Toy(config)
    assert "sora" in SCHEDULES and "sora" in REGULARISERS
    gates0 = [core.lora_gate.detach().clone() for _, _, core in sora_cores(module)]
    # the regulariser is l1_lambda * mean |g| over the gates
    expected = 0.5 * torch.cat([g.abs() for g in gates0]).mean()
    torch.testing.assert_close(module.adapter_regularisation(), expected)
    data = torch.utils.data.TensorDataset(torch.randn(12, 6), torch.randn(12, 3))
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=2)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    assert trainer.global_step == 3  # six batches, three optimiser steps: three proximal steps, not six
    gates = [core.lora_gate.detach() for _, _, core in sora_cores(module)]
    for g0, g in zip(gates0, gates):
        torch.testing.assert_close(g, soft_threshold(g0, 3 * 0.15), rtol=1e-6, atol=1e-7)
    assert sum(int((g == 0).sum()) for g in gates) > 0


@pytest.mark.parametrize("model_name", ["clip_attn", "vit"])
def test_pruning_gives_a_plain_lora_with_the_same_outputs(toy, tmp_path, model_name):
    peft = pytest.importorskip("peft")
    case = toy(model_name)
    base = copy.deepcopy(case.model)
    inject(case.model, SoRAConfig(target=case.target, r=4, alpha=8, xi=0.6, dropout=0.1), verbose=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, _, core in sora_cores(case.model):
            core.lora_B.copy_(torch.randn(core.lora_B.shape, generator=gen) * 0.1)
        proximal_step(case.model)  # |g| < 0.6 -> 0: about half of N(0, 1) gates
        before = case.run(case.model)
    cores = list(sora_cores(case.model))
    ranks = {id(c): c.effective_rank() for _, _, c in cores}
    assert 0 < sum(ranks.values()) < 4 * len(cores)
    trainable_before = count_parameters(case.model)[0]
    kept = prune_sora(case.model)
    for module_name, layer in adapter_layers(case.model):
        for core, _ in layer.parts("default"):
            assert type(core) is LoRA and core.r == kept[module_name] and not isinstance(core, SoRA)
            assert core.lora_A.requires_grad and core.training is False  # the toy model is in eval mode
    assert count_parameters(case.model)[0] < trainable_before
    with torch.no_grad():
        after = case.run(case.model)
        unadapted = case.run(base)
    assert (before - unadapted).abs().max() > 1e-2 * unadapted.abs().max()
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6 * before.abs().max().item())
    # the pruned adapter is an ordinary LoRA: visadapt files and PEFT files
    save_adapter(case.model, tmp_path / "own", base_identity="toy")
    reloaded = copy.deepcopy(base)
    load_adapter(reloaded, tmp_path / "own")
    export_peft(case.model, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(case.run(reloaded), after, rtol=0, atol=0)
        torch.testing.assert_close(case.run(loaded), before, rtol=1e-5, atol=1e-5 * before.abs().max().item())
