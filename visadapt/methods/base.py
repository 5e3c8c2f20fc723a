"""The LightningModule base shared by every method: optimiser injection and adapter-only checkpoints.

* The optimiser is injected (``optimizer: OptimizerCallable``) and only ever sees trainable parameters, split in
  two groups so that weight decay skips biases, norms and other 1-D parameters.
* A built-in cosine schedule (per step, down to ``min_lr``, over ``trainer.estimated_stepping_batches``) is the
  default; an injected ``lr_scheduler`` replaces it.
* Checkpoints hold only what was trained (parameters with ``requires_grad``, plus the keys a method names in
  :meth:`extra_state_keys`) and a ``visadapt`` record of how to rebuild the run. Loading a checkpoint that lacks one
  of those keys is an error, never a silent partial load.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

import visadapt
from visadapt.adapters import adapter_layers


# AdapterModule.train() keeps the frozen backbone in eval mode on purpose; Lightning's notice about it is noise.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


class MissingCheckpointKeysError(KeyError):
    """A checkpoint lacks trained parameters this model expects."""


class AdapterModule(pl.LightningModule):
    """Base class of visadapt methods (not used directly).

    Args:
        optimizer: Optimiser class or callable receiving the trainable parameter groups.
        lr_scheduler: Scheduler callable; ``None`` uses the built-in ``schedule``.
        schedule: Built-in per-step schedule when ``lr_scheduler`` is ``None``: ``cosine`` or ``constant``.
        warmup_steps: Linear warm-up steps of the built-in schedule.
        min_lr: Final learning rate of the cosine schedule.
    """

    def __init__(self, optimizer: OptimizerCallable = torch.optim.AdamW, lr_scheduler: LRSchedulerCallable | None = None,
                 schedule: str = "cosine", warmup_steps: int = 0, min_lr: float = 1e-6) -> None:
        super().__init__()
        if schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
        self.optimizer_fn, self.lr_scheduler_fn = optimizer, lr_scheduler
        self.schedule, self.warmup_steps, self.min_lr = schedule, warmup_steps, min_lr
        # Lightning's strict load would demand the frozen backbone; on_load_checkpoint checks what matters.
        self.strict_loading = False

    def train(self, mode: bool = True) -> "AdapterModule":
        """Train mode for what trains, eval mode for the frozen rest.

        Frozen backbone layers stay in eval mode while training, so BatchNorm keeps its pretrained running
        statistics and backbone dropout stays off (a frozen model must not drift); adapters (and their input
        dropout) and any module with a trainable parameter of its own follow ``mode``.
        """
        super().train(mode)
        if mode:
            for module in self.modules():
                if module is not self and not any(p.requires_grad for p in module.parameters(recurse=False)):
                    module.eval()
            for _, layer in adapter_layers(self):
                layer.adapters.train(True)
            for module in self.modules():
                if any(p.requires_grad for p in module.parameters(recurse=False)):
                    module.training = True  # not recursive: frozen children (BatchNorm) stay in eval mode
        return self

    # -- optimisation -------------------------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters, weight-decayed (>= 2-D) and not (biases, norms, scalars)."""
        decay, no_decay = [], []
        for _, p in self.named_parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        if not decay and not no_decay:
            raise RuntimeError(f"{type(self).__name__} has no trainable parameter: check the adapter targets")
        groups = [{"params": decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_fn(self.param_groups())
        if self.lr_scheduler_fn is not None:
            return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_fn(optimizer)}
        if self.schedule == "constant" and self.warmup_steps == 0:
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        base_lrs = [g["lr"] for g in optimizer.param_groups]
        warm, cosine = self.warmup_steps, self.schedule == "cosine"

        def factor(step: int, base: float) -> float:
            if step < warm:
                return (step + 1) / warm
            if not cosine:
                return 1.0
            t = min(1.0, (step - warm) / max(1, total - warm))
            lo = min(self.min_lr / base, 1.0) if base > 0 else 0.0
            return lo + (1 - lo) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * t)).item())

        sched = torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda s, b=b: factor(s, b) for b in base_lrs])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- checkpoints --------------------------------------------------------------------------------------------
    def extra_state_keys(self) -> set[str]:
        """State-dict keys that are not trainable parameters but must be saved (e.g. a fitted head buffer)."""
        return set()

    def trainable_state_keys(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad} | self.extra_state_keys()

    def run_record(self) -> dict[str, Any]:
        """What is needed to rebuild the run; stored in every checkpoint under ``visadapt``."""
        return {"version": visadapt.__version__, "class": f"{type(self).__module__}.{type(self).__qualname__}",
                "hparams": {k: repr(v) for k, v in self.hparams.items()}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.trainable_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["visadapt"] = self.run_record()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        expected = self.trainable_state_keys()
        present = set(checkpoint.get("state_dict", {}))
        missing = sorted(expected - present)
        if missing:
            raise MissingCheckpointKeysError(
                f"checkpoint lacks {len(missing)} trained tensor(s) this model expects, e.g. {missing[:5]}; it was "
                "written by a different method, adapter or target configuration")
        own = self.state_dict()
        for k in sorted(present):
            if k in own and own[k].shape != checkpoint["state_dict"][k].shape:
                raise ValueError(f"checkpoint tensor {k} has shape {tuple(checkpoint['state_dict'][k].shape)}, "
                                 f"the model expects {tuple(own[k].shape)}")
