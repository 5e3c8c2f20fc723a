"""CoACT (Roy et al., TMLR 2025): consistency-guided asynchronous contrastive tuning for few-shot
class-incremental learning, plus the two baselines it is compared with in visadapt's session runner.

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

Baselines (same encoder, same classifier form): :class:`FrozenClassMean` (no training; every class's row is its
class mean) and :class:`NaiveLoRAFinetune` (the same LoRA trained with plain cross-entropy in *every* session,
which shows forgetting).

**Where this implementation deliberately differs from the official code** (``ShuvenduRoy/CoACT-FSCIL`` e11721c;
each is also listed in ``docs/fscil.md``):

* *No model selection on test data.* The official base session keeps the epoch with the best *test* accuracy; here
  the model after the last epoch is used.
* *Seeds are set.* The official ``--num_seeds`` runs are unseeded (``set_seed`` is never called); here every session
  is seeded from ``(seed, session)`` by the runner, so runs (and resumed runs) are reproducible.
* *Unseen classes are masked.* The official evaluation takes the argmax over all ``C_total`` classifier rows and its
  cross-entropy runs over all of them; here evaluation and cross-entropy use only the classes seen so far
  (``ce_over="all"`` restores the training behaviour), and the consistency MSE compares only the base-class logits,
  the ones the base model was trained for (``consistency_over="all"`` compares all ``C_total`` logits as the official
  code does, including rows the base model never learned).
* *Frozen references stay frozen.* In incremental sessions the official code runs the base model and the
  pretrained model through their training forward, which also EMA-updates their teachers; here the three reference
  networks are not updated. The current model's own teacher is not updated after the base session either (it is no
  longer used by any loss).
* *The EMA skips weights the student never changes* (for them the update is the identity up to rounding), and it
  skips the classifier (the teacher's classifier is unused).
* *Normalisation layers use their pretrained statistics* (BatchNorm in eval mode while training). This matters only
  for CNN encoders such as the EfficientNet-Lite0 CPU stand-in; a ViT has none.
* *Optimiser state does not carry across incremental sessions* (the official code keeps one SGD with its momentum
  buffers for all of them); each session starts a fresh optimiser, which makes sessions resumable.
* Unknown details are options: ``num_views`` (the student sees views 1..V-1, the teacher view V), the loss weights,
  ``update_base_with_prototypes``.

The per-dataset hyperparameters of the official code (which silently override its command line) are written out in
``configs/paper/fscil/*.yaml``.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from visadapt.backbones.base import Preprocess

# ---------------------------------------------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------------------------------------------
TIMM_PRESETS = {
    "qv": r"blocks\.\d+\.attn\.qkv[q,v]",
    "qkv": r"blocks\.\d+\.attn\.qkv[q,k,v]",
}
TIMM_BLOCKS = r"blocks\.(\d+)\."
# transformers < 5 names the projections encoder.layer.N.attention.attention.{query,value}; 5.x layers.N.attention.
# {q,v}_proj. The presets accept both.
HF_VIT_PRESETS = {
    "qv": r"(encoder\.layer|layers)\.\d+\.attention\.(attention\.(query|value)|q_proj|v_proj)",
    "qv_blocks_0_5": r"(encoder\.layer|layers)\.[0-5]\.attention\.(attention\.(query|value)|q_proj|v_proj)",
}
HF_VIT_BLOCKS = r"(?:encoder\.layer|layers)\.(\d+)\."


@dataclass
class EncoderSpec:
    """Which pretrained image encoder to build, and where its adapters and blocks are."""

    source: Literal["registry", "timm", "hf_vit"] = "registry"
    """``registry``: a backbone registered in visadapt (``effnet_lite0``, ...) whose model maps images to features;
    ``timm``: ``timm.create_model(name, num_classes=0, **kwargs)`` (random init, or ``kwargs.checkpoint`` = a local
    weights file); ``hf_vit``: a transformers ``ViTModel`` from ``kwargs.path`` (a local folder, e.g.
    google/vit-base-patch16-224-in21k saved offline) or from ``kwargs.config`` (random init); its feature is the
    pooler output, tanh(dense(CLS)), as in CoACT."""
    name: str = "effnet_lite0"
    """Registered backbone name or timm model name (ignored for ``hf_vit``)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Builder keyword arguments."""
    lora_target: str = "qv"
    """Adapter target: a preset name of the encoder (``qv`` for ViTs, ``conv_1x1`` for EfficientNet-Lite0) or a
    regular expression matched in full against module names of the encoder network."""
    block_pattern: str | None = None
    """Regular expression with one group capturing the block index of a parameter name, used by controlled
    fine-tuning; default: the encoder family's (``blocks\\.(\\d+)\\.`` for timm)."""


