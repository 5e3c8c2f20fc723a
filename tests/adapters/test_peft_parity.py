"""Parity with the reference libraries: PEFT LoRA (same values, same outputs; files both ways) and diffusers.

PEFT puts one joint LoRA on a fused timm ``qkv`` Linear, so same-value parity uses whole-``qkv`` targeting. Slice
targeting (``qkv[q,v]``) has no PEFT equivalent; its export is the exact full-width LoRA with zero k rows, which
PEFT loads with identical outputs (tested below, as are the Block-LoRA and Comp-LoRA exports).
"""

from __future__ import annotations

import copy

import pytest
import torch

from visadapt.adapters import (
    BlockLoRAConfig,
    CompLoRAConfig,
    LoRAConfig,
    adapter_layers,
    export_diffusers,
    export_peft,
    import_peft,
    inject,
    is_adapter_param,
)

peft = pytest.importorskip("peft")
# raised inside PEFT by transformers 5, not by visadapt
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

VIT_TARGET = r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
BERT_TARGET = r".*attention\.self\.(query|key|value)|.*attention\.output\.dense"


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * expected.abs().max().item())


def _different(adapted: torch.Tensor, unadapted: torch.Tensor) -> None:
    """The adapter changes the output by far more than the parity tolerance, so parity is not base == base."""
    assert (adapted - unadapted).abs().max() > 1e-2 * unadapted.abs().max(), "the adapter does not change the output"


@torch.no_grad()
def _randomise(model: torch.nn.Module, needle: str, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if needle in name:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _toy_with_target(toy, name: str):
    case = toy(name)
    return case, (VIT_TARGET if name == "vit" else BERT_TARGET)


@pytest.mark.parametrize("model_name,rslora", [("vit", False), ("bert", True)])
def test_same_values_same_outputs(toy, model_name, rslora):
    case, target = _toy_with_target(toy, model_name)
    theirs = peft.inject_adapter_in_model(
        peft.LoraConfig(r=4, lora_alpha=6, target_modules=target, use_rslora=rslora), copy.deepcopy(case.model)
    )
    inject(case.model, LoRAConfig(target=target, r=4, alpha=6, rslora=rslora), verbose=False)
    _randomise(case.model, "lora_")
    with torch.no_grad():
        for module_name, layer in adapter_layers(case.model):
            core = layer.adapters["default"]
            peft_layer = theirs.get_submodule(module_name)
            peft_layer.lora_A["default"].weight.copy_(core.lora_A)
            peft_layer.lora_B["default"].weight.copy_(core.lora_B)
        ours, reference = case.run(case.model), case.run(theirs)
    assert not torch.allclose(ours, case.run(toy(model_name).model), atol=1e-4)
    _close(ours, reference)


EXPORTS = {
    "lora": LoRAConfig(r=4, alpha=6),
    "lora_qv_slices": LoRAConfig(r=4, alpha=6, rslora=True),
    "block_lora": BlockLoRAConfig(r=4, alpha=6, n_blocks=2),
    "comp_lora": CompLoRAConfig(r=4, alpha=6, protected=3),
}


@pytest.mark.parametrize("model_name", ["vit", "bert"])
@pytest.mark.parametrize("variant", list(EXPORTS))
def test_export_loads_in_peft_with_identical_outputs(toy, tmp_path, model_name, variant):
    case, target = _toy_with_target(toy, model_name)
    base = copy.deepcopy(case.model)
    if variant == "lora_qv_slices":
        target = r"blocks\.\d+\.attn\.qkv[q,v]|blocks\.\d+\.mlp\.fc1" if model_name == "vit" else BERT_TARGET
    config = copy.deepcopy(EXPORTS[variant])
    config.target = target
    inject(case.model, config, verbose=False)
    _randomise(case.model, ".adapters.")
    with torch.no_grad():
        unadapted = case.run(base)
    export_peft(case.model, tmp_path, base_model_name_or_path=f"toy:{model_name}")
    loaded = peft.PeftModel.from_pretrained(base, tmp_path)
    with torch.no_grad():
        adapted = case.run(case.model)
        _different(adapted, unadapted)
        _close(case.run(loaded), adapted)


@pytest.mark.parametrize("model_name", ["vit", "bert"])
def test_peft_adapter_imports_with_identical_outputs(toy, tmp_path, model_name):
    case, target = _toy_with_target(toy, model_name)
    ours = copy.deepcopy(case.model)
    some = "blocks.0.attn.proj" if model_name == "vit" else "encoder.layer.0.attention.self.value"
    config = peft.LoraConfig(
        r=4, lora_alpha=6, target_modules=target, use_rslora=True, rank_pattern={some: 2}, alpha_pattern={some: 3.0}
    )
    with torch.no_grad():
        unadapted = case.run(ours)
    theirs = peft.get_peft_model(case.model, config)
    _randomise(theirs, "lora_")
    theirs.save_pretrained(tmp_path)
    imported = import_peft(ours, tmp_path)
    assert imported.rslora and imported.r == 4
    assert ours.get_submodule(some).adapters["default"].r == 2
    assert not any(p.requires_grad for n, p in ours.named_parameters() if not is_adapter_param(n))
    with torch.no_grad():
        reference = case.run(theirs)
        _different(reference, unadapted)
        _close(case.run(ours), reference)


def test_diffusers_export_loads_with_load_lora_weights(toy, tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = toy("unet").model
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(32,),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=32,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
        )
    ).eval()
    # No tokenizer is needed to load LoRA weights, and none ships offline: the pipeline accepts None.
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=None,
        unet=unet,
        scheduler=DDIMScheduler(clip_sample=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    our_unet, our_text = copy.deepcopy(unet), copy.deepcopy(text_encoder)
    inject(our_unet, LoRAConfig(target=r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)", r=4, alpha=8), verbose=False)
    inject(our_text, CompLoRAConfig(target=r".*self_attn\.(q_proj|v_proj)", r=2, alpha=3, protected=2), verbose=False)
    _randomise(our_unet, ".adapters.")
    _randomise(our_text, ".adapters.")
    export_diffusers(tmp_path, unet=our_unet, text_encoder=our_text)
    sample, context, ids = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 32), torch.randint(0, 100, (1, 7))
    with torch.no_grad():
        before = pipe.unet(sample, 3, context).sample
        pipe.load_lora_weights(tmp_path, weight_name="pytorch_lora_weights.safetensors")
        after = pipe.unet(sample, 3, context).sample
        assert not torch.allclose(after, before, atol=1e-4)
        _close(after, our_unet(sample, 3, context).sample)
        _close(pipe.text_encoder(ids).last_hidden_state, our_text(ids).last_hidden_state)


def test_conv_adapters_export_to_peft_and_back(toy, tmp_path):
    """1x1 convs (plain, strided and padded, fused-qkv slices) as PEFT Conv2d LoRA, both directions."""
    case = toy("convnet")
    base, again = copy.deepcopy(case.model), copy.deepcopy(case.model)
    inject(case.model, LoRAConfig(target=case.target, r=2, alpha=3), verbose=False)
    _randomise(case.model, ".adapters.")
    with torch.no_grad():
        unadapted = case.run(base)
    export_peft(case.model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path)
    import_peft(again, tmp_path)
    with torch.no_grad():
        expected = case.run(case.model)
        _different(expected, unadapted)
        _close(case.run(loaded), expected)
        _close(case.run(again), expected)
