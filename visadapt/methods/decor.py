"""DECOR (Jang et al., arXiv 2412.09169): DreamBooth-LoRA customization plus a projection of the text embeddings.

Two parts, usable separately:

* **The projection** (pure functions, no model): ``X' = X - alpha X P`` on the per-token text-encoder output ``X``
  (``L x D``, every row including PAD), with ``P = V V^T`` the orthogonal projector onto the row space of the
  *undesired* token vectors. ``V`` comes from an SVD in float32 that drops singular values below ``tol`` times the
  largest. The undesired vectors are, by default, the word rows of an encoded undesired prompt (BOS, EOS and PAD
  removed); the option ``mode="axes"`` keeps the top-``rank`` right singular vectors of the whole encoded
  undesired prompt, PAD rows included (the "dominant axes" reading). Which reading the paper uses is not confirmed
  from its full text; the word rows are the documented default. ``alpha`` in [0, 1] is the projection degree:
  ``alpha = 1`` removes every component along the undesired directions, ``alpha = 0`` is the identity.
* **The customization** (:class:`DreamBoothLoRA`, a LightningModule trained by ``python -m visadapt fit``): the
  diffusers DreamBooth-LoRA recipe: LoRA (rank 4, alpha = rank, Gaussian ``A``) on the UNet attention projections
  ``to_q``, ``to_k``, ``to_v``, ``to_out.0``; optional text-encoder LoRA; any registered adapter variant chosen in
  the config; an instance prompt with an identifier token; optional prior preservation with class images (loss =
  MSE(instance) + ``prior_loss_weight`` x MSE(class)); the noise-prediction loss (``epsilon`` or ``v`` target,
  following the scheduler). At the end of ``fit`` the LoRA is written in diffusers' format
  (``pytorch_lora_weights.safetensors`` in the run folder), which ``pipe.load_lora_weights`` accepts.

DECOR itself is applied at inference through the prompt embeddings (``python -m visadapt generate`` and the
``t2i_sweep`` protocol); the negative (unconditional) embeddings stay untouched unless ``project_negative`` is set,
and SDXL's pooled embeddings only with ``project_pooled``. ``DreamBoothLoRA(train_decor=...)`` projects the training
prompt's embeddings during fitting as well: an **extension**, not confirmed as part of the paper.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from visadapt.adapters import AdapterConfig, LoRAConfig, count_parameters, export_diffusers, inject
from visadapt.backbones import build_backbone
from visadapt.backbones.base import Preprocess
from visadapt.backbones.diffusers import DIFFUSERS_UNET_PRESETS
from visadapt.methods.base import AdapterModule, PlainKwargs

# -- the projection -----------------------------------------------------------------------------------------------


def check_alpha(alpha: float) -> float:
    """``alpha`` as a float, or ``ValueError`` when it lies outside [0, 1]."""
    a = float(alpha)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"DECOR alpha must lie in [0, 1], got {alpha!r}")
    return a


def word_rows(embeds: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """The word-token rows of one encoded prompt: the attended positions without the first and the last.

    The first attended position is the start token (CLIP's ``<|startoftext|>``, BERT's ``[CLS]``) and the last the
    end token (``<|endoftext|>``, ``[SEP]``); positions past them are padding. Without a mask every row but the
    first and last is taken.

    Args:
        embeds: ``(L, D)`` per-token text-encoder output of one prompt.
        attention_mask: ``(L,)`` 1 for real tokens, 0 for padding.
    """
    if embeds.ndim != 2:
        raise ValueError(f"word_rows takes one prompt's (L, D) embeddings, got shape {tuple(embeds.shape)}")
    n = embeds.shape[0] if attention_mask is None else int(attention_mask.sum())
    if n < 3:
        raise ValueError("the undesired prompt has no word token between its start and end tokens")
    return embeds[1 : n - 1]


def undesired_basis(undesired: Tensor, rank: int | None = None, tol: float = 1e-5) -> Tensor:
    """Orthonormal rows ``(k, D)`` spanning the undesired vectors' row space (right singular vectors).

    The SVD runs in float32 (or float64 if given); singular values at or below ``tol x`` the largest are dropped,
    so near-duplicate rows (PAD copies) do not add noise directions. ``rank`` keeps at most the top ``rank`` axes.

    Args:
        undesired: ``(k, D)`` undesired token vectors.
        rank: Keep at most this many axes (the largest singular values); ``None`` keeps all above the tolerance.
        tol: Relative tolerance on the singular values.
    """
    if undesired.ndim != 2 or undesired.shape[0] == 0:
        raise ValueError(f"undesired vectors must be a non-empty (k, D) matrix, got shape {tuple(undesired.shape)}")
    if rank is not None and rank < 1:
        raise ValueError(f"DECOR rank must be >= 1 (or null), got {rank}")
    x = undesired.detach().to(torch.float64 if undesired.dtype == torch.float64 else torch.float32)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        raise ValueError("the undesired vectors are all zero: there is no direction to project out")
    keep = int((s > tol * s[0]).sum())
    if rank is not None:
        keep = min(keep, rank)
    return vh[:keep]


def projector(basis: Tensor) -> Tensor:
    """``P = V V^T`` (``D x D``) from orthonormal rows ``basis`` (``k x D``)."""
    return basis.T @ basis


def decor_project(x: Tensor, proj: Tensor, alpha: float) -> Tensor:
    """``X' = X - alpha X P`` on every row of ``x`` (``(..., L, D)``: word, BOS, EOS and PAD rows alike).

    Computed in the projector's precision (float32 at least) and returned in ``x``'s dtype; ``alpha = 0`` returns
    ``x`` itself, unchanged.
    """
    alpha = check_alpha(alpha)
    if alpha == 0.0:
        return x
    if proj.shape != (x.shape[-1], x.shape[-1]):
        raise ValueError(f"projector of shape {tuple(proj.shape)} does not fit embeddings of width {x.shape[-1]}")
    work = proj.dtype if proj.dtype in (torch.float32, torch.float64) else torch.float32
    xf = x.to(work)
    return (xf - alpha * (xf @ proj.to(device=x.device, dtype=work))).to(x.dtype)


@dataclass
class DecorConfig:
    """Which directions DECOR projects out of the prompt embeddings, and how much.

    ``undesired`` prompts are encoded by the same text encoder(s) as the prompt (SDXL: both, concatenated).
    """

    undesired: list[str] = field(default_factory=list)
    """Prompts naming the unwanted content (e.g. the reference images' colour or background)."""
    alpha: float = 1.0
    """Projection degree in [0, 1]."""
    mode: Literal["words", "axes"] = "words"
    """``words``: the word-token rows of each undesired prompt; ``axes``: the top-``rank`` right singular vectors of
    each whole encoded undesired prompt (PAD rows included: the PAD-dominated "dominant axes")."""
    rank: int | None = None
    """At most this many axes in total (``axes`` mode default: 1 per undesired prompt); ``None`` = all above tol."""
    tol: float = 1e-5
    """Singular values at or below ``tol`` x the largest are dropped."""
    project_negative: bool = False
    """Also project the negative (unconditional) embeddings of classifier-free guidance."""
    project_pooled: bool = False
    """SDXL: also project the pooled text embedding, away from the undesired prompts' pooled vectors."""

    def __post_init__(self) -> None:
        check_alpha(self.alpha)
        if self.mode not in ("words", "axes"):
            raise ValueError(f"DECOR mode must be 'words' or 'axes', got {self.mode!r}")
        if isinstance(self.undesired, str):
            self.undesired = [self.undesired]


def undesired_vectors(encoded: dict[str, Any], mode: str = "words") -> Tensor:
    """Stack the undesired token vectors of a batch of encoded undesired prompts (``encode_prompt`` output)."""
    embeds, mask = encoded["prompt_embeds"], encoded.get("attention_mask")
    rows = []
    for i in range(embeds.shape[0]):
        if mode == "words":
            rows.append(word_rows(embeds[i], None if mask is None else mask[i]))
        else:
            rows.append(embeds[i])
    return torch.cat(rows).float()


@dataclass
class DecorProjection:
    """A built DECOR projection: the token projector (and the pooled one when asked) plus the settings."""

    config: DecorConfig
    token_projector: Tensor
    pooled_projector: Tensor | None = None

    @property
    def rank(self) -> int:
        return round(float(torch.trace(self.token_projector)))

    def apply(self, embeds: dict[str, Any], alpha: float | None = None, negative: bool = False) -> dict[str, Any]:
        """A copy of an ``encode_prompt`` dict with ``prompt_embeds`` (and ``pooled`` if asked) projected.

        ``negative=True`` marks the negative embeddings: they are projected only with ``project_negative``.
        """
        a = self.config.alpha if alpha is None else check_alpha(alpha)
        out = dict(embeds)
        if negative and not self.config.project_negative:
            return out
        out["prompt_embeds"] = decor_project(embeds["prompt_embeds"], self.token_projector, a)
        if self.config.project_pooled and embeds.get("pooled") is not None and self.pooled_projector is not None:
            out["pooled"] = decor_project(embeds["pooled"], self.pooled_projector, a)
        return out


@torch.no_grad()
def build_projection(encode_prompt: Any, config: DecorConfig) -> DecorProjection:
    """Encode ``config.undesired`` with ``encode_prompt`` (a text-to-image backbone's) and build the projectors."""
    if not config.undesired:
        raise ValueError("DECOR needs at least one undesired prompt (decor.undesired / --undesired)")
    encoded = encode_prompt(list(config.undesired))
    vectors = undesired_vectors(encoded, config.mode)
    rank = config.rank if config.rank is not None or config.mode == "words" else len(config.undesired)
    token = projector(undesired_basis(vectors, rank, config.tol))
    pooled = None
    if config.project_pooled and encoded.get("pooled") is not None:
        pooled = projector(undesired_basis(encoded["pooled"].float(), None, config.tol))
    return DecorProjection(config, token, pooled)


@dataclass
class DecorEvalConfig:
    """Settings of ``python -m visadapt generate`` / ``t2i_sweep`` for a task (read from the task's
    ``model.init_args.evaluation``; ``fit`` does not use them)."""

    prompts: list[str] = field(default_factory=lambda: ["a photo of sks dog"])
    """Evaluation prompts, with the identifier token (the DreamBooth protocol: 25 per subject)."""
    identifier: str = "sks"
    """The identifier token; it is removed from a prompt before its text alignment (CLIP-T) is scored."""
    subject_class: str | None = None
    """Class noun of the subject; prompts written as templates (``"a {0} {1} in the snow"``, DreamBooth's form) get
    ``{0}`` = identifier and ``{1}`` = this."""
    undesired: list[str] = field(default_factory=list)
    """Undesired prompts whose directions DECOR projects out (see :class:`DecorConfig`)."""
    mode: Literal["words", "axes"] = "words"
    """Undesired-vector reading (see :class:`DecorConfig`)."""
    rank: int | None = None
    """At most this many undesired axes."""
    tol: float = 1e-5
    """Relative SVD tolerance."""
    project_negative: bool = False
    """Also project the negative embeddings."""
    project_pooled: bool = False
    """SDXL: also project the pooled embedding."""
    alphas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """Projection degrees of the sweep."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    """One image per seed and prompt (the DreamBooth protocol: 4)."""
    steps: int = 25
    """Sampling steps."""
    guidance_scale: float = 5.0
    """Classifier-free guidance scale."""
    negative_prompt: str = ""
    """Negative prompt (its embeddings are the unconditional branch of guidance)."""
    metric_backbone: str = "devise_effnet_minilm"
    """Registered dual encoder for CLIP-T / CLIP-I (offline: the DeViSE preset, not CLIP)."""
    metric_backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    """Its builder's keyword arguments (e.g. open_clip ``pretrained: /path/to/ViT-L-14.bin``)."""
    dino_backbone: str | None = None
    """Registered image encoder for the DINO score (e.g. a local DINOv2 ViT-L/14); ``None`` = no DINO column."""
    dino_backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    """Its builder's keyword arguments."""
    colour_match: bool = False
    """Also score **colour match**, a text-alignment check for visadapt's tiny Fashion-MNIST base model: the share of
    the garment's pixels painted in the colour the prompt names (:func:`visadapt.data.captions.colour_share`; prompts
    naming none of its eight colours are not counted). The offline DeViSE CLIP-T is nearly blind to colour words."""
    text_axis: Literal["clip_t", "colour_match"] = "clip_t"
    """The text-alignment score on the Pareto plot's y axis and in its front (``colour_match`` needs the flag)."""

    def __post_init__(self) -> None:
        for a in self.alphas:
            check_alpha(a)
        if not self.prompts or not self.seeds:
            raise ValueError("evaluation.prompts and evaluation.seeds must not be empty")

    def resolved_prompts(self, prompts: list[str] | None = None) -> list[str]:
        """``prompts`` (default: this config's) with DreamBooth templates filled in."""
        out = []
        for p in prompts if prompts is not None else self.prompts:
            if "{0}" in p or "{1}" in p:
                if "{1}" in p and not self.subject_class:
                    raise ValueError(f"prompt template {p!r} needs evaluation.subject_class")
                p = p.format(self.identifier, self.subject_class or "")
            out.append(" ".join(p.split()))
        return out

    def decor(self, alpha: float = 1.0) -> DecorConfig:
        return DecorConfig(undesired=list(self.undesired), alpha=alpha, mode=self.mode, rank=self.rank, tol=self.tol,
                           project_negative=self.project_negative, project_pooled=self.project_pooled)


# -- the customization ----------------------------------------------------------------------------------------------

DEFAULT_UNET_ADAPTER = LoRAConfig(target="attn", r=4, alpha=4.0, init="gaussian")
"""diffusers' DreamBooth-LoRA default: rank 4, alpha = rank, Gaussian A, on to_q / to_k / to_v / to_out.0."""

TEXT_ENCODER_PRESETS = {
    "clip_attn": r".*self_attn\.(q_proj|k_proj|v_proj|out_proj)",  # diffusers' text-encoder LoRA targets (CLIP)
    "bert_attn": r".*attention\.self\.(query|key|value)|.*attention\.output\.dense",  # MiniLM / BERT equivalent
}


def _unet_target(target: str) -> str:
    return DIFFUSERS_UNET_PRESETS.get(target, target)


class DreamBoothLoRA(AdapterModule):
    """DreamBooth-LoRA customization of a text-to-image backbone (the training half of DECOR).

    Batches come from :class:`~visadapt.data.dreambooth.DreamBoothDataModule`: instance images with the instance
    prompt (``"a photo of sks sneaker"``) and, with prior preservation, class images with the class prompt.

    Args:
        backbone: Registered text-to-image backbone (``sd_local``, ``sdxl_local``, ``tiny_sd``,
            ``visadapt_t2i_base``; ``python -m visadapt list backbones``).
        backbone_kwargs: Keyword arguments of the backbone builder (e.g. ``model_dir: /path/to/sdxl``).
        adapter: UNet adapter (any registered variant); ``target`` may be a diffusers UNet preset (``attn`` =
            to_q, to_k, to_v, to_out.0). Default: LoRA r=4, alpha=4, Gaussian init, as diffusers' scripts.
        text_encoder_adapter: Optional text-encoder adapter; ``target`` may be ``clip_attn`` or ``bert_attn``.
            Not for SDXL's second encoder (peft < 0.22 with transformers 5 cannot load it in diffusers).
        prior_loss_weight: Weight of the class-image loss (prior preservation; used when the batch has class images).
        train_decor: Extension (not confirmed as part of DECOR): project the training prompts' embeddings with
            these settings during fitting.
        noise_offset: diffusers' ``--noise_offset`` (0 = off).
        evaluation: Prompts, undesired prompts, alphas, seeds and metric models of ``generate`` / ``t2i_sweep``
            (not used by ``fit``).
        save_lora: Write ``pytorch_lora_weights.safetensors`` (diffusers format) into the run folder after ``fit``.
        optimizer: Optimiser over the trainable parameters (diffusers: AdamW, lr 1e-4, weight decay 1e-2).
        lr_scheduler: Scheduler; ``None`` uses the built-in schedule.
        schedule: Built-in schedule (``constant`` as diffusers' scripts, or ``cosine``).
        warmup_steps: Warm-up steps of the built-in schedule.
        min_lr: Final learning rate of the cosine schedule.
    """

    def __init__(
        self,
        backbone: str = "visadapt_t2i_base",
        backbone_kwargs: PlainKwargs | None = None,
        adapter: AdapterConfig | None = None,
        text_encoder_adapter: AdapterConfig | None = None,
        prior_loss_weight: float = 1.0,
        train_decor: DecorConfig | None = None,
        noise_offset: float = 0.0,
        evaluation: DecorEvalConfig | None = None,
        save_lora: bool = True,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        schedule: str = "constant",
        warmup_steps: int = 0,
        min_lr: float = 1e-6,
    ) -> None:
        super().__init__(optimizer, lr_scheduler, schedule, warmup_steps, min_lr)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "adapter", "text_encoder_adapter",
                                          "train_decor", "evaluation"])
        self.hparams["adapter"] = None if adapter is None else {"class": type(adapter).__name__, **asdict(adapter)}
        self.hparams["text_encoder_adapter"] = (None if text_encoder_adapter is None else
                                                {"class": type(text_encoder_adapter).__name__,
                                                 **asdict(text_encoder_adapter)})
        self.hparams["train_decor"] = None if train_decor is None else asdict(train_decor)
        self.hparams["evaluation"] = None if evaluation is None else asdict(evaluation)
        self.evaluation = evaluation
        bb = build_backbone(backbone, **(backbone_kwargs or {}))
        self.backbone_identity = bb.identity
        self.t2i = bb.model
        for p in self.t2i.parameters():
            p.requires_grad_(False)
        adapter = adapter if adapter is not None else DEFAULT_UNET_ADAPTER
        self.adapter_cfg = adapter
        self.unet_injection = inject(self.t2i.unet, replace(adapter, target=_unet_target(adapter.target)),
                                     verbose=False)
        self.text_injection = None
        if text_encoder_adapter is not None:
            target = TEXT_ENCODER_PRESETS.get(text_encoder_adapter.target, text_encoder_adapter.target)
            self.text_injection = inject(self.t2i.text_encoder, replace(text_encoder_adapter, target=target),
                                         verbose=False)
        self.prior_loss_weight = float(prior_loss_weight)
        self.train_decor = train_decor
        self._train_projection = None
        self.noise_offset = float(noise_offset)
        self.save_lora = save_lora
        size = int(self.t2i.image_size)
        # pixels in [-1, 1], as diffusers' DreamBooth scripts feed the VAE (or the pixel-space UNet)
        self.preprocess = Preprocess(image_size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear")
        self._prompt_cache: dict[tuple[str, ...], dict[str, Any]] = {}
        self.report: dict[str, Any] = {"backbone": bb.identity, "trainable_params": count_parameters(self.t2i)[0]}
        self.lora_file: Path | None = None

    # -- prompts --------------------------------------------------------------------------------------------------
    def text_encoder_trains(self) -> bool:
        return self.text_injection is not None

    def encode(self, prompts: list[str]) -> dict[str, Any]:
        """The backbone's ``encode_prompt`` (cached while the text encoder is frozen), DECOR-projected when
        ``train_decor`` is set."""
        key = tuple(prompts)
        if not self.text_encoder_trains() and key in self._prompt_cache:
            enc = self._prompt_cache[key]
        else:
            with torch.set_grad_enabled(self.text_encoder_trains() and torch.is_grad_enabled()):
                enc = self.t2i.encode_prompt(list(prompts))
            if not self.text_encoder_trains():
                enc = {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in enc.items()}
                self._prompt_cache[key] = enc
        if self.train_decor is not None:
            if self._train_projection is None:
                self._train_projection = build_projection(self.t2i.encode_prompt, self.train_decor)
            enc = self._train_projection.apply(enc)
        return enc

    # -- training -------------------------------------------------------------------------------------------------
    def predict_noise(self, noisy: Tensor, t: Tensor, enc: dict[str, Any]) -> Tensor:
        """The UNet's prediction under the backbone's conditioning rule (``TextToImage.unet_forward``: prompt
        embeddings for cross-attention; SDXL adds the pooled embedding and the size/crop time ids)."""
        return self.t2i.unet_forward(noisy, t, enc["prompt_embeds"], enc.get("pooled"))

    def noise_prediction_loss(self, images: Tensor, prompts: list[str], is_class: Tensor | None = None,
                              generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """diffusers' DreamBooth loss on a batch: per-sample MSE of the predicted noise (or ``v``), averaged over
        instance rows, plus ``prior_loss_weight`` x the average over class rows when there are any."""
        enc = self.encode(prompts)
        latents = self.t2i.to_latents(images, generator=generator)
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=generator,
                                                            device=latents.device, dtype=latents.dtype)
        sched = self.t2i.noise_scheduler
        steps = int(sched.config.num_train_timesteps)
        t = torch.randint(0, steps, (latents.shape[0],), generator=generator, device=latents.device)
        noisy = sched.add_noise(latents, noise, t)
        pred = self.predict_noise(noisy, t, enc)
        target = self.t2i.training_target(latents, noise, t)  # epsilon, v or sample, per the scheduler
        per = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
        if is_class is None:
            is_class = torch.zeros(len(per), dtype=torch.bool, device=per.device)
        inst, cls = per[~is_class], per[is_class]
        out = {"instance_loss": inst.mean() if len(inst) else per.new_zeros(())}
        out["loss"] = out["instance_loss"]
        if len(cls):
            out["prior_loss"] = cls.mean()
            out["loss"] = out["loss"] + self.prior_loss_weight * out["prior_loss"]
        return out

    @staticmethod
    def _flatten_batch(batch: dict[str, Any]) -> tuple[Tensor, list[str], Tensor]:
        """Instance rows then class rows (diffusers concatenates them the same way)."""
        images, prompts = batch["image"], list(batch["prompt"])
        is_class = torch.zeros(len(prompts), dtype=torch.bool, device=images.device)
        if "class_image" in batch:
            images = torch.cat([images, batch["class_image"]])
            prompts += list(batch["class_prompt"])
            is_class = torch.cat([is_class, torch.ones(len(batch["class_prompt"]), dtype=torch.bool,
                                                       device=images.device)])
        return images, prompts, is_class

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        images, prompts, is_class = self._flatten_batch(batch)
        out = self.noise_prediction_loss(images, prompts, is_class)
        n = len(batch["prompt"])
        self.log("train_loss", out["loss"], prog_bar=True, batch_size=n)
        if "prior_loss" in out:
            self.log("instance_loss", out["instance_loss"], batch_size=n)
            self.log("prior_loss", out["prior_loss"], batch_size=n)
        return out["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        images, prompts, is_class = self._flatten_batch(batch)
        gen = torch.Generator(device=images.device).manual_seed(1234 + batch_idx)  # the same noise every validation
        out = self.noise_prediction_loss(images, prompts, is_class, generator=gen)
        self.log("val_loss", out["loss"], prog_bar=True, batch_size=len(batch["prompt"]))

    # -- export ---------------------------------------------------------------------------------------------------
    def export_lora(self, out_dir: str | Path) -> Path:
        """Write the adapters as diffusers' ``pytorch_lora_weights.safetensors`` into ``out_dir``."""
        components = {"unet": self.t2i.unet}
        if self.text_injection is not None:
            components["text_encoder"] = self.t2i.text_encoder
        return export_diffusers(out_dir, **components)

    def on_fit_end(self) -> None:
        if not self.save_lora or not self.trainer.is_global_zero or self.trainer.fast_dev_run:
            return
        out = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        self.lora_file = self.export_lora(out)
        self.report["lora_file"] = str(self.lora_file)
        print(f"visadapt: LoRA written in diffusers format to {self.lora_file}")


__all__ = [
    "DEFAULT_UNET_ADAPTER",
    "DecorConfig",
    "DecorEvalConfig",
    "DecorProjection",
    "DreamBoothLoRA",
    "build_projection",
    "check_alpha",
    "decor_project",
    "projector",
    "undesired_basis",
    "undesired_vectors",
    "word_rows",
]