class FeatureEncoder(nn.Module):
    """An image network plus how to read its feature: ``forward(images) -> (B, feature_dim)``.

    Adapters are injected into ``net`` and the target / block patterns refer to ``net``'s module names.
    """

    def __init__(self, net: nn.Module, kind: str, feature_dim: int, preprocess: Preprocess,
                 target_presets: dict[str, str], block_pattern: str, identity: str) -> None:
        super().__init__()
        self.net = net
        self.kind = kind
        self.feature_dim = feature_dim
        self.preprocess = preprocess
        self.target_presets = dict(target_presets)
        self.block_pattern = block_pattern
        self.identity = identity

    def forward(self, images: Tensor) -> Tensor:
        if self.kind == "hf_vit":
            return self.net(pixel_values=images).pooler_output
        return self.net(images)

    def resolve_target(self, target: str) -> str:
        return self.target_presets.get(target, target)


def _load_state_file(path: str | Path) -> dict[str, Tensor]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def build_encoder(spec: EncoderSpec) -> FeatureEncoder:
    """Build the encoder described by ``spec`` (never downloads; local files only)."""
    kwargs = dict(spec.kwargs)
    if spec.source == "timm":
        import timm

        checkpoint = kwargs.pop("checkpoint", None)
        net = timm.create_model(spec.name, pretrained=False, num_classes=0, **kwargs)
        identity = f"timm:{spec.name}:random"
        if checkpoint is not None:
            missing, _ = net.load_state_dict(_load_state_file(checkpoint), strict=False)
            missing = [k for k in missing if not k.startswith("head")]
            if missing:
                raise ValueError(f"{checkpoint} lacks {len(missing)} weights of timm {spec.name}, e.g. {missing[:3]}")
            identity = f"timm:{spec.name}:{Path(checkpoint).name}"
        cfg = getattr(net, "pretrained_cfg", {}) or {}
        size = kwargs.get("img_size", (cfg.get("input_size") or (3, 224, 224))[-1])
        pre = Preprocess(image_size=int(size), mean=tuple(cfg.get("mean", (0.5, 0.5, 0.5))),
                         std=tuple(cfg.get("std", (0.5, 0.5, 0.5))), interpolation="bicubic")
        return FeatureEncoder(net.eval(), "timm", int(net.num_features), pre, TIMM_PRESETS,
                              spec.block_pattern or TIMM_BLOCKS, identity)
    if spec.source == "hf_vit":
        from transformers import ViTConfig, ViTModel

        path, config = kwargs.pop("path", None), kwargs.pop("config", None)
        if (path is None) == (config is None):
            raise ValueError("hf_vit needs exactly one of kwargs.path (a local model folder) or kwargs.config")
        mean = std = (0.5, 0.5, 0.5)  # ViTImageProcessor of vit-base-patch16-224-in21k
        if path is not None:
            folder = Path(path).expanduser()
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(f"{folder} is not a Hugging Face model folder (no config.json); save "
                                        "google/vit-base-patch16-224-in21k there with save_pretrained() first")
            net = ViTModel.from_pretrained(str(folder), local_files_only=True, add_pooling_layer=True, **kwargs)
            proc = folder / "preprocessor_config.json"
            if proc.is_file():
                data = json.loads(proc.read_text())
                mean, std = tuple(data.get("image_mean", mean)), tuple(data.get("image_std", std))
            identity = f"hf_vit:{folder.name}"
        else:
            net = ViTModel(ViTConfig(**config), add_pooling_layer=True)
            identity = "hf_vit:random"
        pre = Preprocess(image_size=int(net.config.image_size), mean=mean, std=std, interpolation="bilinear")
        return FeatureEncoder(net.eval(), "hf_vit", int(net.config.hidden_size), pre, HF_VIT_PRESETS,
                              spec.block_pattern or HF_VIT_BLOCKS, identity)
    if spec.source == "registry":
        from visadapt.backbones import build_backbone

        bb = build_backbone(spec.name, **kwargs)
        dim = getattr(bb.model, "feature_dim", None) or bb.extra.get("feature_dim")
        if dim is None:
            with torch.no_grad():
                size = bb.preprocess.image_size
                dim = bb.model.eval()(torch.zeros(1, 3, size, size)).shape[-1]
        pattern = spec.block_pattern or bb.extra.get("block_pattern") or TIMM_BLOCKS
        return FeatureEncoder(bb.model.eval(), "call", int(dim), bb.preprocess, bb.target_presets, pattern,
                              bb.identity)
    raise ValueError(f"encoder source must be registry, timm or hf_vit, got {spec.source!r}")


