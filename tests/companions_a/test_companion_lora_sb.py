"""LoRA-SB: the update-approximation init against a direct SVD, only R trains, refusals, the fixed bases' resume."""

import pytest
import torch

from visadapt.adapters import LoRAConfig, LoRASBConfig, adapter_layers, count_parameters, load_adapter, save_adapter
from visadapt.errors import UserError
from visadapt.methods.companions.lora_sb import LoraSB, lora_sb_factors


def test_init_is_the_rank_r_approximation_of_the_simulated_first_adam_step():
    g = torch.randn(9, 7, generator=torch.Generator().manual_seed(0))
    lr, s = 1e-3, 0.5
    a, r_core, b = lora_sb_factors(g, 3, lr, s, svd="exact")
    u, sv, vh = torch.linalg.svd(-lr * torch.sign(g), full_matrices=False)
    best = u[:, :3] @ torch.diag(sv[:3]) @ vh[:3]
    torch.testing.assert_close(s * b @ r_core @ a, best, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(b.t() @ b, torch.eye(3), rtol=0, atol=1e-5)  # orthonormal bases
    torch.testing.assert_close(a @ a.t(), torch.eye(3), rtol=0, atol=1e-5)
    # the official randomised SVD (10 iterations) gets close to the optimal truncation error
    a2, r2, b2 = lora_sb_factors(g, 3, lr, s)
    err_opt = (-lr * torch.sign(g) - best).norm()
    assert (-lr * torch.sign(g) - s * b2 @ r2 @ a2).norm() < 1.05 * err_opt


def test_only_r_trains_and_the_bases_stay_fixed(toy, tmp_path):
    model = toy.adapted(LoRASBConfig(target="lin0|lin1", r=2), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    assert count_parameters(model)[0] == 2 * 2 * 2  # two r x r cores
    cb = LoraSB(batches=2, lr=1e-2, svd="exact")
    captured = {}

    from lightning.pytorch import Callback

    class AfterInit(Callback):
        def on_train_start(self, trainer, module):
            captured.update({k: v.clone() for k, v in module.state_dict().items() if ".adapters." in k})

    toy.trainer(tmp_path, [cb, AfterInit()], max_steps=3).fit(model, toy.loader())
    after = {k: v for k, v in model.state_dict().items() if ".adapters." in k}
    for key, value in captured.items():
        if key.endswith("lora_R"):
            assert not torch.equal(after[key], value), key
        else:
            assert torch.equal(after[key], value), key
    # the init really replaced the LoRA-XS bases: s B R A approximates -lr sign(G) for the body's own gradient
    layer = dict(adapter_layers(model))["body.lin1"]
    core = layer.adapters["default"]
    assert torch.allclose(core.lora_B.t() @ core.lora_B, torch.eye(2), atol=1e-5)
    init_delta = core.scale * captured["body.lin1.adapters.default.lora_B"] @ captured[
        "body.lin1.adapters.default.lora_R"] @ captured["body.lin1.adapters.default.lora_A"]
    body = toy.body_copy()  # the reference gradient: plain autograd on the unadapted body (R = 0 at injection)
    for x, y in toy.batches(2):
        torch.nn.functional.cross_entropy(body(x), y).backward()
    u, sv, vh = torch.linalg.svd(-1e-2 * torch.sign(body.lin1.weight.grad), full_matrices=False)
    torch.testing.assert_close(init_delta, u[:, :2] @ torch.diag(sv[:2]) @ vh[:2], rtol=1e-4, atol=1e-7)
    # adapter files carry the fixed bases with R
    path = save_adapter(model.body, tmp_path / "sb", base_identity="toy")
    other = toy.adapted(LoRASBConfig(target="lin0|lin1", r=2))
    load_adapter(other.body, path)
    x = toy.data.tensors[0]
    with torch.no_grad():
        torch.testing.assert_close(other.body(x), model.body(x))
    # a resumed fit gets the bases back from the callback state
    fresh = toy.adapted(LoRASBConfig(target="lin0|lin1", r=2))
    fresh.load_state_dict({k: v for k, v in after.items() if k.endswith("lora_R")}, strict=False)
    restored = LoraSB(batches=2)
    restored.load_state_dict(cb.state_dict())
    restored.on_train_start(type("T", (), {"global_step": 3, "is_global_zero": True})(), fresh)
    with torch.no_grad():
        torch.testing.assert_close(fresh.body(x), model.body(x), rtol=0, atol=0)


def test_refuses_a_zero_initialised_head(toy, tmp_path):
    model = toy.adapted(LoRASBConfig(target="lin0|lin1", r=2), zero_head=True)
    with pytest.raises(UserError, match="LoRA-SB: the loss gradient is exactly zero.*Initialise the head"):
        toy.trainer(tmp_path, [LoraSB(batches=1)]).fit(model, toy.loader())


def test_refuses_an_adapter_that_is_not_lora_sb(toy, tmp_path):
    model = toy.adapted(LoRAConfig(target="lin0|lin1", r=2))
    with pytest.raises(UserError, match="LoRA-SB initialises the lora_sb adapter.*'lora' adapter on body.lin0"):
        toy.trainer(tmp_path, [LoraSB(batches=1)]).fit(model, toy.loader())
