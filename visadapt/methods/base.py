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

import logging
import pickle
import time
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

import visadapt
from visadapt.adapters import REGULARISERS, SCHEDULES, adapter_layers, is_adapter_param, variant_name
from visadapt.errors import CorruptFileError, UnsafeCheckpointError
from visadapt.rng import capture_rng_states, restore_rng_states

log = logging.getLogger(__name__)

Scalar = Union[str, int, float, bool, None]
PlainKwargs = dict[str, Union[Scalar, list[Scalar], dict[str, Scalar]]]
"""Free-form keyword arguments of a method (e.g. ``backbone_kwargs``): plain data only. A ``dict[str, Any]`` would let
jsonargparse instantiate any ``class_path`` found in a config or checkpoint."""


def _find_class_paths(obj: Any, where: str = "") -> list[str]:
    """Locations of ``class_path`` / ``_instantiator`` keys anywhere inside ``obj``."""
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("class_path", "_class_path", "_instantiator"):
                found.append(f"{where}.{k}".lstrip(".") + f"={v!r}")
            found += _find_class_paths(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found += _find_class_paths(v, f"{where}[{i}]")
    return found


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a Lightning checkpoint with ``torch.load(weights_only=True)``; every failure names the file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeCheckpointError: the file holds pickled objects (unpickling would run code).
        CorruptFileError: the file is truncated or not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeCheckpointError(
            f"{path} is not a plain checkpoint: reading it would unpickle Python objects ({first}). visadapt reads "
            "checkpoints with torch.load(weights_only=True) only; refusing it") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CorruptFileError(f"{path} is truncated or not a checkpoint ({first}); resume from another checkpoint "
                               "or start the run again") from None
    missing = [k for k in ("state_dict", "pytorch-lightning_version") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CorruptFileError(f"{path} is not a Lightning checkpoint (no {' / '.join(missing)})")
    return ckpt


EVAL_MODE_NOTICE = r"Found \d+ module\(s\) in eval mode at the start of training"
"""Lightning's notice at the start of ``fit``. :meth:`AdapterModule.train` keeps the frozen backbone in eval mode on
purpose, so for visadapt's modules the notice is noise."""


@contextmanager
def quiet_eval_mode_notice() -> Iterator[None]:
    """Hide :data:`EVAL_MODE_NOTICE` inside the block or the decorated function only (no global warning filter).

    ``python -m visadapt`` runs under it; in a script: ``with quiet_eval_mode_notice(): trainer.fit(model, data)``.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=EVAL_MODE_NOTICE)
        yield


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
        self.resumed_train_seconds = 0.0  # training time of the run before it was resumed (from the checkpoint)
        self._companion_step: int | None = None  # global step at the last run of the SCHEDULES companions
        self._schedules: list[Any] | None = None
        self._train_t0: float | None = None

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
        for group in optimizer.param_groups:  # a group may carry a scale of the base rate (layer-wise lr decay)
            group["lr"] = group["lr"] * group.get("lr_scale", 1.0)
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

    def train_seconds(self) -> float:
        """Training time of the whole run so far, including the time before a resume."""
        running = 0.0 if self._train_t0 is None else time.perf_counter() - self._train_t0
        return self.resumed_train_seconds + running

    # -- adapter companions ------------------------------------------------------------------------------------
    def adapter_variants(self) -> list[str]:
        """Registered variant names of the adapters injected in this module, in order of first appearance."""
        names: dict[str, None] = {}
        for _, layer in adapter_layers(self):
            names.update(dict.fromkeys(variant_name(c) for c in layer.configs.values()))
        return list(names)

    def adapter_regularisation(self) -> torch.Tensor | None:
        """Sum of the ``REGULARISERS`` registered under the injected adapters' variant names (each is called as
        ``fn(module) -> Tensor | None``), or ``None`` when no variant has one. Methods add it to the task loss."""
        total = None
        for variant in self.adapter_variants():
            if variant in REGULARISERS:
                term = REGULARISERS.get(variant)(self)
                if term is not None:
                    total = term if total is None else total + term
        return total

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """After each optimiser step, run the ``SCHEDULES`` registered under the injected adapters' variant names
        (a class, instantiated once per fit; its ``on_train_step_end(module, step, total_steps, lr)`` is called)."""
        step = int(self.global_step)
        if step == self._companion_step:
            return  # gradient accumulation: no optimiser step since the last call
        self._companion_step = step
        if self._schedules is None:
            self._schedules = [SCHEDULES.get(v)() for v in self.adapter_variants() if v in SCHEDULES]
        schedules = self._schedules
        if schedules:
            total = max(1, int(self.trainer.estimated_stepping_batches))
            optimizers = self.trainer.optimizers
            lr = float(optimizers[0].param_groups[0]["lr"]) if optimizers else 0.0
            for schedule in schedules:
                schedule.on_train_step_end(self, step, total, lr)

    def on_train_start(self) -> None:
        self._train_t0 = time.perf_counter()
        self._companion_step, self._schedules = int(self.global_step), None  # companions: fresh for every fit
        self._report_skipped_images()
        # Lightning restores a mid-epoch dataloader state only if the train loader is first built after the loops
        # are restored; the cosine schedule's estimated_stepping_batches builds it before, so the saved position
        # would be dropped. The loader is iterated lazily, so handing it the state here is still in time.
        loop = self.trainer.fit_loop
        if getattr(loop, "_combined_loader_states_to_load", None):
            loop._load_combined_loader_states()

    def _report_skipped_images(self) -> None:
        """Log (and put in ``self.report`` where a method keeps one) the images ``on_bad_image: skip`` left out."""
        from visadapt.data.base import skipped_images

        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            return
        sets = [getattr(dm, "train_set", None), getattr(dm, "val_set", None),
                *dict(getattr(dm, "test_sets", None) or {}).values()]
        skipped = skipped_images([s for s in sets if s is not None])
        if not skipped:
            return
        log.warning("on_bad_image=skip left %d unreadable image(s) out of the data, e.g. %s", len(skipped),
                    "; ".join(skipped[:3]))
        report = getattr(self, "report", None)
        if isinstance(report, dict):
            report["skipped_images"] = len(skipped)
            report["skipped_images_first"] = skipped[:5]

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        """Refuses checkpoints whose hyperparameters name classes to instantiate (a checkpoint must not decide what
        code runs): build the model from its config and resume with ``trainer.fit(..., ckpt_path=...)``."""
        ckpt = read_checkpoint(checkpoint_path)
        found = _find_class_paths(ckpt.get("hyper_parameters", {}))
        if found:
            raise UnsafeCheckpointError(
                f"{checkpoint_path}: its hyperparameters name classes to instantiate ({', '.join(found[:3])}); "
                "visadapt never builds a model from a checkpoint. Build it from the run's config.yaml and pass "
                "the checkpoint as ckpt_path")
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def adapter_buffer_keys(self) -> set[str]:
        """Persistent adapter buffers (fixed factors set from data, e.g. LoRA-SB's A and B): saved with the trained
        tensors and loaded when present, but not required, so checkpoints written before them still load."""
        return {n for n, _ in self.named_buffers() if is_adapter_param(n)} & set(self.state_dict())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.trainable_state_keys() | self.adapter_buffer_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["visadapt"] = self.run_record()
        checkpoint["visadapt"]["rng"] = capture_rng_states()
        checkpoint["visadapt"]["train_seconds"] = self.train_seconds()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        record = checkpoint.get("visadapt") or {}
        if "rng" in record:  # a resumed run draws the same shuffles, augmentations and dropout masks
            restore_rng_states(record["rng"])
        self.resumed_train_seconds = float(record.get("train_seconds", 0.0))
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
