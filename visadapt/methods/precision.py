"""Frozen base weights in bf16 with fp32 adapters: a callback for any method (the issue-17 option).

    python -m visadapt fit -c tasks/clip_fewshot.yaml -c configs/speed/bf16_base.yaml

``precision: bf16-mixed`` alone keeps every weight in fp32 and lets autocast cast the frozen weights to bf16 again on
every forward (autocast caches casts of trainable leaves only). This callback stores the frozen ``nn.Linear`` /
``nn.Conv*`` weights in bf16 once, before the run (:func:`visadapt.adapters.cast_frozen_base`): half the weight
memory and no per-step cast. Adapters, heads, norms and everything trained stay fp32, so the optimiser updates fp32
tensors. Checkpoints are unaffected (they hold the trained tensors only). A method that unfreezes base layers mid-run
(CoACT's controlled fine-tuning) gets those layers back in fp32 at the start of the epoch they train in, with the bf16
rounding in their values: for such methods prefer plain ``bf16-mixed``.
"""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import torch

from visadapt.adapters import cast_frozen_base, upcast_trainable

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class LowPrecisionBase(pl.Callback):
    """Store the frozen base weights in ``dtype`` (adapters and trained tensors stay fp32).

    Args:
        dtype: ``bfloat16`` (default) or ``float16``. Pair it with ``precision: bf16-mixed`` / ``16-mixed``; without
            autocast the cast layers still compute in ``dtype`` (their inputs are cast) and hand fp32 on.
    """

    def __init__(self, dtype: str = "bfloat16") -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.dtype = _DTYPES[dtype]
        self.cast: list[str] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.cast += cast_frozen_base(pl_module, self.dtype)
        log.info("LowPrecisionBase: %d frozen Linear/Conv modules stored in %s", len(self.cast), self.dtype)
        report = getattr(pl_module, "report", None)
        if isinstance(report, dict):
            report["frozen_base_dtype"] = {"dtype": str(self.dtype).removeprefix("torch."), "modules": len(self.cast)}

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        back = upcast_trainable(pl_module)
        if back:
            log.warning("LowPrecisionBase: %d cast module(s) became trainable and are fp32 again (their values keep "
                        "the bf16 rounding), e.g. %s", len(back), back[0])