# ---------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------
def supcon_loss(features: Tensor, labels: Tensor, temperature: float = 0.07,
                base_temperature: float | None = None) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, Eq. 2, "all" mode) over a set of embeddings.

    Every row of ``features`` (L2-normalised, ``(N, D)``; views of one image are separate rows with the same label)
    is an anchor ``i``. With ``P(i)`` the other rows of the same label and ``A(i)`` all other rows::

        L = -(tau / tau_base) * 1/N * sum_i 1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p / tau)
                                                                          / sum_{a in A(i)} exp(z_i.z_a / tau) )

    An anchor without positives contributes 0 but still counts in ``N`` (as in the CoACT / SupContrast code).
    Rows computed without gradient (teacher embeddings) act as anchors and contrasts all the same.
    """
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"features must be (N, D) with N labels, got {tuple(features.shape)} and "
                         f"{tuple(labels.shape)}")
    base_temperature = temperature if base_temperature is None else base_temperature
    n = features.shape[0]
    sim = features @ features.T / temperature
    sim = sim - sim.max(dim=1, keepdim=True).values.detach()  # numerical stability; cancels in the log-ratio
    not_self = ~torch.eye(n, dtype=torch.bool, device=features.device)
    positives = (labels[:, None] == labels[None, :]) & not_self
    log_denominator = torch.logsumexp(sim.masked_fill(~not_self, float("-inf")), dim=1, keepdim=True)
    log_prob = sim - log_denominator
    num_pos = positives.sum(1)
    mean_log_prob_pos = (log_prob * positives).sum(1) / num_pos.clamp(min=1)
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()


# ---------------------------------------------------------------------------------------------------------------
# Shared machinery
# ---------------------------------------------------------------------------------------------------------------
class ClassifierModel(nn.Module):
    """Encoder + bias-free linear classifier with rows for every class of the run.

    ``head="dot"``: logits are dot products ``W h`` (CoACT). ``head="cosine"``: ``scale * cos(W_c, h)``, for
    encoders whose features are unbounded (the EfficientNet-Lite0 CPU stand-in: its pooled ReLU6 features give
    dot-product logits in the hundreds, whereas CoACT's ViT pooler output is tanh-bounded).
    """

    def __init__(self, encoder: FeatureEncoder, num_classes: int, head: str = "dot", scale: float = 16.0) -> None:
        super().__init__()
        if head not in ("dot", "cosine"):
            raise ValueError(f"head must be 'dot' or 'cosine', got {head!r}")
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.feature_dim, num_classes, bias=False)
        self.head, self.scale = head, scale

    def logits(self, feats: Tensor) -> Tensor:
        if self.head == "cosine":
            return self.scale * F.normalize(feats, dim=-1) @ F.normalize(self.classifier.weight, dim=-1).T
        return self.classifier(feats)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(features, logits)``."""
        feats = self.encoder(images)
        return feats, self.logits(feats)


def train_mode(module: nn.Module) -> None:
    """``module.train()`` but with every BatchNorm kept in eval mode (pretrained running statistics)."""
    module.train()
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


@dataclass
class SessionData:
    """What the runner hands a method for one session."""

    session: int
    train: Dataset
    """The session's training images; ``image`` is a list of ``num_views`` augmented views."""
    prototypes: Dataset
    """The same images under the evaluation transform (for class means)."""
    new_classes: list[int]
    """Session-order labels introduced in this session."""
    seen_classes: int
    """Classes seen after this session (labels ``0 .. seen_classes-1``)."""
    base_classes: int
    generator: torch.Generator
    """Seeded generator for the data order."""
    progress: Callable[[str], None] = print
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def _views(batch_images: Any, device: torch.device) -> list[Tensor]:
    if isinstance(batch_images, Tensor):
        return [batch_images.to(device)]
    return [v.to(device) for v in batch_images]


def _loader(ds: Dataset, batch_size: int, shuffle: bool, generator: torch.Generator | None = None,
            drop_last: bool = False) -> DataLoader:
    from visadapt.data.base import collate

    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=0,
                      collate_fn=collate, drop_last=drop_last)


