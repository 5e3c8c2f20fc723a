"""What the FSCIL methods share: the model settings, the classifier head and :class:`FSCILModule`.

A method is a LightningModule that the session runner (:mod:`visadapt.protocols.fscil`) drives through the
sessions. Per session the runner calls :meth:`FSCILModule.start_session` (class-mean rows, which parameters train),
then one ``Trainer.fit`` when :meth:`FSCILModule.session_epochs` is positive, then
:meth:`FSCILModule.finish_session` and :meth:`FSCILModule.end_session`, evaluates with :meth:`FSCILModule.encode` +
:meth:`FSCILModule.classify`, and saves :meth:`FSCILModule.session_state`. Resuming replays
:meth:`FSCILModule.load_session_state` + :meth:`FSCILModule.end_session` for every finished session.

The encoder comes from the backbones registry (``model.backbone``); the adapter is any registered
:class:`~visadapt.adapters.AdapterConfig` whose ``target`` may name a preset of that backbone (``attn_qv``,
``conv_1x1_late``, ...). Optimisers are injected (``optimizer``); the built-in schedule is cosine over the session's
epochs (stepped per epoch) or constant, as each method documents. Every training epoch is seeded from
``(seed, session, epoch)`` alone, so that resuming from Lightning's ``last.ckpt`` at an epoch boundary continues
bit-identically.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import seed_everything
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from visadapt.adapters import AdapterConfig, inject, is_adapter_param
from visadapt.data.sessions import derive_seed
from visadapt.methods.base import AdapterModule

log = logging.getLogger(__name__)


@dataclass
class FSCILModel:
    """The pretrained encoder every method starts from, its adapter and the form of the classifier."""

    backbone: str = "effnet_lite0"
    """Registered image-encoder backbone (``python -m visadapt list backbones``): ``effnet_lite0``, ``timm``,
    ``hf_vit`` (``backbone_kwargs: {model_dir: ..., pooling: pooler}`` gives CoACT's pooler feature), ``tiny_vit``."""
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the backbone builder."""
    adapter: AdapterConfig | None = None
    """Adapter of the methods that tune the encoder (any registered variant); its ``target`` may name a preset of
    the backbone (``attn_qv``, ``conv_1x1_late``, ...) or be a regular expression."""
    head: Literal["dot", "cosine"] = "dot"
    """Classifier logits: ``dot`` products ``W h`` (CoACT) or ``cosine`` (scale x cosine; for encoders with unbounded
    features such as the EfficientNet-Lite0 CPU stand-in)."""
    head_scale: float = 16.0
    """Scale of cosine logits."""
    block_pattern: str | None = None
    """Regular expression with one group capturing the block index in a parameter name (controlled fine-tuning);
    ``None``: the backbone's."""


class ClassifierHead(nn.Module):
    """Bias-free linear classifier with rows for every class of the run (``weight`` is ``(C, D)``).

    ``dot``: logits ``W h``. ``cosine``: ``scale * cos(W_c, h)``. Rows start as ``nn.Linear``'s default
    initialisation; the methods overwrite them with class means.
    """

    def __init__(self, feature_dim: int, num_classes: int, head: str = "dot", scale: float = 16.0) -> None:
        super().__init__()
        if head not in ("dot", "cosine"):
            raise ValueError(f"head must be 'dot' or 'cosine', got {head!r}")
        self.weight = nn.Parameter(torch.empty(num_classes, feature_dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's initialisation
        self.head, self.scale = head, scale

    def forward(self, feats: Tensor) -> Tensor:
        if self.head == "cosine":
            return self.scale * F.normalize(feats, dim=-1) @ F.normalize(self.weight, dim=-1).T
        return feats @ self.weight.T


class CoACTSGD(torch.optim.SGD):
    """SGD as CoACT trains: momentum 0.9, Nesterov, weight decay 5e-4 (the learning rate is ``lr``).

    Args:
        params: Parameter groups (the methods give each group its ``lr`` factor).
        lr: Base learning rate.
        momentum: Momentum.
        nesterov: Nesterov momentum.
        weight_decay: L2 weight decay.
    """

    def __init__(self, params: Iterable, lr: float = 0.1, momentum: float = 0.9, nesterov: bool = True,
                 weight_decay: float = 5e-4) -> None:
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0,
                         weight_decay=weight_decay)


@dataclass
class SessionInfo:
    """What a method is told about the session it starts."""

    session: int
    new_classes: list[int]
    """Session-order labels introduced in this session."""
    seen_classes: int
    """Classes seen after this session (labels ``0 .. seen_classes-1``)."""
    base_classes: int
    seed: int
    """Run seed; every epoch is seeded from ``(seed, session, epoch)``."""


def restrict(logits: Tensor, num: int | None) -> Tensor:
    """The first ``num`` columns (the seen classes), or all of them for ``None``."""
    return logits if num is None else logits[:, :num]


def views_of(images: Any) -> list[Tensor]:
    """A batch's ``image`` field as a list of views (one tensor = one view)."""
    return [images] if isinstance(images, Tensor) else list(images)


class FSCILModule(AdapterModule):
    """Base class of the FSCIL methods (not used directly).

    Args:
        batch_size: Training batch size.
        eval_batch_size: Batch size of feature extraction (class means, evaluation).
        optimizer: Optimiser over the session's trainable parameters (default: :class:`CoACTSGD`).
        lr_scheduler: Scheduler; ``None`` uses the method's built-in schedule.
    """

    uses_adapter: bool = True
    """Whether the method puts ``model.adapter`` into the encoder."""

    def __init__(self, batch_size: int = 64, eval_batch_size: int = 100, optimizer: OptimizerCallable = CoACTSGD,
                 lr_scheduler: LRSchedulerCallable | None = None) -> None:
        super().__init__(optimizer, lr_scheduler, schedule="constant")
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_views = 1
        self.info: SessionInfo | None = None
        self.train_log: dict[str, Any] = {}
        self._changed: set[str] = set()
        self._encoder_version = 0
        self._built = False

    # -- building ---------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return getattr(type(self), "registered_name", type(self).__name__)

    def build(self, model: FSCILModel, num_classes: int) -> None:
        """Build the encoder from the backbones registry, inject the adapter, add the classifier (once)."""
        if self._built:
            return
        from visadapt.backbones import build_backbone

        bb = build_backbone(model.backbone, **model.backbone_kwargs)
        net = bb.model.eval().requires_grad_(False)
        self.backbone_identity, self.preprocess = bb.identity, bb.preprocess
        self.block_pattern = model.block_pattern or bb.extra.get("block_pattern") or r"blocks\.(\d+)\."
        dim = bb.extra.get("feature_dim") or getattr(net, "feature_dim", None)
        if dim is None:
            raise ValueError(f"backbone {model.backbone!r} does not say its feature_dim; it is not an image encoder")
        self.before_adapter(net)
        self.injection = None
        if self.uses_adapter:
            if model.adapter is None:
                raise ValueError(f"{self.name} tunes an adapter: set model.adapter (e.g. a LoRAConfig with target "
                                 f"one of {sorted(bb.target_presets)} or a regular expression)")
            self.injection = inject(net, replace(model.adapter, target=bb.resolve_target(model.adapter.target)),
                                    verbose=False)
        self.encoder = net
        self.classifier = ClassifierHead(int(dim), num_classes, model.head, model.head_scale)
        self.requires_grad_(False)
        self.after_build()
        self._built = True

    def before_adapter(self, net: nn.Module) -> None:
        """Called with the pretrained encoder before the adapter is injected (CoACT copies its teacher here)."""

    def after_build(self) -> None:
        """Called once everything is built."""

    def configure_model(self) -> None:
        if not self._built:
            raise RuntimeError(f"{self.name}: build(model, num_classes) must be called before training")

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.encoder.named_parameters() if is_adapter_param(n)]

    # -- train mode -------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> FSCILModule:
        """As :meth:`AdapterModule.train`, and BatchNorm layers always use their pretrained running statistics
        (small few-shot batches would corrupt them; a ViT has none)."""
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    # -- features ---------------------------------------------------------------------------------------------
    @property
    def encoder_version(self) -> int:
        """Changes whenever the encoder's weights may have changed (the runner caches test features per version)."""
        return self._encoder_version

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        self.eval()
        return self.encoder(images.to(self.device))

    @torch.no_grad()
    def classify(self, features: Tensor) -> Tensor:
        return self.classifier(features.to(self.device))

    @torch.no_grad()
    def set_prototypes(self, loader: Iterable[dict[str, Any]], classes: list[int]) -> None:
        """Classifier row of each class in ``classes`` := mean feature of its training images (eval transform)."""
        feats, labels = [], []
        for batch in loader:
            feats.append(self.encode(views_of(batch["image"])[0]))
            labels.append(torch.as_tensor(batch["label"]).to(self.device))
        f, y = torch.cat(feats), torch.cat(labels)
        w = self.classifier.weight
        for c in classes:
            sel = y == c
            if not bool(sel.any()):
                raise ValueError(f"no training image of class {c} for its class mean")
            w[c] = f[sel].mean(0)
        self._changed.add("classifier.weight")

    # -- the session protocol ---------------------------------------------------------------------------------
    def start_session(self, info: SessionInfo, prototypes: Iterable[dict[str, Any]]) -> int:
        """Prepare ``info.session``: class-mean rows, which parameters train. Returns its number of epochs."""
        self.info = info
        self.train_log = {}
        self._changed = {"classifier.weight"}
        self.requires_grad_(False)
        self._prototypes = prototypes
        self.prepare_session(info, prototypes)
        for key, p in self.named_parameters():
            if p.requires_grad:
                self._changed.add(key)
        self._changed |= self.extra_state_keys()
        return self.session_epochs(info.session)

    def prepare_session(self, info: SessionInfo, prototypes: Iterable[dict[str, Any]]) -> None:
        """Set class means and ``requires_grad`` for the session (to implement)."""
        raise NotImplementedError

    def session_epochs(self, session: int) -> int:
        """Training epochs of ``session`` (0: no ``Trainer.fit``)."""
        return 0

    def finish_session(self) -> None:
        """Called after the session's training (not when a finished session is replayed)."""
        if any(p.requires_grad for p in self.encoder.parameters()):
            self._encoder_version += 1
        self.requires_grad_(False)

    def end_session(self, session: int) -> None:
        """Called after training a session and after loading its saved state (e.g. to snapshot a base model)."""

    def session_state(self) -> dict[str, Tensor]:
        """Every tensor that may have changed during the last session, keyed by its state-dict name."""
        return {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items() if k in self._changed}

    @torch.no_grad()
    def load_session_state(self, session: int, state: dict[str, Tensor]) -> None:
        """Copy a saved :meth:`session_state` back (strict: every key must exist with the same shape)."""
        targets = self.state_dict(keep_vars=True)
        for key, value in state.items():
            if key not in targets:
                raise KeyError(f"saved state of session {session} has {key!r}, which {self.name} does not have")
            if tuple(targets[key].shape) != tuple(value.shape):
                raise ValueError(f"saved state of session {session}: {key} has shape {tuple(value.shape)}, the "
                                 f"model expects {tuple(targets[key].shape)}")
            targets[key].data.copy_(value.to(targets[key].device, targets[key].dtype))
        self._encoder_version += 1
        self.end_session(session)

    # -- optimisation -----------------------------------------------------------------------------------------
    def session_param_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        """``(parameters, learning-rate factor)`` of the session (to implement)."""
        raise NotImplementedError

    def cosine_schedule(self) -> bool:
        """Whether the built-in schedule of this session is cosine over its epochs (else constant)."""
        return False

    def configure_optimizers(self) -> Any:
        groups = [(ps, f) for ps, f in self.session_param_groups() if ps]
        if not groups:
            raise RuntimeError(f"{self.name} has nothing to train in session {self.info.session}")
        optimizer = self.optimizer_fn([{"params": ps} for ps, _ in groups])
        for group, (_, factor) in zip(optimizer.param_groups, groups):
            group["lr"] = group["lr"] * factor
            group["initial_lr"] = group["lr"]
        if self.lr_scheduler_fn is not None:
            return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_fn(optimizer)}
        if not self.cosine_schedule():
            return optimizer
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, int(self.trainer.max_epochs)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    # -- epochs: seeding and the training log -----------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        seed_everything(derive_seed(self.info.seed, "epoch", self.info.session, self.current_epoch), verbose=False)
        self._sums: dict[str, float] = {}
        self._steps = 0

    def accumulate(self, batch_size: int, **terms: Tensor) -> None:
        """Add the step's loss terms to the epoch means and the logger."""
        for k, v in terms.items():
            value = float(v.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"{self.name}: {k} is {value} in session {self.info.session} epoch "
                                         f"{self.current_epoch}")
            self._sums[k] = self._sums.get(k, 0.0) + value
        self._steps += 1
        self.log_dict({f"train_{k}": v.detach() for k, v in terms.items()}, prog_bar=False, batch_size=batch_size)

    def on_train_epoch_end(self) -> None:
        means = {k: v / max(self._steps, 1) for k, v in self._sums.items()}
        self.train_log[f"epoch{self.current_epoch}"] = means
        terms = ", ".join(f"{k} {v:.4f}" for k, v in means.items())
        log.info(f"{self.name} session {self.info.session} epoch {self.current_epoch + 1}/{self.trainer.max_epochs}: "
                 f"{terms}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["fscil"] = {"session": self.info.session, "train_log": copy.deepcopy(self.train_log)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("fscil", {})
        if saved.get("session") != self.info.session:
            raise ValueError(f"checkpoint is of session {saved.get('session')}, not of session {self.info.session}")
        self.train_log = copy.deepcopy(saved.get("train_log", {}))


__all__ = ["ClassifierHead", "CoACTSGD", "FSCILModel", "FSCILModule", "SessionInfo", "restrict", "views_of"]
