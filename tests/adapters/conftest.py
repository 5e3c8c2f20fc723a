"""Toy models for the adapter tests: tiny, randomly initialised, built from configs (no download), in eval mode.

``toy(name)`` returns a fresh :class:`Toy` (a deep copy of a cached base model) with its inputs, a target
expression for it, and ``run(model) -> Tensor``.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn


@dataclass
class Toy:
    model: nn.Module
    target: str
    run: Callable[..., Tensor]
    """``run(model, dtype=torch.float32)``: the model's output tensor on fixed inputs (float inputs cast)."""


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 20)
        self.lin2 = nn.Linear(20, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


class FusedAttention(nn.Module):
    """open_clip-style attention after the backbone layer's normalisation: fused ``qkv`` Linear + ``proj``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = FusedAttention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(dim, 2 * dim))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyClipTower(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2, depth: int = 2) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])

    def forward(self, x: Tensor) -> Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class ConvNet(nn.Module):
    """3x3 stem, 1x1 convs (one strided and padded), a fused 1x1 qkv conv, and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 12, 1)
        self.conv2 = nn.Conv2d(12, 12, 1, stride=2, padding=1)
        self.qkv = nn.Conv2d(12, 36, 1, bias=False)
        self.head = nn.Linear(36, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(torch.relu(self.stem(x))))))
        return self.head(self.qkv(x).mean((-2, -1)))


def _mlp():
    x = torch.randn(4, 10)
    return MLP(), r"lin0|lin1", lambda m, dt=torch.float32: m(x.to(dt))


def _vit():
    import timm

    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=5,
    )
    x = torch.randn(2, 3, 32, 32)
    return model, r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc[12])", lambda m, dt=torch.float32: m(x.to(dt))


def _clip_attn():
    x = torch.randn(2, 5, 16)
    return TinyClipTower(), r".*attn\.qkv[q,v]|.*attn\.proj", lambda m, dt=torch.float32: m(x.to(dt))


def _bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=40,
        max_position_embeddings=32,
    )
    model = BertModel(cfg, add_pooling_layer=False)
    ids = torch.randint(0, 64, (2, 7))
    return (
        model,
        r".*attention\.self\.(query|value)|.*output\.dense",
        lambda m, dt=None: m(input_ids=ids).last_hidden_state,
    )


def tiny_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def _unet():
    sample, text = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 32)
    target = r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)"
    return tiny_unet(), target, lambda m, dt=torch.float32: m(sample.to(dt), 3, text.to(dt)).sample


def _convnet():
    x = torch.randn(2, 3, 9, 9)
    return ConvNet(), r"conv[12]|qkv[q,v]", lambda m, dt=torch.float32: m(x.to(dt))


def _open_clip():
    """The backbone layer's tiny open_clip (attention normalised to ``qkv``/``proj`` Linears); both towers."""
    from visadapt.backbones import build_backbone

    backbone = build_backbone("tiny_open_clip", seed=0)
    model = backbone.model
    images = torch.randn(2, 3, backbone.preprocess.image_size, backbone.preprocess.image_size)
    tokens = model.tokenize(["a photo of a cat", "a diagram"])
    # q, k and v as three independent slice adapters of each fused qkv, and the whole proj
    target = backbone.resolve_target("attn_qkv_proj")
    assert "qkv[q,k,v]" in target

    def run(m, dt=torch.float32):
        return torch.cat([m.encode_image(images.to(dt)), m.encode_text(tokens)])

    return model, target, run


BUILDERS: dict[str, Callable] = {
    "mlp": _mlp,
    "vit": _vit,
    "clip_attn": _clip_attn,
    "bert": _bert,
    "unet": _unet,
    "convnet": _convnet,
}
if importlib.util.find_spec("visadapt.backbones.open_clip") is not None:
    BUILDERS["open_clip"] = _open_clip

_CACHE: dict[str, tuple] = {}


def make_toy(name: str) -> Toy:
    if name not in _CACHE:
        torch.manual_seed(0)
        model, target, run = BUILDERS[name]()
        _CACHE[name] = (model.eval(), target, run)
    model, target, run = _CACHE[name]
    return Toy(copy.deepcopy(model), target, run)


@pytest.fixture(autouse=True)
def _one_thread():
    """The toy models are far too small to gain from intra-op threads, and on shared, busy cores OpenMP threads
    spin-wait: one thread makes these tests about ten times cheaper in CPU time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def toy() -> Callable[[str], Toy]:
    return make_toy


@pytest.fixture
def toy_names() -> list[str]:
    return list(BUILDERS)