class FSCILMethod:
    """Base class of the methods the session runner drives.

    A method is built from hyperparameters only (cheap; this is what the config instantiates); :meth:`setup` builds
    its networks. The runner then calls, for each session, :meth:`train_session`, evaluates with
    :meth:`encode` + :meth:`classify`, and saves :meth:`session_state`. To resume, it calls :meth:`setup` and then
    :meth:`load_session_state` for every finished session in order, which must leave the method exactly as
    training did.
    """

    name: str = "method"

    def __init__(self, batch_size: int = 64, eval_batch_size: int = 100) -> None:
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.device = torch.device("cpu")
        self._changed: set[str] = set()
        self._encoder_version = 0

    # -- to implement ---------------------------------------------------------------------------------------
    def setup(self, encoder: FeatureEncoder, num_classes: int, device: torch.device, lora_target: str = "qv") -> None:
        """Build the networks around ``encoder`` (which the method may modify); ``lora_target`` is the encoder
        spec's default adapter target."""
        raise NotImplementedError

    def train_session(self, data: SessionData) -> dict[str, Any]:
        raise NotImplementedError

    def modules_to_save(self) -> dict[str, nn.Module]:
        """Prefix -> module whose changed tensors make up the saved state."""
        raise NotImplementedError

    def end_session(self, session: int) -> None:
        """Called after training a session and after loading its saved state (e.g. to snapshot a base model)."""

    # -- shared ---------------------------------------------------------------------------------------------
    @property
    def model(self) -> ClassifierModel:
        return self.student

    @property
    def encoder_version(self) -> int:
        """Changes whenever the encoder's weights may have changed (the runner caches test features per version)."""
        return self._encoder_version

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        self.student.eval()
        return self.student.encoder(images.to(self.device))

    @torch.no_grad()
    def classify(self, features: Tensor) -> Tensor:
        return self.student.logits(features.to(self.device))

    @torch.no_grad()
    def set_prototypes(self, data: SessionData, classes: list[int]) -> None:
        """Classifier row of each class in ``classes`` := mean feature of its training images (eval transform)."""
        feats, labels = [], []
        for batch in _loader(data.prototypes, self.eval_batch_size, shuffle=False):
            feats.append(self.encode(_views(batch["image"], self.device)[0]))
            labels.append(batch["label"].to(self.device))
        f, y = torch.cat(feats), torch.cat(labels)
        w = self.student.classifier.weight
        for c in classes:
            sel = y == c
            if not bool(sel.any()):
                raise ValueError(f"session {data.session}: no training image of class {c} for its prototype")
            w[c] = f[sel].mean(0)
        self._changed.add("student.classifier.weight")

    def session_state(self) -> dict[str, Tensor]:
        """Every tensor that may have changed during the last session, keyed ``<prefix>.<state key>``."""
        out = {}
        for prefix, module in self.modules_to_save().items():
            state = module.state_dict()
            for key, value in state.items():
                full = f"{prefix}.{key}"
                if full in self._changed:
                    out[full] = value.detach().cpu().contiguous().clone()
        return out

    @torch.no_grad()
    def load_session_state(self, session: int, state: dict[str, Tensor]) -> None:
        """Copy a saved :meth:`session_state` back (strict: every key must exist with the same shape)."""
        modules = self.modules_to_save()
        targets: dict[str, Tensor] = {}
        for prefix, module in modules.items():
            for key, value in module.state_dict(keep_vars=True).items():
                targets[f"{prefix}.{key}"] = value
        for key, value in state.items():
            if key not in targets:
                raise KeyError(f"saved state of session {session} has {key!r}, which {self.name} does not have")
            if tuple(targets[key].shape) != tuple(value.shape):
                raise ValueError(f"saved state of session {session}: {key} has shape {tuple(value.shape)}, the "
                                 f"model expects {tuple(targets[key].shape)}")
            targets[key].data.copy_(value.to(targets[key].device, targets[key].dtype))
        self._encoder_version += 1
        self.end_session(session)

    def begin_session(self) -> None:
        self._changed = {"student.classifier.weight"}

    def _mark_trainable(self, prefix: str, module: nn.Module) -> None:
        for key, p in module.named_parameters():
            if p.requires_grad:
                self._changed.add(f"{prefix}.{key}")


def _inject_lora(encoder: FeatureEncoder, target: str, r: int, alpha: float, dropout: float) -> Any:
    from visadapt.adapters import LoRAConfig, inject

    return inject(encoder.net, LoRAConfig(target=encoder.resolve_target(target), r=r, alpha=alpha,
                                          dropout=dropout), name="default", verbose=False)


def _adapter_params(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    from visadapt.adapters import is_adapter_param

    return ((n, p) for n, p in module.named_parameters() if is_adapter_param(n))


def _sgd(groups: list[dict[str, Any]], momentum: float, nesterov: bool, weight_decay: float) -> torch.optim.SGD:
    groups = [g for g in groups if g["params"]]
    return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=momentum, nesterov=nesterov and momentum > 0,
                           weight_decay=weight_decay)


def _restrict(logits: Tensor, num: int | None) -> Tensor:
    return logits if num is None else logits[:, :num]


