"""diffusers LoRA files both ways: visadapt's export loads with ``pipe.load_lora_weights`` and gives identical UNet
outputs; a LoRA saved by diffusers' own DreamBooth-LoRA path (PEFT on the UNet, ``save_lora_weights``) imports into
visadapt with identical outputs."""

from __future__ import annotations

import copy

import pytest
import torch

from visadapt.adapters import LoRAConfig, export_diffusers, import_diffusers, inject, read_diffusers_lora
from visadapt.backbones.diffusers import DIFFUSERS_UNET_PRESETS, TINY_UNET_CONFIG

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


def _unet(seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(**TINY_UNET_CONFIG).eval()


def _randomise(module: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "lora" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _pipeline(unet):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(32,), in_channels=3, out_channels=3,
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                                  latent_channels=4, norm_num_groups=32)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=16)).eval()
    return diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet,
                                             scheduler=diffusers.DDIMScheduler(clip_sample=False, steps_offset=1),
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)


def _inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 700]), torch.randn(2, 6, 32, generator=g)


def test_export_loads_with_load_lora_weights_and_imports_back(tmp_path):
    base = _unet()
    ours = copy.deepcopy(base)
    inject(ours, LoRAConfig(target=DIFFUSERS_UNET_PRESETS["attn"], r=4, alpha=8.0, init="gaussian"), verbose=False)
    _randomise(ours)
    file = export_diffusers(tmp_path, unet=ours)
    assert file.name == "pytorch_lora_weights.safetensors"
    x, t, c = _inputs()
    with torch.no_grad():
        expected = ours(x, t, c).sample
        plain = base(x, t, c).sample
        assert (expected - plain).abs().max() > 1e-3  # the LoRA changes the output
        pipe = _pipeline(copy.deepcopy(base))
        pipe.load_lora_weights(tmp_path, weight_name="pytorch_lora_weights.safetensors")
        torch.testing.assert_close(pipe.unet(x, t, c).sample, expected, rtol=1e-5, atol=1e-5)
        again = copy.deepcopy(base)
        configs = import_diffusers(file, unet=again)
        assert configs["unet"].r == 4 and configs["unet"].alpha == 4.0  # the scale is folded into B: alpha = r
        torch.testing.assert_close(again(x, t, c).sample, expected, rtol=1e-5, atol=1e-5)


def test_lora_saved_by_diffusers_imports_with_identical_outputs(tmp_path):
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    base = _unet()
    theirs = copy.deepcopy(base)
    # what diffusers' train_dreambooth_lora.py does, with rank 2 and Gaussian init
    theirs.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian",
                                  target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    _randomise(theirs, 3)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(theirs))
    diffusers.StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=layers)
    keys = list(read_diffusers_lora(tmp_path)["unet"])
    import re

    expected_layers = [n for n, _ in base.named_modules() if re.fullmatch(DIFFUSERS_UNET_PRESETS["attn"], n)]
    assert sorted(keys) == sorted(expected_layers) and len(keys) == 32  # q,k,v,out x attn1,attn2 x 4 blocks
    ours = copy.deepcopy(base)
    import_diffusers(tmp_path, unet=ours)
    x, t, c = _inputs()
    with torch.no_grad():
        expected = theirs(x, t, c).sample
        assert (expected - base(x, t, c).sample).abs().max() > 1e-3
        torch.testing.assert_close(ours(x, t, c).sample, expected, rtol=1e-5, atol=1e-5)


def test_import_errors_name_the_problem(tmp_path):
    from safetensors.torch import save_file

    save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(2, 4)}, str(tmp_path / "k.safetensors"))
    with pytest.raises(NotImplementedError, match="Kohya"):
        read_diffusers_lora(tmp_path / "k.safetensors")
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 32),
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(16, 2)},
              str(tmp_path / "s.safetensors"))
    unet = _unet()
    with pytest.raises(ValueError, match="do not fit"):
        import_diffusers(tmp_path / "s.safetensors", unet=unet)
    assert not any("lora" in n for n, _ in unet.named_parameters())  # nothing was changed
    with pytest.raises(ValueError, match="text_encoder"):
        save_file({"text_encoder.a.lora_A.weight": torch.zeros(1, 2), "text_encoder.a.lora_B.weight": torch.zeros(2, 1)},
                  str(tmp_path / "t.safetensors"))
        import_diffusers(tmp_path / "t.safetensors", unet=unet)
