"""ALLoRA: the rate formula, the update it produces in a fit (SGD: the gradient form), and its refusals."""

import pytest
import torch

from visadapt.adapters import LoRAConfig, RandLoRAConfig
from visadapt.errors import UserError
from visadapt.methods.companions.allora import ALLoRA, allora_coefficient


def test_coefficient_is_inverse_to_the_norm():
    theta = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    eta = 0.5
    rows = allora_coefficient(theta, eta, "vector", axis=1)
    torch.testing.assert_close(rows, torch.tensor([[1 / (1 + 0.25 * 25) ** 0.5], [1.0]]))
    cols = allora_coefficient(theta, eta, "vector", axis=0)
    torch.testing.assert_close(cols, torch.tensor([[1 / (1 + 0.25 * 9) ** 0.5, 1 / (1 + 0.25 * 16) ** 0.5]]))
    torch.testing.assert_close(allora_coefficient(theta, eta, "matrix"), torch.tensor(1 / (1 + 0.25 * 25) ** 0.5))
    # lr * c = 1 / sqrt(|theta|^2 + 1/eta^2): the reference notes' form with the optimiser's lr as eta
    big = torch.full((1, 4), 10.0)
    torch.testing.assert_close(eta * allora_coefficient(big, eta), torch.tensor([[1 / (400 + 4) ** 0.5]]))


def test_sgd_step_uses_per_vector_rates(toy, tmp_path):
    lr = 0.5
    model = toy.adapted(LoRAConfig(target="lin0|lin1", r=2, alpha=2), optimizer=lambda p: torch.optim.SGD(p, lr=lr))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    grads = {}
    from lightning.pytorch import Callback

    class Grab(Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):
            grads.update({n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad})

    toy.trainer(tmp_path, [ALLoRA(), Grab()]).fit(model, toy.loader())
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        theta, g = before[name], grads[name]
        axis = 1 if name.endswith("lora_A") else 0
        norm2 = theta.pow(2).sum(dim=axis, keepdim=True)
        expected = theta - g / torch.sqrt(norm2 + 1 / lr**2)  # g / sqrt(|theta|^2 + 1/eta^2), eta = lr
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7)
        assert not torch.allclose(p.detach(), theta - lr * g)  # not the plain SGD step


def test_refuses_dropout_and_scaling_with_the_fix(toy, tmp_path):
    for config in (LoRAConfig(target="lin0|lin1", r=2, alpha=4), LoRAConfig(target="lin0|lin1", r=2, alpha=2, dropout=0.1)):
        model = toy.adapted(config)
        with pytest.raises(UserError, match="ALLoRA trains an unscaled LoRA without dropout.*`alpha` equal to `r`"):
            toy.trainer(tmp_path, [ALLoRA()]).fit(model, toy.loader())
    toy.trainer(tmp_path, [ALLoRA(allow_scaled=True)]).fit(toy.adapted(LoRAConfig(target="lin0", r=2, alpha=4)),
                                                           toy.loader())


def test_refuses_a_variant_that_is_not_a_plain_pair(toy, tmp_path):
    with pytest.raises(UserError, match="ALLoRA sets the rates .* 'randlora' adapter"):
        toy.trainer(tmp_path, [ALLoRA()]).fit(toy.adapted(RandLoRAConfig(target="lin0|lin1", r=2)), toy.loader())
