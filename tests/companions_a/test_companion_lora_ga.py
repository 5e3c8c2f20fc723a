"""LoRA-GA: parity with peft's lora_ga (same A, B and base offset), the official convention, refusals, resume."""

import copy

import pytest
import torch
from torch import nn

from visadapt.adapters import LoRAConfig, SoRAConfig
from visadapt.errors import UserError
from visadapt.methods.companions.lora_ga import LoraGA, lora_ga_factors


def _exact_svd_lowrank(a, q=6, niter=2, M=None):
    """Deterministic stand-in for torch.svd_lowrank (same outputs as an exact SVD), used by both implementations."""
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return u[:, :q], s[:q], vh[:q].t()


@pytest.mark.parametrize("direction,scale", [("ArB2r", "stable"), ("A2rBr", "gd_scale"), ("ArBr", "unit"),
                                             ("ArB2r", "weight_svd")])
def test_parity_with_peft_lora_ga(toy, tmp_path, monkeypatch, direction, scale):
    from peft import LoraConfig, LoraGAConfig, get_peft_model
    from peft.tuners.lora.loraga import preprocess_loraga

    monkeypatch.setattr(torch, "svd_lowrank", _exact_svd_lowrank)
    batches = toy.batches(3)
    # peft: gradients of the frozen body on the same batches, then lora_ga init with the base offset
    ref = toy.body_copy()
    cfg = LoraConfig(r=2, lora_alpha=3, target_modules=["lin0", "lin1"], init_lora_weights="lora_ga",
                     lora_ga_config=LoraGAConfig(direction=direction, scale=scale, stable_gamma=16))

    def train_step():
        for x, y in batches:
            nn.functional.cross_entropy(ref(x), y).backward()

    preprocess_loraga(ref, cfg, train_step)
    ref = get_peft_model(ref, cfg)
    # visadapt: the callback inside a fit whose one SGD step has lr 0, so what we read is the init itself
    model = toy.adapted(LoRAConfig(target="lin0|lin1", r=2, alpha=3),
                        optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    toy.trainer(tmp_path, [LoraGA(batches=3, direction=direction, scale=scale)]).fit(model, toy.loader())
    for name in ("lin0", "lin1"):
        ours, theirs = getattr(model.body, name), getattr(ref.base_model.model, name)
        core = ours.adapters["default"]
        torch.testing.assert_close(core.lora_A.detach(), theirs.lora_A["default"].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(core.lora_B.detach(), theirs.lora_B["default"].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.base_layer.weight, theirs.base_layer.weight, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(ours.base_layer.weight, getattr(toy.body, name).weight)  # the offset is real
        x = toy.data.tensors[0]
    with torch.no_grad():  # the offset keeps the function: adapted model == pretrained body == peft model
        torch.testing.assert_close(model.body(x), toy.body(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ref(x), toy.body(x), rtol=1e-5, atol=1e-6)


def test_official_convention_has_no_singular_values_and_scales_both_factors(monkeypatch):
    monkeypatch.setattr(torch, "svd_lowrank", _exact_svd_lowrank)
    g = torch.randn(16, 9, generator=torch.Generator().manual_seed(0))
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    a, b = lora_ga_factors(g, 2, 0.5, "ArB2r", "stable", 16.0, convention="official")
    f = 16**0.25 / 16**0.5
    torch.testing.assert_close(a, vh[:2] * f)
    torch.testing.assert_close(b, u[:, 2:4] * f)
    a_p, b_p = lora_ga_factors(g, 2, 0.5, "ArB2r", "stable", 16.0, convention="peft")
    torch.testing.assert_close(a_p, vh[:2])
    torch.testing.assert_close(b_p, u[:, 2:4] * s[2:4] * f)


def test_refuses_a_zero_initialised_head_with_the_fix(toy, tmp_path):
    model = toy.adapted(LoRAConfig(target="lin0|lin1", r=2), zero_head=True)
    with pytest.raises(UserError, match="exactly zero at all 2 adapted weights.*zero-initialised classification head"
                                        ".*class means"):
        toy.trainer(tmp_path, [LoraGA(batches=1)]).fit(model, toy.loader())


def test_refuses_a_variant_that_is_not_a_plain_pair(toy, tmp_path):
    model = toy.adapted(SoRAConfig(target="lin0|lin1", r=2))
    with pytest.raises(UserError, match="LoRA-GA initialises .* 'sora' adapter"):
        toy.trainer(tmp_path, [LoraGA(batches=1)]).fit(model, toy.loader())


def test_resumed_fit_reapplies_the_offset_from_the_callback_state(toy, tmp_path):
    model = toy.adapted(LoRAConfig(target="lin0|lin1", r=2, alpha=2))
    callback = LoraGA(batches=2)
    toy.trainer(tmp_path, [callback]).fit(model, toy.loader())
    state = copy.deepcopy(callback.state_dict())
    # a fresh run rebuilt from config: pristine base weights, trained A and B from the checkpoint
    fresh = toy.adapted(LoRAConfig(target="lin0|lin1", r=2, alpha=2))
    trained = {k: v for k, v in model.state_dict().items() if ".adapters." in k}
    fresh.load_state_dict(trained, strict=False)
    restored = LoraGA(batches=2)
    restored.load_state_dict(state)
    restored.on_train_start(type("T", (), {"global_step": 1, "is_global_zero": True})(), fresh)
    for name in ("lin0", "lin1"):
        assert torch.equal(getattr(fresh.body, name).base_layer.weight, getattr(model.body, name).base_layer.weight)
