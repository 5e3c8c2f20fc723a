"""RandLoRA against PEFT's ``randlora`` tuner: same bases from the same seed, same outputs, same training; export."""

from __future__ import annotations

import copy

import pytest
import torch

from visadapt.adapters import adapter_layers, export_peft, inject
from visadapt.adapters.randlora import RandLoRA, RandLoRAConfig, randlora_basis_shape

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

TARGET = r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"


def _basis_dtype() -> str:
    from accelerate.utils.imports import is_bf16_available

    return "bfloat16" if is_bf16_available() else "float16"  # what PEFT draws its bases in


def _pair(toy, projection: str = "dense"):
    case = toy("vit")
    theirs = peft.inject_adapter_in_model(
        peft.RandLoraConfig(r=4, randlora_alpha=8, target_modules=TARGET, projection_prng_key=3,
                            sparse=projection == "sparse"),
        copy.deepcopy(case.model),
    )
    config = RandLoRAConfig(target=TARGET, r=4, alpha=8, seed=3, projection=projection, basis_dtype=_basis_dtype(),
                            basis_shape=randlora_basis_shape(case.model, TARGET))
    inject(case.model, config, verbose=False)
    return case, theirs


@pytest.mark.parametrize("projection", ["dense", "sparse"])
def test_same_bases_and_init_as_peft(toy, projection):
    case, theirs = _pair(toy, projection)
    layers = adapter_layers(case.model)
    assert len(layers) == 8
    for name, layer in layers:
        core, ref = layer.adapters["default"], theirs.get_submodule(name)
        assert isinstance(core, RandLoRA) and core.n == ref.num_bases
        assert torch.equal(core.basis_A, ref.randlora_A["default"]) and torch.equal(core.basis_B, ref.randlora_B["default"])
        assert torch.equal(core.lora_lambda, ref.randlora_lambda["default"])  # zeros: the model starts unchanged
        assert torch.equal(core.lora_gamma, ref.randlora_gamma["default"])
        assert core.num_parameters() == core.n * (4 + min(ref.in_features, ref.out_features))
    # the bases are one tensor for every layer, not a copy per layer
    assert len({layer.adapters["default"].basis_B.data_ptr() for _, layer in layers}) == 1


def test_same_outputs_and_same_training_as_peft(toy):
    case, theirs = _pair(toy)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, layer in adapter_layers(case.model):
            core, ref = layer.adapters["default"], theirs.get_submodule(name)
            core.lora_gamma.mul_(1 + torch.rand(core.lora_gamma.shape, generator=gen))
            ref.randlora_gamma["default"].copy_(core.lora_gamma)
    for model in (case.model, theirs):  # PEFT's inject_adapter_in_model leaves everything but the adapters frozen
        for n, p in model.named_parameters():
            assert p.requires_grad == ("lora_lambda" in n or "lora_gamma" in n or "randlora_" in n)
    opts = [torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (case.model, theirs)]
    goal = torch.randn(2, 5, generator=gen)
    base_out = case.run(toy("vit").model)
    for _ in range(5):
        outs = []
        for model, opt in zip((case.model, theirs), opts):
            opt.zero_grad()
            out = case.run(model)
            torch.nn.functional.mse_loss(out, goal).backward()
            opt.step()
            outs.append(out.detach())
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        ours, ref = case.run(case.model), case.run(theirs)
        for name, layer in adapter_layers(case.model):
            delta, ref_delta = layer.delta_weight("default"), theirs.get_submodule(name).get_delta_weight("default")
            assert ref_delta.abs().max() > 0
            torch.testing.assert_close(delta, ref_delta, rtol=0, atol=1e-4 * ref_delta.abs().max().item())
    assert (ours - base_out).abs().max() > 1e-2 * base_out.abs().max()  # training moved the outputs
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_exports_as_a_peft_lora_of_rank_n_r(toy, tmp_path):
    case = toy("clip_attn")  # fused-qkv q/v slices and a whole proj
    base = copy.deepcopy(case.model)
    inject(case.model, RandLoRAConfig(target=case.target, r=4, alpha=8), verbose=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in adapter_layers(case.model):
            for core, _ in layer.parts("default"):
                core.lora_lambda.copy_(torch.randn(core.lora_lambda.shape, generator=gen))
        adapted, unadapted = case.run(case.model), case.run(base)
    export_peft(case.model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path)
    with torch.no_grad():
        out = case.run(loaded)
    assert (adapted - unadapted).abs().max() > 1e-2 * unadapted.abs().max()
    torch.testing.assert_close(out, adapted, rtol=1e-5, atol=1e-5 * adapted.abs().max().item())
    proj = loaded.get_submodule("resblocks.0.attn.proj")
    assert proj.r["default"] == 4 * 4  # 16x16 proj: N = 16 / 4 bases of rank 4


def test_basis_shape_must_cover_the_layer():
    layer = torch.nn.Sequential(torch.nn.Linear(8, 12))
    with pytest.raises(ValueError, match="smaller than this 12x8 weight needs"):
        inject(layer, RandLoRAConfig(target="0", r=2, basis_shape=[10, 8]), verbose=False)
