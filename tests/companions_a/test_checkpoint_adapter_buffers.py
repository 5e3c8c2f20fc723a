"""Persistent adapter buffers (LoRA-SB's data-initialised A and B) travel in visadapt checkpoints."""

from __future__ import annotations

import torch
from torch import nn

from visadapt.adapters import LoRASBConfig, inject
from visadapt.methods.base import AdapterModule


class _Tiny(AdapterModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
        for p in self.net.parameters():
            p.requires_grad_(False)
        inject(self.net, LoRASBConfig(target=r"0|2", r=2), verbose=False)


def test_lora_sb_factors_are_saved_and_restored_but_not_required():
    src = _Tiny()
    buffers = src.adapter_buffer_keys()
    assert buffers and all(k.endswith(("lora_A", "lora_B")) for k in buffers)
    with torch.no_grad():  # what the lora_sb initialiser does: new fixed factors from data
        for k in buffers:
            src.get_buffer(k).copy_(torch.randn_like(src.get_buffer(k)))
    ckpt = {"state_dict": src.state_dict()}
    src.on_save_checkpoint(ckpt)
    assert buffers <= set(ckpt["state_dict"])  # saved with the trained core R
    assert not any(".base_layer." in k for k in ckpt["state_dict"])  # the frozen base is still left out

    dst = _Tiny()
    dst.on_load_checkpoint(ckpt)
    dst.load_state_dict(ckpt["state_dict"], strict=False)
    for k in buffers:
        assert torch.equal(dst.get_buffer(k), src.get_buffer(k))
    x = torch.randn(4, 6)
    assert torch.equal(dst.net(x), src.net(x))

    old = {"state_dict": {k: v for k, v in ckpt["state_dict"].items() if k not in buffers}}
    _Tiny().on_load_checkpoint(old)  # a checkpoint written before the buffers were saved still loads
