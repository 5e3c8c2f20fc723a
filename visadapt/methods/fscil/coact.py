"""CoACT (Roy et al., TMLR 2025): consistency-guided asynchronous contrastive tuning for few-shot
class-incremental learning, as a LightningModule driven by
visadapt's session runner (:mod:`visadapt.protocols.fscil`); the baselines are in :mod:`.baselines`.

CoACT tunes a pretrained encoder once, in the base session, and then only adds classes:

1. **Asynchronous contrastive tuning (base session).** The student is the encoder with LoRA (r = 16, alpha = 16,
   dropout 0.1 on the attention query and value projections) and a bias-free linear classifier whose rows start as
   class means. The teacher is a copy of the encoder *without* LoRA, updated by an exponential moving average of
   the student's own (non-adapter) weights, ``theta_t <- m theta_t + (1 - m) theta_s`` with m = 0.999, at every
   training step and before it is used. The loss is ``CE(W h_s(x1), y) + SupCon({z_s(x1), z_t(x2)}, y)``: SupCon
   (Khosla et al. 2020, "all" mode, tau = 0.07) over the L2-normalised student embedding of view 1 and teacher
   embedding of view 2 (:func:`supcon_loss`). The teacher is under ``no_grad``.
2. **Controlled fine-tuning.** From epoch ``ft_start_epoch`` on, every encoder parameter from block
   ``ft_start_layer`` onward (final norm and pooler included; ``-1`` = all, embeddings included) also trains, at
   ``lr * encoder_lr_factor``. The teacher follows exactly these weights (the student's LoRA never reaches it; with
   nothing unfrozen it stays at the pretrained weights).
3. **Incremental sessions.** The classifier rows of the new classes become their class means (prototypes); then,
   for ``epochs_incremental`` epochs at ``lr * inc_lr_factor`` (constant), the parts named by ``incft_layers``
   (classifier and/or LoRA) train with ``CE + SupCon({z_s(x1), z_bt(x2), z_p(x2)}, y) + lambda MSE(logits,
   base logits)``, where ``z_bt`` is the frozen base-session teacher, ``z_p`` the original pretrained encoder and
   the base logits come from the frozen copy of the whole base-session model.

**Where this implementation deliberately differs from the official code** (``ShuvenduRoy/CoACT-FSCIL`` e11721c;
each is also listed in ``docs/fscil.md``):

* *No model selection on test data.* The official base session keeps the epoch with the best *test* accuracy; here
  the model after the last epoch is used.
* *Seeds are set.* The official ``--num_seeds`` runs are unseeded (``set_seed`` is never called); here every session
  is seeded from ``(seed, session)`` by the runner, so runs (and resumed runs) are reproducible.
* *Unseen classes are masked.* The official evaluation takes the argmax over all ``C_total`` classifier rows and its
  cross-entropy runs over all of them; here evaluation and cross-entropy use only the classes seen so far
  (``ce_over="all"`` restores the training behaviour). The consistency MSE compares all ``C_total`` logits, as the
  official code does (``consistency_over="base"`` compares only the base-class logits, the ones the base model was
  trained for).
* *Frozen references stay frozen.* In incremental sessions the official code runs the base model and the
  pretrained model through their training forward, which also EMA-updates their teachers; here the three reference
  networks are not updated. The current model's own teacher is not updated after the base session either (it is no
  longer used by any loss).
* *The EMA skips weights the student never changes* (for them the update is the identity up to rounding), and it
  skips the classifier (the teacher's classifier is unused).
* *Normalisation layers use their pretrained statistics* (BatchNorm in eval mode while training). This matters only
  for CNN encoders such as the EfficientNet-Lite0 CPU stand-in; a ViT has none.
* *Optimiser state does not carry across incremental sessions* (the official code keeps one SGD with its momentum
  buffers for all of them); each session is one ``Trainer.fit`` with a fresh optimiser, which makes sessions
  resumable.
* *Controlled fine-tuning under Lightning*: the weights it unfreezes are trainable (and in the optimiser) for the
  whole base session so that DDP registers them, but their gradients are dropped before ``ft_start_epoch`` and the
  teacher follows them only from that epoch: the same updates as unfreezing them at that epoch.
* Unknown details are options: ``num_views`` (the student sees views 1..V-1, the teacher view V), the loss weights,
  ``update_base_with_prototypes``.

The per-dataset hyperparameters of the official code (which silently override its command line) are written out in
``configs/paper/fscil/*.yaml``.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from visadapt.methods.fscil.base import CoACTSGD, FSCILModule, SessionInfo, restrict, views_of
from visadapt.methods.fscil.losses import supcon_loss
from visadapt.methods.fscil.registry import register_fscil_method

log = logging.getLogger(__name__)


@register_fscil_method("coact")
class CoACT(FSCILModule):
    """CoACT: asynchronous contrastive adapter tuning with an EMA teacher, controlled fine-tuning and
    consistency-guided incremental sessions (Roy et al., TMLR 2025). See the module docstring for the losses and
    the documented differences from the official code.

    Args:
        ema_momentum: Teacher EMA momentum m (0.999).
        temperature: SupCon temperature tau (0.07; the base temperature is the same).
        num_views: Augmented views per image; the student sees views 1..V-1, the teacher view V (2).
        ce_weight: Weight of the base-session cross-entropy.
        con_weight: Weight of the contrastive term (base and incremental sessions).
        epochs_base: Epochs of the base session.
        ft_start_layer: Controlled fine-tuning: first encoder block to unfreeze (``-1``: everything, embeddings
            included; ``None``: never).
        ft_start_epoch: Epoch of the base session at which those blocks unfreeze.
        encoder_lr_factor: Learning-rate factor of the unfrozen encoder weights.
        init_with_prototypes: Set the base rows to class means before base training (``start_training_with_
            prototypes``; on in the published commands).
        update_base_with_prototypes: Reset the base rows to class means after base training (off in CoACT).
        epochs_incremental: Epochs of consistency-guided tuning per incremental session (0 in the published FSCIL
            command: prototype-only sessions; 1 in several FSCIT settings).
        incft_layers: What trains in incremental sessions: ``classifier``, ``lora`` (the adapter) or
            ``classifier+lora``.
        inc_lr_factor: Incremental learning rate = ``lr * inc_lr_factor`` (constant).
        ce_weight_inc: Weight of the incremental cross-entropy.
        consistency_weight: Weight lambda of the logit MSE to the frozen base model.
        ce_over: Classes in the cross-entropy: ``seen`` (masked; default) or ``all`` rows (official).
        consistency_over: Logits compared by the MSE: ``all`` ``C_total`` rows (official; default) or the ``base``
            classes only.
        batch_size: Training batch size (64).
        eval_batch_size: Batch size of feature extraction (100).
        optimizer: Optimiser; its ``lr`` is CoACT's ``lr_base`` (default :class:`~visadapt.methods.fscil.base.CoACTSGD`:
            SGD, momentum 0.9, Nesterov, weight decay 5e-4, lr 0.1).
        lr_scheduler: Scheduler; ``None``: cosine over the base session's epochs (stepped per epoch), constant in
            incremental sessions.
    """

    def __init__(self, ema_momentum: float = 0.999, temperature: float = 0.07, num_views: int = 2,
                 ce_weight: float = 1.0, con_weight: float = 1.0, epochs_base: int = 25,
                 ft_start_layer: int | None = None, ft_start_epoch: int = 0, encoder_lr_factor: float = 0.1,
                 init_with_prototypes: bool = True, update_base_with_prototypes: bool = False,
                 epochs_incremental: int = 0,
                 incft_layers: Literal["classifier", "lora", "classifier+lora"] = "classifier+lora",
                 inc_lr_factor: float = 0.001, ce_weight_inc: float = 1.0, consistency_weight: float = 1.0,
                 ce_over: Literal["seen", "all"] = "seen", consistency_over: Literal["base", "all"] = "all",
                 batch_size: int = 64, eval_batch_size: int = 100, optimizer: OptimizerCallable = CoACTSGD,
                 lr_scheduler: LRSchedulerCallable | None = None) -> None:
        super().__init__(batch_size, eval_batch_size, optimizer, lr_scheduler)
        if num_views < 2:
            raise ValueError(f"num_views must be >= 2 (student and teacher views), got {num_views}")
        if not 0.0 <= ema_momentum <= 1.0:
            raise ValueError(f"ema_momentum must be in [0, 1], got {ema_momentum}")
        if incft_layers not in ("classifier", "lora", "classifier+lora"):
            raise ValueError(f"incft_layers must be classifier, lora or classifier+lora, got {incft_layers!r}")
        self.ema_momentum, self.temperature, self.num_views = ema_momentum, temperature, num_views
        self.ce_weight, self.con_weight, self.epochs_base = ce_weight, con_weight, epochs_base
        self.ft_start_layer, self.ft_start_epoch, self.encoder_lr_factor = ft_start_layer, ft_start_epoch, \
            encoder_lr_factor
        self.init_with_prototypes, self.update_base_with_prototypes = init_with_prototypes, \
            update_base_with_prototypes
        self.epochs_incremental, self.incft_layers, self.inc_lr_factor = epochs_incremental, incft_layers, \
            inc_lr_factor
        self.ce_weight_inc, self.consistency_weight = ce_weight_inc, consistency_weight
        self.ce_over, self.consistency_over = ce_over, consistency_over
        self._ema_active: list[tuple[Tensor, nn.Parameter]] = []

    # -- building ---------------------------------------------------------------------------------------------
    def before_adapter(self, net: nn.Module) -> None:
        # the teacher (and the pretrained reference) are copies of the encoder *before* the adapter exists
        self._plain_names = {id(p): n for n, p in net.named_parameters()}
        self.teacher = copy.deepcopy(net).requires_grad_(False).eval()
        if self.epochs_incremental > 0 and self.con_weight > 0:
            self.pretrained = copy.deepcopy(net).requires_grad_(False).eval()

    def after_build(self) -> None:
        # EMA pairs by parameter identity: the adapter library keeps the wrapped base weights as the same Parameter
        # objects (renamed ...base_layer.weight), so the teacher's names are the pre-injection ones.
        teacher_params = dict(self.teacher.named_parameters())
        self.ema_pairs: list[tuple[str, str, nn.Parameter, nn.Parameter]] = []
        for name, p in self.encoder.named_parameters():
            if id(p) in self._plain_names:
                plain = self._plain_names[id(p)]
                self.ema_pairs.append((name, plain, teacher_params[plain], p))
        lost = sorted(set(self._plain_names.values()) - {plain for _, plain, _, _ in self.ema_pairs})
        if lost:
            raise RuntimeError(f"adapter injection replaced encoder weights {lost[:3]}; cannot pair them with the "
                               "teacher for the EMA update")

    def ft_params(self) -> list[tuple[str, str, nn.Parameter, nn.Parameter]]:
        """EMA pairs ``(name, plain name, teacher weight, student weight)`` unfrozen by controlled fine-tuning:
        every encoder parameter from the first one of block ``ft_start_layer`` onward in registration order (final
        norm / pooler included), or all with -1."""
        if self.ft_start_layer is None:
            return []
        out, on = [], self.ft_start_layer == -1
        pattern = re.compile(self.block_pattern)
        for pair in self.ema_pairs:
            m = pattern.search(pair[1])
            if not on and m is not None and int(m.group(1)) >= self.ft_start_layer:
                on = True
            if on:
                out.append(pair)
        if not out:
            raise ValueError(f"ft_start_layer={self.ft_start_layer} selects no encoder weight (block pattern "
                             f"{self.block_pattern!r})")
        return out

    # -- sessions ---------------------------------------------------------------------------------------------
    def session_epochs(self, session: int) -> int:
        return self.epochs_base if session == 0 else self.epochs_incremental

    def prepare_session(self, info: SessionInfo, prototypes: Iterable[dict[str, Any]]) -> None:
        if info.session > 0 or self.init_with_prototypes:
            self.set_prototypes(prototypes, info.new_classes)
        if self.session_epochs(info.session) <= 0:
            return
        for p in self._trainable():
            p.requires_grad_(True)
        if info.session == 0:
            for _, _, _, p in self.ft_params():  # trainable from the start (DDP registers them); see the docstring
                p.requires_grad_(True)

    def _trainable(self) -> list[nn.Parameter]:
        if self.info.session == 0:
            return self.adapter_parameters() + [self.classifier.weight]
        out = [self.classifier.weight] if "classifier" in self.incft_layers else []
        return out + (self.adapter_parameters() if "lora" in self.incft_layers else [])

    def extra_state_keys(self) -> set[str]:
        if self.info is None or self.info.session != 0 or self.epochs_base <= 0:
            return set()
        return {f"teacher.{plain}" for _, plain, _, _ in self.ft_params()}  # the EMA-updated teacher weights

    def session_param_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        if self.info.session == 0:
            return [(self._trainable(), 1.0), ([p for *_, p in self.ft_params()], self.encoder_lr_factor)]
        return [(self._trainable(), self.inc_lr_factor)]

    def cosine_schedule(self) -> bool:
        return self.info.session == 0

    def finish_session(self) -> None:
        super().finish_session()
        if self.info.session == 0 and self.update_base_with_prototypes:
            self.set_prototypes(self._prototypes, self.info.new_classes)

    def end_session(self, session: int) -> None:
        if session == 0 and self.epochs_incremental > 0:
            # frozen copies of the base-session model (encoder with adapter, classifier) and of its teacher
            self.base_encoder = copy.deepcopy(self.encoder).requires_grad_(False).eval()
            self.base_classifier = copy.deepcopy(self.classifier).requires_grad_(False)
            self.base_teacher = copy.deepcopy(self.teacher).requires_grad_(False).eval()

    # -- the EMA teacher (a module hook) and controlled fine-tuning --------------------------------------------
    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._ema_active = []
        if self.info.session == 0 and self.current_epoch >= self.ft_start_epoch:
            ft = self.ft_params()
            self._ema_active = [(t, s) for _, _, t, s in ft]
            if ft and self.current_epoch == self.ft_start_epoch:
                log.info(f"coact: controlled fine-tuning unfreezes {len(ft)} encoder tensors "
                         f"({sum(p.numel() for *_, p in ft):,} weights) at epoch {self.current_epoch}")

    @torch.no_grad()
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """EMA step ``t <- m t + (1 - m) s`` on the unfrozen weights, before the teacher's forward of this step."""
        m = self.ema_momentum
        for t, s in self._ema_active:
            t.mul_(m).add_(s.detach(), alpha=1.0 - m)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.info.session == 0 and self.current_epoch < self.ft_start_epoch:
            for *_, p in self.ft_params():  # not unfrozen yet: no update (SGD skips a None gradient)
                p.grad = None

    # -- losses -----------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        views, y = views_of(batch["image"]), batch["label"]
        if len(views) < 2:
            raise ValueError(f"coact needs {self.num_views} views per image, got {len(views)}")
        n_student = len(views) - 1
        feats = self.encoder(torch.cat(views[:-1]))
        logits = self.classifier(feats)[: len(y)]
        z_s = F.normalize(feats, dim=-1)
        ce_classes = self.info.seen_classes if self.ce_over == "seen" else None
        ce = F.cross_entropy(restrict(logits, ce_classes), y)
        with torch.no_grad():
            if self.info.session == 0:
                refs = [F.normalize(self.teacher(views[-1]), dim=-1)]
            else:
                base_logits = self.base_classifier(self.base_encoder(views[0]))
                refs = [F.normalize(self.base_teacher(views[-1]), dim=-1)]
                if getattr(self, "pretrained", None) is not None:
                    refs.append(F.normalize(self.pretrained(views[-1]), dim=-1))
        con = supcon_loss(torch.cat([z_s, *refs]), y.repeat(n_student + len(refs)), self.temperature)
        if self.info.session == 0:
            loss = self.ce_weight * ce + self.con_weight * con
            self.accumulate(len(y), loss=loss, ce=ce, supcon=con)
            return loss
        cons_classes = self.info.base_classes if self.consistency_over == "base" else None
        cons = F.mse_loss(restrict(logits, cons_classes), restrict(base_logits, cons_classes))
        loss = self.ce_weight_inc * ce + self.con_weight * con + self.consistency_weight * cons
        self.accumulate(len(y), loss=loss, ce=ce, supcon=con, consistency=cons)
        return loss


__all__ = ["CoACT"]
