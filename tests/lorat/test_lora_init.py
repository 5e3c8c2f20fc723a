"""LoRAT's "bert" LoRA init: A and B both truncated normal (std 0.02, cut at +-2 absolute as timm's trunc_normal_)."""

import pytest
import torch
from torch import nn

from visadapt.adapters import LoRAConfig, inject


def test_trunc_normal_init_draws_both_factors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 384))
    inject(model, LoRAConfig(target="0", r=64, alpha=64, init="trunc_normal", init_std=0.02), verbose=False)
    ad = model[0].adapters["default"]
    a, b = ad.lora_A.detach(), ad.lora_B.detach()
    assert a.shape == (64, 256) and b.shape == (384, 64)
    for t in (a, b):  # 16k-25k draws: the std is within 3 % of 0.02 and the mean near 0
        assert abs(t.std().item() - 0.02) < 0.0006 and abs(t.mean().item()) < 0.0005
        assert t.abs().max().item() < 0.02 * 6  # no wild values (std 0.02: the +-2 cut is far away)
    # B != 0: unlike the standard init, the adapted layer differs from the base at injection, by exactly s*B@A
    x = torch.randn(5, 256)
    base = x @ model[0].base_layer.weight.T + model[0].base_layer.bias
    assert not torch.allclose(model(x), base, atol=1e-6)
    torch.testing.assert_close(model(x), base + x @ (ad.scale * b @ a).T, atol=1e-5, rtol=1e-5)
    assert ad.scale == 1.0  # alpha / r = 64 / 64


def test_standard_init_still_zero_b_and_bad_std_rejected():
    model = nn.Sequential(nn.Linear(8, 8))
    inject(model, LoRAConfig(target="0", r=2), verbose=False)
    assert torch.count_nonzero(model[0].adapters["default"].lora_B) == 0
    with pytest.raises(ValueError, match="init_std"):
        LoRAConfig(init="trunc_normal", init_std=0.0)
    with pytest.raises(ValueError, match="trunc_normal"):
        LoRAConfig(init="xavier")
