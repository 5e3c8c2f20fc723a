"""Hugging Face transformers backbones from local folders: a text encoder, a CLIP dual encoder and a ViT.

Every builder reads a folder written by ``save_pretrained`` (``config.json`` plus ``model.safetensors``) with
``local_files_only=True``. A Hub id (``org/name``) works only when it is already in the local Hugging Face cache;
nothing is downloaded. Set ``HF_HUB_OFFLINE=1`` in the shell, before anything imports ``huggingface_hub``.

Module names differ between architectures and between transformers versions (transformers 5 renamed ViT's
``attention.attention.query`` to ``attention.q_proj``), so the presets here accept every known spelling and a
backbone keeps only those that match its modules.

The CLIP BPE vocabulary ships with open_clip; :func:`clip_tokenizer` builds a transformers ``CLIPTokenizer`` from
it, so a CLIP folder without tokenizer files still tokenizes offline.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visadapt.backbones._registry import register_backbone
from visadapt.backbones.attention import matching_presets
from visadapt.backbones.base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    Backbone,
    DualEncoder,
    ImageEncoder,
    Preprocess,
)

log = logging.getLogger(__name__)

__all__ = [
    "HF_BLOCK_PATTERN",
    "HF_PRESETS",
    "TINY_BERT_CONFIG",
    "TINY_HF_CLIP_CONFIG",
    "TINY_HF_VIT_CONFIG",
    "HFCLIPDualEncoder",
    "HFTextEncoder",
    "HFViTEncoder",
    "clip_tokenizer",
    "hf_clip_backbone",
    "hf_text_backbone",
    "hf_vit_backbone",
    "tiny_bert_text_backbone",
    "tiny_hf_clip_backbone",
    "tiny_hf_vit_backbone",
    "tiny_wordpiece_vocab",
    "write_clip_tokenizer",
]

# Attention sub-module paths: CLIP/SigLIP/transformers-5 ViT (self_attn / attention), BERT (attention.self),
# transformers-4 ViT (attention.attention).
_ATTN = r"(self_attn|attention|attention\.self|attention\.attention)"
_BODIES = {
    "attn_qkv": rf"{_ATTN}\.(q_proj|k_proj|v_proj|query|key|value)",
    "attn_qv": rf"{_ATTN}\.(q_proj|v_proj|query|value)",
    "attn_proj": rf"({_ATTN}\.(out_proj|o_proj)|attention\.output\.dense)",
    # MLP: CLIP/ViT-5 fc1/fc2; BERT/ViT-4 intermediate.dense and the block's own output.dense.
    "mlp": r"(mlp\.fc[12]|intermediate\.dense|layers?\.\d+\.output\.dense)",
}
_BODIES["attn_qkv_proj"] = rf"({_BODIES['attn_qkv']}|{_BODIES['attn_proj']})"
_BODIES["all_linear"] = rf"({_BODIES['attn_qkv']}|{_BODIES['attn_proj']}|{_BODIES['mlp']})"

HF_PRESETS: dict[str, str] = {name: rf"(.*\.)?{body}" for name, body in _BODIES.items()}
"""Target presets for transformers models (separate q/k/v Linears, so ``attn_qv`` needs no slice suffix)."""

_HF_CLIP_PRESETS: dict[str, str] = {
    **HF_PRESETS,
    **{f"vision_{name}": rf"vision_model\.(.*\.)?{body}" for name, body in _BODIES.items()},
    **{f"text_{name}": rf"text_model\.(.*\.)?{body}" for name, body in _BODIES.items()},
}

HF_BLOCK_PATTERN = r"(?:encoder\.layer|layers)\.(\d+)\."
"""One group capturing the transformer block index of a parameter name (searched, not fully matched)."""

_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


# ------------------------------------------------------------------------------------------------- loading
def _load(auto_cls: Any, source: str, what: str, **kwargs: Any) -> Any:
    """``auto_cls.from_pretrained(source, local_files_only=True)`` with a clear error for missing folders."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and what != "tokenizer":
            raise FileNotFoundError(
                f"{what} folder {path} has no config.json. Expected the layout written by save_pretrained: "
                f"{path}/config.json and {path}/model.safetensors (plus tokenizer files for text models)."
            )
        return auto_cls.from_pretrained(str(path), local_files_only=True, **kwargs)
    if path.exists():
        raise FileNotFoundError(f"{what} source {path} is a file; expected a folder written by save_pretrained")
    try:  # a Hub id that is already in the local cache
        return auto_cls.from_pretrained(source, local_files_only=True, **kwargs)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"{what} not found: {source!r} is not a local folder and not in the Hugging Face cache (visadapt never "
            "downloads). Expected a folder written by save_pretrained with config.json and model.safetensors."
        ) from err


