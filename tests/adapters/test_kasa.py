"""KaSA against PEFT 0.21's KaSA (same values, same outputs, same outputs after AdamW steps on the task loss plus the
regulariser), the truncation against a direct SVD, and the PEFT export of the exact rank-2r form."""

from __future__ import annotations

import copy

import pytest
import torch

from visadapt.adapters import REGULARISERS, KaSAConfig, adapter_layers, export_peft, inject
from visadapt.adapters.kasa import minor_components

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

VIT_TARGET = r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"


def _pair(toy, beta=1e-2, gamma=1e-2):
    """(ours, PEFT's) on the toy ViT with the same A, B and δ; PEFT's model is a ``PeftModel``."""
    case = toy("vit")
    theirs = peft.get_peft_model(
        copy.deepcopy(case.model),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=VIT_TARGET,
                        kasa_config=peft.KasaConfig(beta=beta, gamma=gamma)),
    )
    inject(case.model, KaSAConfig(target=VIT_TARGET, r=4, alpha=8, beta=beta, gamma=gamma), verbose=False)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module_name, layer in adapter_layers(case.model):
            core = layer.adapters["default"]
            core.lora_B.copy_(torch.randn(core.lora_B.shape, generator=gen) * 0.1)  # B = 0 would hide errors
            ref = theirs.base_model.model.get_submodule(module_name)
            ref.lora_A["default"].weight.copy_(core.lora_A)
            ref.lora_B["default"].weight.copy_(core.lora_B)
            ref.lora_diag["default"].copy_(core.lora_diag)
    return case, theirs


def test_truncation_drops_the_r_smallest_singular_components():
    torch.manual_seed(0)
    w = torch.randn(12, 20, dtype=torch.float64)
    us, vh = minor_components(w, 3)
    s = torch.linalg.svdvals(w)
    dropped = us @ vh
    assert torch.allclose(torch.linalg.svdvals(dropped)[:3], s[-3:])
    assert torch.allclose(torch.linalg.svdvals(w - dropped)[:9], s[:9]) and torch.linalg.svdvals(w - dropped)[9] < 1e-10
    # the official rule keeps in - r = 17 >= 12 components of this wide weight: nothing is dropped
    us, vh = minor_components(w, 3, truncation="in_features")
    assert us.shape[1] == 0 and vh.shape[0] == 0


def test_same_values_same_outputs_and_same_training_as_peft(toy):
    case, theirs = _pair(toy)
    model, run = case.model, case.run
    with torch.no_grad():
        # same truncated base weights (merged weight = W - W_min + ΔW in both)
        for module_name, layer in adapter_layers(model):
            ref = theirs.base_model.model.get_submodule(module_name)
            core = layer.adapters["default"]
            torch.testing.assert_close(layer.base_weight - core.truncation_weight(), ref.base_layer.weight,
                                       rtol=0, atol=1e-5)
        ours0, ref0 = run(model), run(theirs)
    torch.testing.assert_close(ours0, ref0, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours0, run(toy("vit").model), atol=1e-3)
    reg = REGULARISERS.get("kasa")
    torch.testing.assert_close(reg(model), theirs.base_model._get_kasa_loss(), rtol=1e-5, atol=1e-7)

    params = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    assert sum(p.numel() for p in params(model)) == sum(p.numel() for p in params(theirs))
    opt_ours = torch.optim.AdamW(params(model), lr=1e-2, weight_decay=0.01)
    opt_theirs = torch.optim.AdamW(params(theirs), lr=1e-2, weight_decay=0.01)
    goal = torch.randn_like(ours0, generator=torch.Generator().manual_seed(1))
    model.train(), theirs.train()
    for _ in range(5):
        for m, opt, extra in ((model, opt_ours, reg), (theirs, opt_theirs, lambda m: m.base_model._get_kasa_loss())):
            opt.zero_grad()
            (torch.nn.functional.mse_loss(run(m), goal) + extra(m)).backward()
            opt.step()
    model.eval(), theirs.eval()
    with torch.no_grad():
        ours, ref = run(model), run(theirs)
        for module_name, layer in adapter_layers(model):
            peft_diag = theirs.base_model.model.get_submodule(module_name).lora_diag["default"]
            torch.testing.assert_close(layer.adapters["default"].lora_diag, peft_diag, rtol=1e-4, atol=1e-5)
    assert (ours - ours0).abs().max() > 1e-2, "training did not move the outputs"
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_peft_export_is_the_exact_rank_2r_form_on_the_untouched_base(toy, tmp_path):
    case, theirs = _pair(toy)
    base = copy.deepcopy(toy("vit").model)
    export_peft(case.model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path)
    assert loaded.peft_config["default"].r == 8 and loaded.peft_config["default"].kasa_config is None
    with torch.no_grad():
        torch.testing.assert_close(case.run(loaded), case.run(theirs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ortho,reduction", [("rank", "mean"), ("full", "sum")])
def test_regulariser_forms_against_a_direct_computation(ortho, reduction):
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(6, 9), "b": torch.nn.Linear(9, 5)})
    inject(model, KaSAConfig(target="a|b", r=2, beta=0.3, gamma=0.7, ortho=ortho, reg_reduction=reduction),
           verbose=False)
    expected = []
    for name in ("a", "b"):
        core = model.get_submodule(name).adapters["default"]
        core.lora_B.data.normal_()
        a, b, d = core.lora_A, core.lora_B, core.lora_diag
        ga, gb = (a @ a.T, b.T @ b) if ortho == "rank" else (a.T @ a, b @ b.T)
        ortho_term = (ga - torch.eye(len(ga))).norm() + (gb - torch.eye(len(gb))).norm()
        expected.append(0.3 * (d**2).sum() + 0.7 * ortho_term)
    total = sum(expected) / (2 if reduction == "mean" else 1)
    torch.testing.assert_close(REGULARISERS.get("kasa")(model), total)