# ---------------------------------------------------------------------------------------------------------------
# Baseline 1: frozen encoder + class means
# ---------------------------------------------------------------------------------------------------------------
class FrozenClassMean(FSCILMethod):
    """Baseline: the pretrained encoder, frozen, with class-mean classifier rows (no training at all).

    Row c of the bias-free linear classifier is the mean feature of class c's training images (all base-session
    images for base classes, the K shots for novel ones); logits are dot products, as in CoACT's classifier, or
    scaled cosine similarities with ``head="cosine"`` (nearest class mean by angle).

    Args:
        head: ``dot`` or ``cosine`` logits (see :class:`ClassifierModel`).
        head_scale: Scale of cosine logits (irrelevant for the argmax).
        batch_size: Unused (no training); kept for a uniform signature.
        eval_batch_size: Batch size of feature extraction.
    """

    name = "frozen_class_mean"

    def __init__(self, head: Literal["dot", "cosine"] = "dot", head_scale: float = 16.0, batch_size: int = 64,
                 eval_batch_size: int = 100) -> None:
        super().__init__(batch_size, eval_batch_size)
        self.head, self.head_scale = head, head_scale

    def setup(self, encoder: FeatureEncoder, num_classes: int, device: torch.device, lora_target: str = "qv") -> None:
        self.device = device
        self.student = ClassifierModel(encoder, num_classes, self.head, self.head_scale).to(device)
        self.student.requires_grad_(False)

    def modules_to_save(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def train_session(self, data: SessionData) -> dict[str, Any]:
        self.begin_session()
        self.set_prototypes(data, data.new_classes)
        return {}


# ---------------------------------------------------------------------------------------------------------------
# Baseline 2: naive LoRA fine-tuning in every session
# ---------------------------------------------------------------------------------------------------------------
class NaiveLoRAFinetune(FSCILMethod):
    """Baseline: the same LoRA and classifier fine-tuned with cross-entropy in every session (shows forgetting).

    Base session: rows initialised with class means, then LoRA + classifier train on the base data. Every
    incremental session: new rows := class means, then LoRA + classifier train on the new shots only, with the same
    optimiser settings (``lr * inc_lr_factor``), no distillation and no replay.

    Args:
        lora_r: LoRA rank.
        lora_alpha: LoRA scale numerator (scale = alpha / r).
        lora_dropout: Dropout on the LoRA branch input.
        lora_target: Adapter target (preset of the encoder or regular expression); ``None``: the encoder spec's.
        epochs_base: Epochs of the base session.
        epochs_incremental: Epochs of each incremental session.
        lr: Base learning rate (SGD, cosine schedule over the session's epochs).
        inc_lr_factor: Learning-rate factor of incremental sessions.
        momentum: SGD momentum.
        nesterov: Nesterov momentum.
        weight_decay: SGD weight decay.
        batch_size: Training batch size.
        eval_batch_size: Batch size of feature extraction.
        ce_over: Classes in the cross-entropy: ``seen`` (masked) or ``all`` rows.
        head: ``dot`` or ``cosine`` logits (see :class:`ClassifierModel`).
        head_scale: Scale of cosine logits.
    """

    name = "naive_lora_finetune"

    def __init__(self, lora_r: int = 16, lora_alpha: float = 16.0, lora_dropout: float = 0.1,
                 lora_target: str | None = None, epochs_base: int = 25, epochs_incremental: int = 5,
                 lr: float = 0.1, inc_lr_factor: float = 1.0, momentum: float = 0.9, nesterov: bool = True,
                 weight_decay: float = 5e-4, batch_size: int = 64, eval_batch_size: int = 100,
                 ce_over: Literal["seen", "all"] = "seen", head: Literal["dot", "cosine"] = "dot",
                 head_scale: float = 16.0) -> None:
        super().__init__(batch_size, eval_batch_size)
        self.head, self.head_scale = head, head_scale
        self.lora_r, self.lora_alpha, self.lora_dropout, self.lora_target = lora_r, lora_alpha, lora_dropout, \
            lora_target
        self.epochs_base, self.epochs_incremental = epochs_base, epochs_incremental
        self.lr, self.inc_lr_factor = lr, inc_lr_factor
        self.momentum, self.nesterov, self.weight_decay = momentum, nesterov, weight_decay
        self.ce_over = ce_over

    def setup(self, encoder: FeatureEncoder, num_classes: int, device: torch.device, lora_target: str = "qv") -> None:
        self.device = device
        self.lora_report = _inject_lora(encoder, self.lora_target or lora_target, self.lora_r, self.lora_alpha,
                                        self.lora_dropout)
        self.student = ClassifierModel(encoder, num_classes, self.head, self.head_scale).to(device)
        self.student.requires_grad_(False)

    def modules_to_save(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def _trainable(self) -> list[nn.Parameter]:
        self.student.requires_grad_(False)
        params = [p for _, p in _adapter_params(self.student)] + [self.student.classifier.weight]
        for p in params:
            p.requires_grad_(True)
        self._mark_trainable("student", self.student)
        return params

    def train_session(self, data: SessionData) -> dict[str, Any]:
        self.begin_session()
        self.set_prototypes(data, data.new_classes)
        epochs = self.epochs_base if data.session == 0 else self.epochs_incremental
        lr = self.lr if data.session == 0 else self.lr * self.inc_lr_factor
        if epochs <= 0:
            return {}
        opt = _sgd([{"params": self._trainable(), "lr": lr}], self.momentum, self.nesterov, self.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        ce_classes = data.seen_classes if self.ce_over == "seen" else None
        loader = _loader(data.train, self.batch_size, shuffle=True, generator=data.generator)
        log: dict[str, Any] = {}
        for epoch in range(epochs):
            train_mode(self.student)
            total, steps = 0.0, 0
            for batch in loader:
                x = _views(batch["image"], self.device)[0]
                y = batch["label"].to(self.device)
                _, logits = self.student(x)
                loss = F.cross_entropy(_restrict(logits, ce_classes), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, steps = total + float(loss.detach()), steps + 1
            sched.step()
            self._encoder_version += 1
            log[f"epoch{epoch}_loss"] = total / max(steps, 1)
            data.progress(f"{self.name} session {data.session} epoch {epoch + 1}/{epochs} "
                          f"loss {total / max(steps, 1):.4f}")
        self.student.requires_grad_(False)
        return log


# ---------------------------------------------------------------------------------------------------------------
# CoACT
# ---------------------------------------------------------------------------------------------------------------
class CoACT(FSCILMethod):
    """CoACT: asynchronous contrastive LoRA tuning with an EMA teacher, controlled fine-tuning and
    consistency-guided incremental sessions (Roy et al., TMLR 2025). See the module docstring for the losses and
    the documented differences from the official code.

    Args:
        lora_r: LoRA rank (CoACT: 16; the official ``--rank`` flag is ignored by its code).
        lora_alpha: LoRA alpha (16: scale 1).
        lora_dropout: Dropout on the LoRA branch input (0.1).
        lora_target: Adapter target, a preset of the encoder (``qv``: attention query and value) or a regular
            expression; ``None``: the encoder spec's ``lora_target``.
        ema_momentum: Teacher EMA momentum m (0.999).
        temperature: SupCon temperature tau (0.07; the base temperature is the same).
        num_views: Augmented views per image; the student sees views 1..V-1, the teacher view V (2).
        ce_weight: Weight of the base-session cross-entropy.
        con_weight: Weight of the contrastive term (base and incremental sessions).
        epochs_base: Epochs of the base session.
        lr: Base learning rate of LoRA and classifier (SGD, cosine over ``epochs_base``, stepped per epoch).
        momentum: SGD momentum (0.9).
        nesterov: Nesterov momentum (on in CoACT).
        weight_decay: SGD weight decay (5e-4).
        ft_start_layer: Controlled fine-tuning: first encoder block to unfreeze (``-1``: everything, embeddings
            included; ``None``: never).
        ft_start_epoch: Epoch of the base session at which those blocks unfreeze.
        encoder_lr_factor: Learning-rate factor of the unfrozen encoder weights.
        init_with_prototypes: Set the base rows to class means before base training (``start_training_with_
            prototypes``; on in the published commands).
        update_base_with_prototypes: Reset the base rows to class means after base training (off in CoACT).
        epochs_incremental: Epochs of consistency-guided tuning per incremental session (0 in the published FSCIL
            command: prototype-only sessions; 1 in several FSCIT settings).
        incft_layers: What trains in incremental sessions: ``classifier``, ``lora`` or ``classifier+lora``.
        inc_lr_factor: Incremental learning rate = ``lr * inc_lr_factor`` (constant).
        ce_weight_inc: Weight of the incremental cross-entropy.
        consistency_weight: Weight lambda of the logit MSE to the frozen base model.
        ce_over: Classes in the cross-entropy: ``seen`` (masked; default) or ``all`` rows (official).
        consistency_over: Logits compared by the MSE: ``base`` classes (default) or ``all`` rows (official).
        batch_size: Training batch size (64).
        eval_batch_size: Batch size of feature extraction (100).
        head: Classifier logits: ``dot`` (CoACT) or ``cosine`` (scaled cosine; for encoders with unbounded
            features such as the EfficientNet-Lite0 CPU stand-in, see :class:`ClassifierModel`).
        head_scale: Scale of cosine logits.
    """

    name = "coact"

    def __init__(self, lora_r: int = 16, lora_alpha: float = 16.0, lora_dropout: float = 0.1,
                 lora_target: str | None = None, ema_momentum: float = 0.999, temperature: float = 0.07,
                 num_views: int = 2, ce_weight: float = 1.0, con_weight: float = 1.0, epochs_base: int = 25,
                 lr: float = 0.1, momentum: float = 0.9, nesterov: bool = True, weight_decay: float = 5e-4,
                 ft_start_layer: int | None = None, ft_start_epoch: int = 0, encoder_lr_factor: float = 0.1,
                 init_with_prototypes: bool = True, update_base_with_prototypes: bool = False,
                 epochs_incremental: int = 0,
                 incft_layers: Literal["classifier", "lora", "classifier+lora"] = "classifier+lora",
                 inc_lr_factor: float = 0.001, ce_weight_inc: float = 1.0, consistency_weight: float = 1.0,
                 ce_over: Literal["seen", "all"] = "seen", consistency_over: Literal["base", "all"] = "base",
                 batch_size: int = 64, eval_batch_size: int = 100, head: Literal["dot", "cosine"] = "dot",
                 head_scale: float = 16.0) -> None:
        super().__init__(batch_size, eval_batch_size)
        self.head, self.head_scale = head, head_scale
        if num_views < 2:
            raise ValueError(f"num_views must be >= 2 (student and teacher views), got {num_views}")
        if not 0.0 <= ema_momentum <= 1.0:
            raise ValueError(f"ema_momentum must be in [0, 1], got {ema_momentum}")
        if incft_layers not in ("classifier", "lora", "classifier+lora"):
            raise ValueError(f"incft_layers must be classifier, lora or classifier+lora, got {incft_layers!r}")
        self.lora_r, self.lora_alpha, self.lora_dropout, self.lora_target = lora_r, lora_alpha, lora_dropout, \
            lora_target
        self.ema_momentum, self.temperature, self.num_views = ema_momentum, temperature, num_views
        self.ce_weight, self.con_weight = ce_weight, con_weight
        self.epochs_base, self.lr, self.momentum, self.nesterov, self.weight_decay = \
            epochs_base, lr, momentum, nesterov, weight_decay
        self.ft_start_layer, self.ft_start_epoch, self.encoder_lr_factor = ft_start_layer, ft_start_epoch, \
            encoder_lr_factor
        self.init_with_prototypes, self.update_base_with_prototypes = init_with_prototypes, \
            update_base_with_prototypes
        self.epochs_incremental, self.incft_layers, self.inc_lr_factor = epochs_incremental, incft_layers, \
            inc_lr_factor
        self.ce_weight_inc, self.consistency_weight = ce_weight_inc, consistency_weight
        self.ce_over, self.consistency_over = ce_over, consistency_over
        self.base_student: ClassifierModel | None = None
        self.base_teacher: FeatureEncoder | None = None

    # -- building -------------------------------------------------------------------------------------------
    def setup(self, encoder: FeatureEncoder, num_classes: int, device: torch.device, lora_target: str = "qv") -> None:
        self.device = device
        plain_names = {id(p): n for n, p in encoder.net.named_parameters()}
        # the teacher and the pretrained reference are copies of the encoder *before* LoRA exists
        self.teacher = copy.deepcopy(encoder).to(device).requires_grad_(False).eval()
        need_refs = self.epochs_incremental > 0
        self.pretrained = copy.deepcopy(self.teacher) if need_refs and self.con_weight > 0 else None
        self.lora_report = _inject_lora(encoder, self.lora_target or lora_target, self.lora_r, self.lora_alpha,
                                        self.lora_dropout)
        self.student = ClassifierModel(encoder, num_classes, self.head, self.head_scale).to(device)
        self.student.requires_grad_(False)
        # EMA pairs by parameter identity: the adapter library keeps the wrapped base weights as the same Parameter
        # objects (renamed ...base_layer.weight), so the teacher's names are the pre-injection ones.
        teacher_params = dict(self.teacher.net.named_parameters())
        self._ema_pairs: list[tuple[str, str, Tensor, nn.Parameter]] = []
        for name, p in self.student.encoder.net.named_parameters():
            if id(p) in plain_names:
                plain = plain_names[id(p)]
                self._ema_pairs.append((name, plain, teacher_params[plain], p))
        found = {plain for _, plain, _, _ in self._ema_pairs}
        lost = [n for n in plain_names.values() if n not in found]
        if lost:
            raise RuntimeError(f"LoRA injection replaced encoder weights {lost[:3]}; cannot pair them with the "
                               "teacher for the EMA update")

    def modules_to_save(self) -> dict[str, nn.Module]:
        return {"student": self.student, "teacher": self.teacher}

    # -- parameter groups -----------------------------------------------------------------------------------
    def _adapters(self) -> list[nn.Parameter]:
        return [p for _, p in _adapter_params(self.student.encoder)]

    def _ft_params(self) -> list[tuple[str, nn.Parameter]]:
        """Encoder base weights unfrozen by controlled fine-tuning: every parameter from the first one of block
        ``ft_start_layer`` onward in registration order (final norm / pooler included), or all with -1."""
        if self.ft_start_layer is None:
            return []
        out, on = [], self.ft_start_layer == -1
        pattern = re.compile(self.student.encoder.block_pattern)
        for name, plain, _, p in self._ema_pairs:
            m = pattern.search(plain)
            if not on and m is not None and int(m.group(1)) >= self.ft_start_layer:
                on = True
            if on:
                out.append((name, p))
        if not out:
            raise ValueError(f"ft_start_layer={self.ft_start_layer} selects no encoder weight (block pattern "
                             f"{self.student.encoder.block_pattern!r})")
        return out

    @torch.no_grad()
    def _ema_update(self) -> None:
        m = self.ema_momentum
        for _, plain, t, s in self._ema_pairs:
            if s.requires_grad:
                t.mul_(m).add_(s.detach(), alpha=1.0 - m)
                self._changed.add(f"teacher.net.{plain}")

    # -- sessions -------------------------------------------------------------------------------------------
    def train_session(self, data: SessionData) -> dict[str, Any]:
        self.begin_session()
        if data.session == 0:
            return self._base_session(data)
        return self._incremental_session(data)

    def _base_session(self, data: SessionData) -> dict[str, Any]:
        if self.init_with_prototypes:
            self.set_prototypes(data, data.new_classes)
        log: dict[str, Any] = {}
        if self.epochs_base > 0:
            adapters = self._adapters()
            for p in adapters + [self.student.classifier.weight]:
                p.requires_grad_(True)
            ft = self._ft_params()
            groups = [{"params": adapters + [self.student.classifier.weight], "lr": self.lr},
                      {"params": [p for _, p in ft], "lr": self.lr * self.encoder_lr_factor}]
            opt = _sgd(groups, self.momentum, self.nesterov, self.weight_decay)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.epochs_base)
            ce_classes = data.seen_classes if self.ce_over == "seen" else None
            loader = _loader(data.train, self.batch_size, shuffle=True, generator=data.generator)
            for epoch in range(self.epochs_base):
                if ft and epoch == self.ft_start_epoch:
                    for _, p in ft:
                        p.requires_grad_(True)
                    data.progress(f"coact: controlled fine-tuning unfreezes {len(ft)} encoder tensors "
                                  f"({sum(p.numel() for _, p in ft):,} weights) at epoch {epoch}")
                train_mode(self.student)
                sums = {"loss": 0.0, "ce": 0.0, "con": 0.0}
                steps = 0
                for batch in loader:
                    views = _views(batch["image"], self.device)
                    y = batch["label"].to(self.device)
                    student_x = torch.cat(views[:-1])
                    feats, logits = self.student(student_x)
                    ce = F.cross_entropy(_restrict(logits[: len(y)], ce_classes), y)
                    self._ema_update()  # before the teacher forward, as in the official code
                    with torch.no_grad():
                        z_t = F.normalize(self.teacher(views[-1]), dim=-1)
                    z_s = F.normalize(feats, dim=-1)
                    n_student = len(views) - 1
                    con = supcon_loss(torch.cat([z_s, z_t]), y.repeat(n_student + 1), self.temperature)
                    loss = self.ce_weight * ce + self.con_weight * con
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"coact: loss is {float(loss)} at epoch {epoch}")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    steps += 1
                    for k, v in (("loss", loss), ("ce", ce), ("con", con)):
                        sums[k] += float(v.detach())
                sched.step()
                self._encoder_version += 1
                means = {k: v / max(steps, 1) for k, v in sums.items()}
                log[f"epoch{epoch}"] = means
                data.progress(f"coact session 0 epoch {epoch + 1}/{self.epochs_base} loss {means['loss']:.4f} "
                              f"(ce {means['ce']:.4f}, supcon {means['con']:.4f})")
            self._mark_trainable("student", self.student)  # LoRA, classifier and the unfrozen encoder weights
            self.student.requires_grad_(False)
        if self.update_base_with_prototypes:
            self.set_prototypes(data, data.new_classes)
        return log

    def end_session(self, session: int) -> None:
        if session == 0 and self.epochs_incremental > 0:
            # frozen copies of the base-session model (student with LoRA and classifier) and of its teacher
            self.base_student = copy.deepcopy(self.student).requires_grad_(False).eval()
            self.base_teacher = copy.deepcopy(self.teacher).requires_grad_(False).eval()

    def _incremental_session(self, data: SessionData) -> dict[str, Any]:
        self.set_prototypes(data, data.new_classes)
        if self.epochs_incremental <= 0:
            return {}
        assert self.base_student is not None and self.base_teacher is not None
        self.student.requires_grad_(False)
        params: list[nn.Parameter] = []
        if "classifier" in self.incft_layers:
            params.append(self.student.classifier.weight)
        if "lora" in self.incft_layers:
            params += self._adapters()
        for p in params:
            p.requires_grad_(True)
        self._mark_trainable("student", self.student)
        opt = _sgd([{"params": params, "lr": self.lr * self.inc_lr_factor}], self.momentum, self.nesterov,
                   self.weight_decay)
        ce_classes = data.seen_classes if self.ce_over == "seen" else None
        cons_classes = data.base_classes if self.consistency_over == "base" else None
        loader = _loader(data.train, self.batch_size, shuffle=True, generator=data.generator)
        log: dict[str, Any] = {}
        for epoch in range(self.epochs_incremental):
            train_mode(self.student)
            sums = {"loss": 0.0, "ce": 0.0, "con": 0.0, "cons": 0.0}
            steps = 0
            for batch in loader:
                views = _views(batch["image"], self.device)
                y = batch["label"].to(self.device)
                feats, logits = self.student(torch.cat(views[:-1]))
                logits = logits[: len(y)]
                with torch.no_grad():
                    _, base_logits = self.base_student(views[0])
                    refs = [F.normalize(self.base_teacher(views[-1]), dim=-1)]
                    if self.pretrained is not None:
                        refs.append(F.normalize(self.pretrained(views[-1]), dim=-1))
                ce = F.cross_entropy(_restrict(logits, ce_classes), y)
                z_s = F.normalize(feats, dim=-1)
                n_rows = len(views) - 1 + len(refs)
                con = supcon_loss(torch.cat([z_s, *refs]), y.repeat(n_rows), self.temperature)
                cons = F.mse_loss(_restrict(logits, cons_classes), _restrict(base_logits, cons_classes))
                loss = self.ce_weight_inc * ce + self.con_weight * con + self.consistency_weight * cons
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"coact: loss is {float(loss)} in session {data.session}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
                for k, v in (("loss", loss), ("ce", ce), ("con", con), ("cons", cons)):
                    sums[k] += float(v.detach())
            if "lora" in self.incft_layers:
                self._encoder_version += 1
            means = {k: v / max(steps, 1) for k, v in sums.items()}
            log[f"epoch{epoch}"] = means
            data.progress(f"coact session {data.session} epoch {epoch + 1}/{self.epochs_incremental} loss "
                          f"{means['loss']:.4f} (ce {means['ce']:.4f}, supcon {means['con']:.4f}, "
                          f"consistency {means['cons']:.4f})")
        self.student.requires_grad_(False)
        return log


METHODS: dict[str, type[FSCILMethod]] = {
    "coact": CoACT,
    "frozen_class_mean": FrozenClassMean,
    "naive_lora_finetune": NaiveLoRAFinetune,
}

__all__ = [
    "METHODS", "ClassifierModel", "CoACT", "EncoderSpec", "FSCILMethod", "FeatureEncoder", "FrozenClassMean",
    "NaiveLoRAFinetune", "SessionData", "build_encoder", "supcon_loss", "train_mode",
]