def _read_json(folder: str, name: str) -> dict[str, Any]:
    path = Path(folder).expanduser() / name
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return {}


def _image_preprocess(folder: str, image_size: int, mean: tuple, std: tuple) -> Preprocess:
    """Preprocessing from ``preprocessor_config.json`` when the folder has one, else the given defaults."""
    cfg = _read_json(folder, "preprocessor_config.json")
    size = cfg.get("crop_size") or cfg.get("size") or image_size
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge") or image_size
    return Preprocess(
        image_size=int(size),
        mean=tuple(float(v) for v in cfg.get("image_mean", mean)),
        std=tuple(float(v) for v in cfg.get("image_std", std)),
        interpolation=_PIL_RESAMPLE.get(cfg.get("resample"), "bicubic"),
    )


def _as_batch(tokens: Any) -> dict[str, torch.Tensor]:
    if isinstance(tokens, torch.Tensor):
        return {"input_ids": tokens}
    return dict(tokens)


# ------------------------------------------------------------------------------------------- tokenizers
def clip_tokenizer(context_length: int = 77) -> Any:
    """A transformers ``CLIPTokenizer`` built offline from the CLIP BPE vocabulary bundled with open_clip.

    Token ids equal open_clip's (``<|startoftext|>`` 49406, ``<|endoftext|>`` 49407); padding uses
    ``<|endoftext|>`` as Hugging Face CLIP checkpoints do, where open_clip pads with 0. Both pool at the first
    end-of-text token, so features are the same.

    Args:
        context_length: ``model_max_length`` of the tokenizer.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _clip_bpe_tables()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=context_length)


@functools.lru_cache(maxsize=1)
def _clip_bpe_tables() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    import gzip

    from open_clip.tokenizer import SimpleTokenizer, default_bpe

    vocab = dict(SimpleTokenizer().encoder)
    # open_clip spells the special tokens differently from the Hugging Face files; the ids are the same.
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # Same slice as CLIP's reference tokenizer: skip the header, keep 49152 - 256 - 2 merges.
    merges = tuple(tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1])
    return vocab, merges


def write_clip_tokenizer(folder: str | Path, context_length: int = 77) -> Path:
    """Write the bundled CLIP tokenizer into ``folder`` (e.g. a CLIP checkpoint folder that lacks one).

    Args:
        folder: Destination folder (created if needed).
        context_length: ``model_max_length`` of the tokenizer.

    Returns:
        The folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clip_tokenizer(context_length).save_pretrained(str(folder))
    return folder


