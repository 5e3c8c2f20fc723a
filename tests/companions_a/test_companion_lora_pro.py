"""LoRA-Pro: the closed form against direct least-squares computations, and the callback inside a Lightning fit."""

import pytest
import torch

from visadapt.adapters import LoRAConfig, RandLoRAConfig
from visadapt.errors import UserError
from visadapt.methods.companions.lora_pro import (
    LoraPro,
    equivalent_gradient,
    lora_pro_gradients,
    solve_sylvester,
)


def _problem(seed=0, m=7, n=5, r=2, s=1.5):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(r, n, generator=gen, dtype=torch.float64)
    b = torch.randn(m, r, generator=gen, dtype=torch.float64)
    g = torch.randn(m, n, generator=gen, dtype=torch.float64)  # the full fine-tuning gradient of W
    return a, b, g, s, b.t() @ g * s, g @ a.t() * s  # raw LoRA gradients s B^T g, s g A^T


def test_sylvester_solution_satisfies_the_equation():
    gen = torch.Generator().manual_seed(1)
    p, q = (torch.randn(3, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    p, q = p @ p.t(), q @ q.t()
    c = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    x = solve_sylvester(p, q, c)
    torch.testing.assert_close(p @ x + x @ q, c, rtol=1e-10, atol=1e-10)


def test_equivalent_gradient_is_the_least_squares_projection_of_the_full_gradient():
    a, b, g, s, ga, gb = _problem()
    new_a, new_b = lora_pro_gradients(a, b, ga, gb, s, damping=0.0)
    m, n = g.shape
    # the linear map (X_A, X_B) -> s B X_A + s X_B A, column-major vec: vec(B X_A) = (I_n kron B) vec(X_A)
    eye_m, eye_n = torch.eye(m, dtype=g.dtype), torch.eye(n, dtype=g.dtype)
    op = torch.cat([s * torch.kron(eye_n, b), s * torch.kron(a.t().contiguous(), eye_m)], dim=1)
    sol = torch.linalg.lstsq(op, g.t().reshape(-1)).solution
    projection = (op @ sol).reshape(n, m).t()
    torch.testing.assert_close(equivalent_gradient(a, b, new_a, new_b, s), projection, rtol=1e-9, atol=1e-9)
    # and it is a better approximation of g than LoRA's own equivalent gradient
    plain = (equivalent_gradient(a, b, ga, gb, s) - g).norm()
    assert (projection - g).norm() < plain


def test_among_the_optimal_pairs_the_closest_to_the_lora_gradients_is_chosen():
    a, b, _, s, ga, gb = _problem(seed=3)
    new_a, new_b = lora_pro_gradients(a, b, ga, gb, s, damping=0.0)
    r = a.shape[0]
    # every optimal pair is (gA* + Y A, gB* - B Y); minimise |gA(Y) - gA|^2 + |gB(Y) - gB|^2 over Y by least squares
    rows = []
    for i in range(r):
        for j in range(r):
            e = torch.zeros(r, r, dtype=a.dtype)
            e[i, j] = 1
            rows.append(torch.cat([(e @ a).reshape(-1), (-b @ e).reshape(-1)]))
    op = torch.stack(rows, dim=1)
    target = torch.cat([(ga - new_a).reshape(-1), (gb - new_b).reshape(-1)])
    y = torch.linalg.lstsq(op, target).solution
    assert y.abs().max() < 1e-8, f"a better Y exists: {y}"


def test_first_step_with_zero_b_moves_only_b():
    a, b, g, s, ga, gb = _problem(seed=4)
    b = torch.zeros_like(b)
    ga, gb = s * b.t() @ g, s * g @ a.t()
    new_a, new_b = lora_pro_gradients(a, b, ga, gb, s)
    assert torch.equal(new_a, torch.zeros_like(new_a))
    torch.testing.assert_close(new_b, gb @ torch.linalg.inv(a @ a.t()) / s**2, rtol=1e-6, atol=1e-9)


def test_callback_hands_the_adjusted_gradients_to_the_optimiser(toy, tmp_path):
    model = toy.adapted(LoRAConfig(target="lin0|lin1", r=2, alpha=4),
                        optimizer=lambda p: torch.optim.SGD(p, lr=1.0))
    for name, p in model.named_parameters():  # B != 0 so that every term of the closed form is exercised
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    seen = {}

    orig = LoraPro.on_before_optimizer_step

    def spy(self, trainer, module, optimizer):
        seen["raw"] = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
        orig(self, trainer, module, optimizer)

    LoraPro.on_before_optimizer_step = spy
    try:
        toy.trainer(tmp_path, [LoraPro()]).fit(model, toy.loader())
    finally:
        LoraPro.on_before_optimizer_step = orig
    core = model.body.lin1.adapters["default"]
    key_a, key_b = "body.lin1.adapters.default.lora_A", "body.lin1.adapters.default.lora_B"
    exp_a, exp_b = lora_pro_gradients(before[key_a], before[key_b], seen["raw"][key_a], seen["raw"][key_b], core.scale)
    torch.testing.assert_close(before[key_a] - core.lora_A.detach(), exp_a, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(before[key_b] - core.lora_B.detach(), exp_b, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(exp_a, seen["raw"][key_a])  # the adjustment changed something


def test_refuses_adapters_without_a_plain_pair(toy, tmp_path):
    model = toy.adapted(RandLoRAConfig(target="lin0|lin1", r=2))
    with pytest.raises(UserError, match="LoRA-Pro adjusts .* 'randlora' adapter on body.lin0"):
        toy.trainer(tmp_path, [LoraPro()]).fit(model, toy.loader())


def test_full_adam_variant_runs_adam_on_the_equivalent_gradient(toy, tmp_path):
    lr = 0.05
    model = toy.adapted(LoRAConfig(target="lin1", r=2, alpha=4), optimizer=lambda p: torch.optim.SGD(p, lr=lr))
    seen = []
    orig = LoraPro.on_before_optimizer_step

    def spy(self, trainer, module, optimizer):
        core = module.body.lin1.adapters["default"]
        seen.append((core.lora_A.detach().clone(), core.lora_B.detach().clone(), core.lora_A.grad.clone(),
                     core.lora_B.grad.clone()))
        orig(self, trainer, module, optimizer)

    LoraPro.on_before_optimizer_step = spy
    try:
        toy.trainer(tmp_path, [LoraPro(full_adam=True)], max_steps=2).fit(model, toy.loader())
    finally:
        LoraPro.on_before_optimizer_step = orig
    core = model.body.lin1.adapters["default"]
    s, m, v = core.scale, 0.0, 0.0
    for step, (a, b, ga, gb) in enumerate(seen, start=1):  # the official recipe, written out
        pa, pb = lora_pro_gradients(a, b, ga, gb, s)
        g = s * b @ pa + s * pb @ a
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        direction = (m / (1 - 0.9**step)) / ((v / (1 - 0.999**step)).sqrt() + 1e-8)
        da, db = lora_pro_gradients(a, b, s * b.t() @ direction, s * direction @ a.t(), s)
        expected_a, expected_b = a - lr * da, b - lr * db
    torch.testing.assert_close(core.lora_A.detach(), expected_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(core.lora_B.detach(), expected_b, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(seen[1][1], seen[0][1])  # B moved at step 1 (the first step moves only B)


def test_full_adam_variant_refuses_an_adaptive_optimiser(toy, tmp_path):
    model = toy.adapted(LoRAConfig(target="lin1", r=2), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    with pytest.raises(UserError, match="full_adam: true runs Adam itself.*plain SGD"):
        toy.trainer(tmp_path, [LoraPro(full_adam=True)]).fit(model, toy.loader())
