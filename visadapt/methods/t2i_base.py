"""Training a small text-to-image diffusion model from scratch: the noise-prediction objective as a LightningModule.

This trains visadapt's tiny base model (backbone ``visadapt_t2i_base`` with ``pretrained: false``): every UNet weight
trains, the text encoder stays frozen. One step is DDPM's simple loss (Ho et al., 2020):

    x0 -> latents z0 (space-to-depth for the pixel-space base), eps ~ N(0, I), t ~ U{0..T-1},
    z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps,   loss = || unet(z_t, t, text(c)) - target ||^2

with the target given by the scheduler's prediction type (epsilon by default). Captions come from the data; the
empty caption of the dataset trains the unconditional branch used by classifier-free guidance. The frozen text
encoder is deterministic, so the embeddings of each distinct caption are computed once and reused.

An exponential moving average (EMA) of the UNet weights is kept when ``ema_decay > 0`` and is what gets exported.
At the end of ``fit`` the run folder receives:

* ``t2i_base/``: the exported model (``unet/`` safetensors + ``t2i_base.json``), loadable with
  ``build_backbone("visadapt_t2i_base", model_dir=...)``; copy it to ``~/.cache/visadapt/t2i_base`` (or ship it in
  ``visadapt/assets/t2i_base``);
* ``samples.png``: a grid of samples (one row per prompt, fixed seeds), ``loss.png``: the training loss;
* ``report.json`` / ``report.md``: steps, wall time, loss, and the prompt-following scores of
  :func:`~visadapt.data.captions.score_samples` (class agreement by nearest class mean, colour agreement).
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from visadapt.backbones import Backbone, build_backbone
from visadapt.backbones.t2i import TextToImage, save_t2i_base
from visadapt.data.captions import CLASS_WORDS, COLOURS, caption, fashion_class_means, score_samples
from visadapt.methods.base import AdapterModule, PlainKwargs
from visadapt.report import write_report

log = logging.getLogger(__name__)

__all__ = ["TextToImageBase", "export_checkpoint", "image_grid"]


def image_grid(images: torch.Tensor, rows: int, labels: list[str] | None = None, scale: int = 2) -> Any:
    """A matplotlib figure with ``images`` (N, H, W, 3) uint8 in ``rows`` rows, each row titled by ``labels``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = int(np.ceil(len(images) / rows))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.55 * scale + 2.2, rows * 0.55 * scale), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            ax.imshow(images[i].numpy(), interpolation="nearest")
    if labels:
        for r, text in enumerate(labels[:rows]):
            axes[r, 0].text(-0.15, 0.5, text, transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=7)
    fig.subplots_adjust(left=0.3, right=0.99, top=0.99, bottom=0.01, wspace=0.05, hspace=0.05)
    return fig