# ------------------------------------------------------------------------------------------------- text
class HFTextEncoder(nn.Module):
    """A transformers text model with its tokenizer: ``tokenize(texts)`` then ``forward(tokens) -> (N, dim)``.

    Args:
        text_model: A transformers encoder (``AutoModel``) returning ``last_hidden_state``.
        tokenizer: Its tokenizer.
        pooling: ``mean`` (average over the attention mask) or ``cls`` (first token).
        max_length: Pad/truncate length; None pads to the longest text (capped by the model's limit).
    """

    def __init__(self, text_model: nn.Module, tokenizer: Any, pooling: str = "mean", max_length: int | None = None):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.text_model = text_model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = max_length
        self.feature_dim = int(text_model.config.hidden_size)

    def tokenize(self, texts: list[str] | str) -> dict[str, torch.Tensor]:
        """A dict of CPU tensors (``input_ids``, ``attention_mask`` ...)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        padding = "max_length" if self.max_length else "longest"
        out = self.tokenizer(texts, padding=padding, truncation=True, max_length=self.max_length, return_tensors="pt")
        return dict(out)

    def forward(self, tokens: dict[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        batch = _as_batch(tokens)
        hidden = self.text_model(**batch).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = batch.get("attention_mask")
        if mask is None:
            return hidden.mean(dim=1)
        mask = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


@register_backbone("hf_text")
def hf_text_backbone(model_dir: str, pooling: str = "mean", max_length: int | None = None) -> Backbone:
    """A transformers text encoder (BERT, RoBERTa, ...) with its tokenizer, from a local folder.

    Args:
        model_dir: Folder written by ``save_pretrained`` holding the model and its tokenizer files, or a Hub id
            already in the local cache.
        pooling: ``mean`` averages token features over the attention mask; ``cls`` takes the first token.
        max_length: Pad and truncate to this length; None pads each batch to its longest text.

    Raises:
        FileNotFoundError: When the folder (or its ``config.json``) is missing.
    """
    from transformers import AutoModel, AutoTokenizer

    model = _load(AutoModel, model_dir, "hf_text model")
    tokenizer = _load(AutoTokenizer, model_dir, "tokenizer")
    encoder = HFTextEncoder(model, tokenizer, pooling=pooling, max_length=max_length)
    return Backbone(
        model=encoder,
        family="hf",
        identity=f"hf:{model.config.model_type}:{Path(model_dir).name}",
        target_presets=matching_presets(encoder, HF_PRESETS),
        extra={"model_dir": model_dir, "pooling": pooling, "feature_dim": encoder.feature_dim,
               "block_pattern": HF_BLOCK_PATTERN},
    )


# ------------------------------------------------------------------------------------------------- CLIP
class HFCLIPDualEncoder(DualEncoder):
    """transformers ``CLIPModel`` towers behind the :class:`~visadapt.backbones.base.DualEncoder` interface.

    The towers and projections are held directly (``vision_model``, ``text_model``, ``visual_projection``,
    ``text_projection``), so module names equal those inside ``CLIPModel``.

    Args:
        clip: A transformers ``CLIPModel``.
        tokenizer: A CLIP tokenizer.
    """

    def __init__(self, clip: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.vision_model = clip.vision_model
        self.text_model = clip.text_model
        self.visual_projection = clip.visual_projection
        self.text_projection = clip.text_projection
        self.tokenizer = tokenizer
        self.logit_scale = float(clip.logit_scale.detach().exp())
        self.context_length = int(clip.config.text_config.max_position_embeddings)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embeddings ``(B, projection_dim)``."""
        return self.visual_projection(self.vision_model(pixel_values=images).pooler_output)

    def tokenize(self, texts: list[str] | str) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` padded to the context length."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.context_length, return_tensors="pt",
        )
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    def encode_text(self, tokens: dict[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Unnormalised text embeddings from a token dict or a tensor of ids."""
        batch = _as_batch(tokens)
        out = self.text_model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        return self.text_projection(out.pooler_output)


@register_backbone("hf_clip")
def hf_clip_backbone(model_dir: str, tokenizer: str | None = None) -> Backbone:
    """A transformers ``CLIPModel`` from a local folder, as a dual encoder.

    Args:
        model_dir: Folder written by ``save_pretrained`` (``config.json``, ``model.safetensors``, optionally the
            tokenizer and ``preprocessor_config.json``), or a Hub id already in the local cache.
        tokenizer: Tokenizer folder. None uses ``model_dir``'s tokenizer when it has one, otherwise the CLIP BPE
            vocabulary bundled with open_clip (for the standard 49408-token CLIP vocabulary).

    Raises:
        FileNotFoundError: When the folder (or its ``config.json``) is missing, or no tokenizer can be found.
    """
    from transformers import AutoTokenizer, CLIPModel

    clip = _load(CLIPModel, model_dir, "hf_clip model")
    context = int(clip.config.text_config.max_position_embeddings)
    if tokenizer is not None:
        tok = _load(AutoTokenizer, tokenizer, "tokenizer")
    elif _has_tokenizer_files(model_dir):
        tok = _load(AutoTokenizer, model_dir, "tokenizer")
    elif clip.config.text_config.vocab_size == 49408:
        log.warning("hf_clip: %s has no tokenizer files; using the CLIP BPE vocabulary bundled with open_clip",
                    model_dir)
        tok = clip_tokenizer(context)
    else:
        raise FileNotFoundError(
            f"hf_clip: no tokenizer files in {model_dir} and the vocabulary ({clip.config.text_config.vocab_size} "
            "tokens) is not CLIP's; pass tokenizer=<folder with tokenizer.json or vocab.json + merges.txt>"
        )
    encoder = HFCLIPDualEncoder(clip, tok)
    preprocess = _image_preprocess(
        model_dir, int(clip.config.vision_config.image_size), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD,
    )
    return Backbone(
        model=encoder,
        family="hf",
        identity=f"hf:clip:{Path(model_dir).name}",
        target_presets=matching_presets(encoder, _HF_CLIP_PRESETS),
        preprocess=preprocess,
        extra={"model_dir": model_dir, "context_length": context},
    )


def _has_tokenizer_files(folder: str) -> bool:
    path = Path(folder).expanduser()
    if not path.is_dir():
        return True  # a cached Hub id: let AutoTokenizer look
    names = ("tokenizer.json", "vocab.json", "tokenizer_config.json", "vocab.txt")
    return any((path / n).is_file() for n in names)


# ------------------------------------------------------------------------------------------------- ViT
class HFViTEncoder(ImageEncoder):
    """A transformers ViT (or DeiT, DINOv2 ...) returning the final CLS-token features ``(B, hidden_size)``.

    Args:
        vit: A transformers vision model whose output has ``last_hidden_state`` with the CLS token first.
        pooling: ``cls`` (the final CLS token) or ``pooler`` (``pooler_output``, tanh(dense(CLS)): the feature
            CoACT uses).
    """

    def __init__(self, vit: nn.Module, pooling: str = "cls") -> None:
        super().__init__()
        if pooling not in ("cls", "pooler"):
            raise ValueError(f"pooling must be 'cls' or 'pooler', got {pooling!r}")
        if pooling == "pooler" and getattr(vit, "pooler", None) is None:
            raise ValueError(f"pooling='pooler' but this {type(vit).__name__} has no pooler layer")
        self.vit = vit
        self.pooling = pooling
        self.feature_dim = int(vit.config.hidden_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.vit(pixel_values=images)
        return out.pooler_output if self.pooling == "pooler" else out.last_hidden_state[:, 0]


@register_backbone("hf_vit")
def hf_vit_backbone(model_dir: str, pooling: str = "cls") -> Backbone:
    """A transformers ViT image encoder (CLS-token or pooler features) from a local folder.

    Args:
        model_dir: Folder written by ``save_pretrained`` (``config.json``, ``model.safetensors``, optionally
            ``preprocessor_config.json``), or a Hub id already in the local cache. A classification checkpoint
            loads too; its head is dropped.
        pooling: ``cls`` (final CLS token) or ``pooler`` (``pooler_output`` = tanh(dense(CLS)), CoACT's feature).

    Raises:
        FileNotFoundError: When the folder (or its ``config.json``) is missing.
    """
    from transformers import AutoModel

    vit = _load(AutoModel, model_dir, "hf_vit model")
    encoder = HFViTEncoder(vit, pooling)
    # Hugging Face ViT checkpoints normalise with mean = std = 0.5 unless their processor says otherwise.
    preprocess = _image_preprocess(model_dir, int(getattr(vit.config, "image_size", 224)), (0.5,) * 3, (0.5,) * 3)
    return Backbone(
        model=encoder,
        family="hf",
        identity=f"hf:{vit.config.model_type}:{Path(model_dir).name}",
        target_presets=matching_presets(encoder, HF_PRESETS),
        preprocess=preprocess,
        extra={"model_dir": model_dir, "pooling": pooling, "feature_dim": encoder.feature_dim,
               "block_pattern": HF_BLOCK_PATTERN},
    )


# ------------------------------------------------------------------------------------------- tiny models
_TINY_LAYERS: dict[str, Any] = {"num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
TINY_BERT_CONFIG: dict[str, Any] = {"hidden_size": 32, "max_position_embeddings": 64, **_TINY_LAYERS}
"""Two-layer, width-32 BERT (the vocabulary size comes from :func:`tiny_wordpiece_vocab`)."""
TINY_HF_CLIP_CONFIG: dict[str, Any] = {
    "text_config": {"vocab_size": 49408, "hidden_size": 32, "max_position_embeddings": 77, **_TINY_LAYERS},
    "vision_config": {"hidden_size": 32, "image_size": 32, "patch_size": 8, **_TINY_LAYERS},
    "projection_dim": 32,
}
"""Two-layer transformers CLIP with the real CLIP vocabulary and context length, 32x32 images."""
TINY_HF_VIT_CONFIG: dict[str, Any] = {"hidden_size": 32, "image_size": 32, "patch_size": 8, **_TINY_LAYERS}
"""Two-layer, width-32 transformers ViT on 32x32 images (16 patches)."""


def tiny_wordpiece_vocab() -> dict[str, int]:
    """A character-level WordPiece vocabulary (BERT specials, a-z, 0-9, punctuation) that covers any ASCII text."""
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,;:!?'\"-()/&")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
    return {tok: i for i, tok in enumerate(tokens)}


def _seeded_init(seed: int | None, build: Any) -> Any:
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        return build()


@register_backbone("tiny_bert_text")
def tiny_bert_text_backbone(pooling: str = "mean", seed: int | None = None) -> Backbone:
    """A two-layer, width-32, randomly initialised BERT with a character-level tokenizer, for tests and demos.

    Args:
        pooling: ``mean`` or ``cls``, as in ``hf_text``.
        seed: Seed for the random weights; None draws them from the global random state.
    """
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = tiny_wordpiece_vocab()
    model = _seeded_init(seed, lambda: BertModel(BertConfig(vocab_size=len(vocab), **TINY_BERT_CONFIG)))
    encoder = HFTextEncoder(model, BertTokenizer(vocab=vocab), pooling=pooling)
    return Backbone(
        model=encoder, family="hf", identity="hf:bert:tiny", target_presets=matching_presets(encoder, HF_PRESETS),
        extra={"pooling": pooling, "feature_dim": encoder.feature_dim, "block_pattern": HF_BLOCK_PATTERN},
    )


@register_backbone("tiny_hf_clip")
def tiny_hf_clip_backbone(seed: int | None = None) -> Backbone:
    """A two-layer, randomly initialised transformers CLIP (32x32 images, bundled CLIP tokenizer) for tests.

    Args:
        seed: Seed for the random weights; None draws them from the global random state.
    """
    from transformers import CLIPConfig, CLIPModel

    clip = _seeded_init(seed, lambda: CLIPModel(CLIPConfig(**TINY_HF_CLIP_CONFIG)))
    encoder = HFCLIPDualEncoder(clip, clip_tokenizer(int(clip.config.text_config.max_position_embeddings)))
    return Backbone(
        model=encoder, family="hf", identity="hf:clip:tiny", target_presets=matching_presets(encoder, _HF_CLIP_PRESETS),
        preprocess=Preprocess(image_size=32),
    )


@register_backbone("tiny_hf_vit")
def tiny_hf_vit_backbone(seed: int | None = None) -> Backbone:
    """A two-layer, width-32, randomly initialised transformers ViT on 32x32 images, for tests.

    Args:
        seed: Seed for the random weights; None draws them from the global random state.
    """
    from transformers import ViTConfig, ViTModel

    vit = _seeded_init(seed, lambda: ViTModel(ViTConfig(**TINY_HF_VIT_CONFIG)))
    encoder = HFViTEncoder(vit)
    return Backbone(
        model=encoder, family="hf", identity="hf:vit:tiny", target_presets=matching_presets(encoder, HF_PRESETS),
        preprocess=Preprocess(image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3),
        extra={"feature_dim": encoder.feature_dim, "block_pattern": HF_BLOCK_PATTERN},
    )
