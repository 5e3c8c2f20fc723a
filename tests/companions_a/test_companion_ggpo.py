"""LoRA-GGPO: the perturbation against its formula, the forward sees W + eps, the base is restored bit for bit."""

import pytest
import torch

from visadapt.adapters import LoRAConfig, SoRAConfig
from visadapt.errors import UserError
from visadapt.methods.companions.ggpo import GGPO, ggpo_perturbation


def test_perturbation_follows_the_row_variance_formula():
    gen = torch.Generator().manual_seed(0)
    merged = torch.randn(5, 40, generator=gen)
    grad_norm = torch.rand(5, generator=gen)
    sigma, alpha, beta = 0.1, 0.7, 2.0
    eps = ggpo_perturbation(merged, grad_norm, sigma, alpha, beta, torch.Generator().manual_seed(3))
    noise = torch.randn(5, 40, generator=torch.Generator().manual_seed(3))
    std = sigma * torch.sqrt((alpha * merged.pow(2).sum(1) + beta * grad_norm.pow(2)) / 40)
    torch.testing.assert_close(eps, noise * std[:, None])
    # over many draws |eps_i|^2 averages sigma^2 (alpha |W'_i|^2 + beta |G_i|^2)
    draws = torch.stack([ggpo_perturbation(merged, grad_norm, sigma, alpha, beta, gen) for _ in range(400)])
    measured = draws.pow(2).sum(-1).mean(0)
    torch.testing.assert_close(measured, sigma**2 * (alpha * merged.pow(2).sum(1) + beta * grad_norm**2), rtol=0.05,
                               atol=0)


def test_training_sees_the_perturbed_weight_and_the_base_is_restored_exactly(toy, tmp_path):
    model = toy.adapted(LoRAConfig(target="lin0|lin1", r=2, alpha=2), optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    base = {n: getattr(model.body, n).base_layer.weight.detach().clone() for n in ("lin0", "lin1")}
    cb = GGPO(sigma=0.2, alpha=1.0, beta=1.0, seed=5)
    seen, eps_by_step = [], []
    model.body.lin1.base_layer.register_forward_pre_hook(lambda m, a: seen.append(m.weight.detach().clone()))
    from lightning.pytorch import Callback

    factors, grads = [], []

    class Grab(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            eps_by_step.append({k: v.clone() for k, v in cb.last_perturbation.items()})
            factors.append({n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad})

        def on_before_optimizer_step(self, trainer, module, optimizer):
            grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad})

    toy.trainer(tmp_path, [cb, Grab()], max_steps=3).fit(model, toy.loader())
    assert len(seen) == 3 and len(eps_by_step) == 3
    for w, eps in zip(seen, eps_by_step):
        torch.testing.assert_close(w, base["lin1"] + eps["body.lin1"], rtol=0, atol=1e-6)
    # step 1: no gradient yet, only the weight norms (B = 0: W' = W0); reproduce the draw with the same generator
    gen = torch.Generator().manual_seed(5)
    first0 = ggpo_perturbation(base["lin0"], torch.zeros(10), 0.2, 1.0, 1.0, gen)
    first1 = ggpo_perturbation(base["lin1"], torch.zeros(10), 0.2, 1.0, 1.0, gen)
    torch.testing.assert_close(eps_by_step[0]["body.lin0"], first0)
    torch.testing.assert_close(eps_by_step[0]["body.lin1"], first1)
    # step 2 is gradient-guided: W' = W0 + s B1 A1 and G = s (B0 gA + gB A0) of step 1, the generator continued
    for name in ("lin0", "lin1"):
        key = f"body.{name}.adapters.default.lora_"
        a1, b1 = factors[1][key + "A"], factors[1][key + "B"]
        a0, b0 = factors[0][key + "A"], factors[0][key + "B"]
        g_eq = b0 @ grads[0][key + "A"] + grads[0][key + "B"] @ a0  # scale 1 (alpha = r)
        expected = ggpo_perturbation(base[name] + b1 @ a1, g_eq.norm(dim=1), 0.2, 1.0, 1.0, gen)
        torch.testing.assert_close(eps_by_step[1][f"body.{name}"], expected, rtol=1e-5, atol=1e-7)
        assert g_eq.norm() > 0
    for n, w in base.items():
        assert torch.equal(getattr(model.body, n).base_layer.weight, w)  # restored bit for bit


def test_refuses_a_variant_that_is_not_a_plain_pair(toy, tmp_path):
    with pytest.raises(UserError, match="LoRA-GGPO perturbs .* 'sora' adapter"):
        toy.trainer(tmp_path, [GGPO()]).fit(toy.adapted(SoRAConfig(target="lin0|lin1", r=2)), toy.loader())
