"""The two baselines CoACT is compared with in the session runner: frozen class means and naive LoRA fine-tuning."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from visadapt.methods.fscil.base import CoACTSGD, FSCILModule, SessionInfo, restrict, views_of
from visadapt.methods.fscil.registry import register_fscil_method


@register_fscil_method("frozen_class_mean")
class FrozenClassMean(FSCILModule):
    """Baseline: the pretrained encoder, frozen, with class-mean classifier rows (no training at all).

    Row c of the classifier is the mean feature of class c's training images (all base-session images for base
    classes, the K shots for novel ones); logits follow ``model.head`` (dot product, or cosine = nearest class mean
    by angle). ``model.adapter`` is not used.

    Args:
        eval_batch_size: Batch size of feature extraction.
    """

    uses_adapter = False

    def __init__(self, eval_batch_size: int = 100) -> None:
        super().__init__(batch_size=1, eval_batch_size=eval_batch_size)

    def prepare_session(self, info: SessionInfo, prototypes: Iterable[dict[str, Any]]) -> None:
        self.set_prototypes(prototypes, info.new_classes)

    def session_param_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        return []


@register_fscil_method("naive_lora_finetune")
class NaiveLoRAFinetune(FSCILModule):
    """Baseline: the adapter and classifier fine-tuned with cross-entropy in every session (shows forgetting).

    Base session: rows initialised with class means, then adapter + classifier train on the base data. Every
    incremental session: new rows := class means, then adapter + classifier train on the new shots only, at
    ``lr * inc_lr_factor``, with no distillation and no replay. The schedule is cosine over each session's epochs.

    Args:
        epochs_base: Epochs of the base session.
        epochs_incremental: Epochs of each incremental session.
        inc_lr_factor: Learning-rate factor of incremental sessions.
        ce_over: Classes in the cross-entropy: ``seen`` (masked) or ``all`` rows.
        batch_size: Training batch size.
        eval_batch_size: Batch size of feature extraction.
        optimizer: Optimiser (default :class:`~visadapt.methods.fscil.base.CoACTSGD`, lr 0.1).
        lr_scheduler: Scheduler; ``None``: cosine over the session's epochs, stepped per epoch.
    """

    def __init__(self, epochs_base: int = 25, epochs_incremental: int = 5, inc_lr_factor: float = 1.0,
                 ce_over: Literal["seen", "all"] = "seen", batch_size: int = 64, eval_batch_size: int = 100,
                 optimizer: OptimizerCallable = CoACTSGD, lr_scheduler: LRSchedulerCallable | None = None) -> None:
        super().__init__(batch_size, eval_batch_size, optimizer, lr_scheduler)
        self.epochs_base, self.epochs_incremental = epochs_base, epochs_incremental
        self.inc_lr_factor, self.ce_over = inc_lr_factor, ce_over

    def session_epochs(self, session: int) -> int:
        return self.epochs_base if session == 0 else self.epochs_incremental

    def prepare_session(self, info: SessionInfo, prototypes: Iterable[dict[str, Any]]) -> None:
        self.set_prototypes(prototypes, info.new_classes)
        if self.session_epochs(info.session) > 0:
            for p in self._trainable():
                p.requires_grad_(True)

    def _trainable(self) -> list[nn.Parameter]:
        return self.adapter_parameters() + [self.classifier.weight]

    def session_param_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        return [(self._trainable(), 1.0 if self.info.session == 0 else self.inc_lr_factor)]

    def cosine_schedule(self) -> bool:
        return True

    def training_step(self, batch: dict[str, Any], batch_idx: int):
        x, y = views_of(batch["image"])[0], batch["label"]
        logits = self.classifier(self.encoder(x))
        loss = F.cross_entropy(restrict(logits, self.info.seen_classes if self.ce_over == "seen" else None), y)
        self.accumulate(len(y), loss=loss)
        return loss


__all__ = ["FrozenClassMean", "NaiveLoRAFinetune"]