class TextToImageBase(AdapterModule):
    """Train a text-conditioned diffusion UNet from scratch with the noise-prediction loss (frozen text encoder).

    Args:
        backbone: Registered text-to-image backbone (a :class:`~visadapt.backbones.t2i.TextToImage`).
        backbone_kwargs: Its keyword arguments; ``pretrained: false`` starts the base model from random weights.
        ema_decay: Decay of the UNet weights' moving average (0 disables it); the EMA is exported and sampled.
        ema_warmup: The decay used at step s is ``min(ema_decay, (1 + s) / (ema_warmup + s))``: early weights are
            not averaged in with a large weight.
        eval_seeds: Seeds (images) per prompt for the end-of-fit samples and scores.
        eval_steps: DDIM steps of those samples.
        guidance_scale: Classifier-free guidance weight of those samples.
        eval_colours: Colours of the scored prompts ``"a photo of a <colour> <class>"``, cycled over the classes.
        template: Caption template of the scored prompts (the training data's).
        export_dtype: dtype of the exported UNet weights (``float16`` halves the file; sampling runs in float32).
        optimizer: Optimiser over the UNet's parameters.
        lr_scheduler: Scheduler callable; None uses the built-in ``schedule``.
        schedule: ``cosine`` or ``constant`` (built-in, per step).
        warmup_steps: Linear warm-up steps.
        min_lr: Final learning rate of the cosine schedule.
    """

    def __init__(self, backbone: str = "visadapt_t2i_base", backbone_kwargs: PlainKwargs | None = None,
                 ema_decay: float = 0.995, ema_warmup: int = 10, eval_seeds: int = 4, eval_steps: int = 25,
                 guidance_scale: float = 1.5, eval_colours: list[str] | None = None,
                 template: str = "a photo of a {}", export_dtype: str = "float16",
                 optimizer: OptimizerCallable = torch.optim.AdamW, lr_scheduler: LRSchedulerCallable | None = None,
                 schedule: str = "cosine", warmup_steps: int = 100, min_lr: float = 1e-5) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, schedule=schedule,
                         warmup_steps=warmup_steps, min_lr=min_lr)
        self.save_hyperparameters()
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {ema_decay}")
        kwargs = {"pretrained": False} if backbone_kwargs is None else dict(backbone_kwargs)
        bb: Backbone = build_backbone(backbone, **kwargs)
        if not isinstance(bb.model, TextToImage):
            raise ValueError(f"backbone {backbone!r} is not a text-to-image backbone (got {type(bb.model).__name__})")
        self.t2i: TextToImage = bb.model
        self.identity = bb.identity
        self.preprocess = bb.preprocess
        self.t2i.unet.requires_grad_(True)
        for enc in self.t2i.text_encoders:
            enc.requires_grad_(False)
        self.ema_decay, self.ema_warmup = ema_decay, ema_warmup
        self.ema_unet = copy.deepcopy(self.t2i.unet).requires_grad_(False) if ema_decay > 0 else None
        self.eval_seeds, self.eval_steps, self.guidance_scale = eval_seeds, eval_steps, guidance_scale
        self.eval_colours = list(eval_colours) if eval_colours is not None else list(COLOURS)
        self.template, self.export_dtype = template, export_dtype
        self._embed_cache: dict[str, torch.Tensor] = {}
        self.losses: list[float] = []
        self.report: dict[str, Any] = {"backbone": bb.identity}

    def extra_state_keys(self) -> set[str]:
        return {k for k in self.state_dict() if k.startswith("ema_unet.")}

    # -- training -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """Per-token states of ``texts`` from the frozen text encoder, computed once per distinct caption."""
        missing = sorted({t for t in texts if t not in self._embed_cache})
        if missing:
            enc = self.t2i.encode_prompt(missing)["prompt_embeds"]
            self._embed_cache.update(zip(missing, enc))
        return torch.stack([self._embed_cache[t] for t in texts])

    def diffusion_loss(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """DDPM's simple loss on a batch of images in [-1, 1] and their captions."""
        latents = self.t2i.to_latents(images)
        noise = torch.randn_like(latents)
        sched = self.t2i.noise_scheduler
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy = sched.add_noise(latents, noise, t)
        pred = self.t2i.unet_forward(noisy, t, self.embed(texts))
        return F.mse_loss(pred.float(), self.t2i.training_target(latents, noise, t).float())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.diffusion_loss(batch["image"], batch["text"])
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["text"]))
        self.losses.append(float(loss.detach()))
        return loss

    @torch.no_grad()
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)  # the adapter companions (SCHEDULES), if any
        if self.ema_unet is None:
            return
        step = self.global_step
        decay = min(self.ema_decay, (1 + step) / (self.ema_warmup + step))
        for ema, p in zip(self.ema_unet.parameters(), self.t2i.unet.parameters()):
            ema.lerp_(p.detach(), 1.0 - decay)

    def on_fit_start(self) -> None:
        unet = sum(p.numel() for p in self.t2i.unet.parameters())
        self.report.update(unet_params=unet, text_params=sum(p.numel() for e in self.t2i.text_encoders
                                                             for p in e.parameters()))
        self._fit_started = time.perf_counter()

    # -- end of fit: export, samples, scores --------------------------------------------------------------------
    def exported_unet(self) -> torch.nn.Module:
        """The weights that are exported and sampled: the EMA when kept, else the trained UNet."""
        return self.ema_unet if self.ema_unet is not None else self.t2i.unet

    @torch.no_grad()
    def samples_and_scores(self) -> tuple[torch.Tensor, list[str], dict[str, float]]:
        """Samples for one prompt per class (colours cycled), ``eval_seeds`` each, and their prompt-following
        scores; uses the exported weights."""
        prompts, labels, colours = [], [], []
        for c, word in enumerate(CLASS_WORDS):
            colour = self.eval_colours[c % len(self.eval_colours)] if self.eval_colours else ""
            prompts.append(caption(word, colour, self.template))
            labels.append(c)
            colours.append(colour)
        trained = self.t2i.unet
        self.t2i.unet = self.exported_unet()
        try:
            enc = self.t2i.encode_prompt(prompts)["prompt_embeds"]
            seeds = list(range(self.eval_seeds))
            embeds = enc.repeat_interleave(len(seeds), 0)
            images = self.t2i.sample(embeds, seeds=seeds * len(prompts), steps=self.eval_steps,
                                     guidance_scale=self.guidance_scale)
        finally:
            self.t2i.unet = trained
        rep = [x for x in labels for _ in seeds]
        rep_colours = [x for x in colours for _ in seeds]
        scores = score_samples(images, rep, rep_colours, fashion_class_means())
        return images, prompts, scores

    def _loss_plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        losses = np.asarray(self.losses)
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.plot(losses, lw=0.5, alpha=0.4, label="step")
        k = max(1, min(50, len(losses) // 10))
        if len(losses) >= k:
            ax.plot(np.arange(k - 1, len(losses)), np.convolve(losses, np.ones(k) / k, mode="valid"),
                    label=f"mean of {k}")
        ax.set(xlabel="step", ylabel="noise-prediction MSE", yscale="log", title="t2i base training loss")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)

    def on_fit_end(self) -> None:
        self.report["train_seconds"] = round(self.resumed_train_seconds + time.perf_counter() - self._fit_started, 2)
        self.report["steps"] = self.global_step
        if not self.trainer.is_global_zero:
            return
        if not self.trainer.loggers or self.trainer.log_dir is None:  # fast_dev_run: score, write nothing
            self.report.update({f"eval_{k}": round(v, 4) for k, v in self.samples_and_scores()[2].items()})
            return
        for logger in self.trainer.loggers:
            logger.save()
        self.finalize(Path(self.trainer.log_dir), self.global_step,
                      getattr(self.trainer.datamodule, "batch_size", None))
        for logger in self.trainer.loggers:
            logger.log_metrics({k: v for k, v in self.report.items() if k.startswith("eval_")}, step=self.global_step)
            logger.save()

    def finalize(self, log_dir: Path, steps: int, batch_size: int | None) -> Path:
        """Samples, scores, plots, the exported model and the report, written into ``log_dir``; returns the export.

        Also used by :func:`export_checkpoint` for a run that was stopped before its end.
        """
        import matplotlib.pyplot as plt

        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.report["steps"] = steps
        every_step = bool(self.losses)  # in-process: one loss per step; a stopped run has its CSV log only
        if every_step:
            self.report["final_loss_mean_last_100_steps"] = round(float(np.mean(self.losses[-100:])), 5)
        elif (log_dir / "metrics.csv").is_file():  # the logged steps (every n-th); report.md plots them by step
            import csv

            with open(log_dir / "metrics.csv", newline="") as f:
                logged = [float(r["train_loss"]) for r in csv.DictReader(f) if r.get("train_loss")]
            if logged:
                self.report["final_loss_mean_last_10_logged"] = round(float(np.mean(logged[-10:])), 5)
        images, prompts, scores = self.samples_and_scores()
        self.report["eval"] = {"prompts": len(prompts), "seeds_per_prompt": self.eval_seeds,
                               "steps": self.eval_steps, "guidance_scale": self.guidance_scale, **scores}
        self.report.update({f"eval_{k}": round(v, 4) for k, v in scores.items()})
        fig = image_grid(images, len(prompts), prompts)
        fig.savefig(log_dir / "samples.png", dpi=100)
        plt.close(fig)
        if every_step:
            self._loss_plot(log_dir / "loss.png")
        meta = {"version": "v2", "identity": "visadapt_t2i_base:v2", "trained_steps": steps,
                "train_seconds": self.report.get("train_seconds"), "batch_size": batch_size,
                "ema_decay": self.ema_decay, "data": "colourised Fashion-MNIST train (fashion_mnist_captions)",
                "eval": self.report["eval"]}
        trained = self.t2i.unet
        self.t2i.unet = self.exported_unet()
        try:
            folder = save_t2i_base(self.t2i, log_dir / "t2i_base", meta, dtype=self.export_dtype)
        finally:
            self.t2i.unet = trained
        self.report["exported"] = str(folder)
        md = write_report(log_dir, self.report, title="t2i base report")
        print(md.read_text())
        print(f"report written to {md}; samples in {log_dir / 'samples.png'}")
        return folder


def export_checkpoint(ckpt_path: str, log_dir: str | None = None, **kwargs: Any) -> Path:
    """Export, sample and score the weights of a :class:`TextToImageBase` checkpoint (e.g. of a run stopped early).

    Args:
        ckpt_path: A checkpoint written during ``fit`` (``.../checkpoints/last.ckpt``).
        log_dir: Where to write (default: the run folder holding ``checkpoints/``).
        kwargs: :class:`TextToImageBase` arguments (the run's; ``backbone_kwargs`` defaults to an untrained UNet
            whose weights the checkpoint then replaces).

    Returns:
        The exported model folder.
    """
    from visadapt.methods.base import read_checkpoint

    ckpt = read_checkpoint(ckpt_path)
    model = TextToImageBase(**kwargs)
    model.on_load_checkpoint(ckpt)  # fails when a trained tensor is missing
    model.load_state_dict(ckpt["state_dict"], strict=False)
    model.report["train_seconds"] = round(model.resumed_train_seconds, 2)
    model.report["exported_from"] = str(ckpt_path)
    out = Path(log_dir) if log_dir else Path(ckpt_path).resolve().parent.parent
    return model.finalize(out, int(ckpt["global_step"]), None)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Export, sample and score a t2i base checkpoint (a run stopped "
                                                 "before its end).")
    parser.add_argument("ckpt_path")
    parser.add_argument("--log_dir", default=None)
    parser.add_argument("--eval_seeds", type=int, default=4)
    parser.add_argument("--eval_steps", type=int, default=25)
    args = parser.parse_args()
    export_checkpoint(args.ckpt_path, args.log_dir, eval_seeds=args.eval_seeds, eval_steps=args.eval_steps)
