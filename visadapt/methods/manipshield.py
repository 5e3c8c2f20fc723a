"""ManipShield: an MLLM manipulation detector with contrastive LoRA, Layer Discrimination Selection (LDS), detection /
cue / box decoders on the selected layer, and explanations from the language head.

The model is a LLaVA-form VLM from the backbones registry (:mod:`visadapt.backbones.vlm`): vision encoder ->
projector -> causal language model. The input sequence is ``[visual tokens] <s> PROMPT`` followed, in training, by
the explanation and ``</s>``; the decoders read the hidden states of one language-model layer at the last prompt
token (the *query* position, which by causality never sees the explanation) and at the visual tokens.

Training (one Lightning ``fit``; losses summed with their weights):

* **Contrastive LoRA** on the vision encoder (``vision_adapter``, any registered adapter): a supervised-contrastive
  loss on authenticity over the pooled visual tokens the language model receives (through a small projection head).
  ``pairing="label"`` (default): positives are the other images with the same label; a real image and its edited
  twin (same ``pair_id``, opposite labels) are *hard negatives*, their term in the denominator weighted by
  ``hard_negative_weight``. ``pairing="twin"``: the literal reading of the paper's summary, InfoNCE with the twin
  as the positive and the rest of the batch as negatives. The exact semantics are not confirmed by the paper's full
  text (reference notes 2.3), hence the option. Batches should hold twin groups (the datamodule's pairing).
* **Explanations**: cross-entropy of the language head on the annotation text (teacher forcing); greedy decoding at
  inference.
* **LDS** (once, at step ``lds_at_step``; or fixed with ``lds_layer``): for every layer ``l`` of the language model,
  the pooled state ``[query state, mean visual state]`` of ``lds_probe_images`` fixed training images (the first
  ones of the validation set -- held-out groups of the training editors -- in index order, evaluation mode, no
  gradient) is scored with the closed-form two-class
  LDA separation ``J_l = d^T (S_w + lambda I)^-1 d`` (``d``: difference of class means, ``S_w``: pooled within-class
  covariance, ``lambda = lds_shrinkage x mean eigenvalue``; features standardised per dimension first, so layers of
  different scale compare fairly). The argmax is stored in the checkpoint (buffer ``lds_layer_selected``) and in the
  hyperparameters (``lds_layer_selected``), and reused on reload; the scores go to the report. The paper's exact
  criterion is unknown; this is the reference notes' recommended reading.
* **Decoders** (trained from the LDS step on): detection (one logit; ``sigmoid`` is the score AUC uses), multi-label
  cues (BCE), box regression (``sigmoid`` cx, cy, w, h -> xyxy; L1 + GIoU, on images that have a box).

At the end of ``fit`` the model is scored on the datamodule's test images (held-out editors) with
:mod:`visadapt.metrics.manipulation` / :mod:`visadapt.metrics.text`, overall and per editor, next to the
error-level-analysis baseline (:class:`visadapt.methods.ela.ErrorLevelAnalysis`) scored by the same code; the run
folder gets ``report.json`` / ``report.md``.
"""

from __future__ import annotations

import inspect
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from tqdm.auto import tqdm

from visadapt.adapters import ADAPTERS, AdapterConfig, adapter_names, inject, is_adapter_param, set_active_adapter
from visadapt.backbones import BACKBONES, build_backbone
from visadapt.methods.base import AdapterModule, PlainKwargs, read_checkpoint
from visadapt.report import write_report

NUM_CUES = 12


# ---------------------------------------------------------------------------------------------------------------
# Losses and the LDS probe (pure functions)
# ---------------------------------------------------------------------------------------------------------------
def contrastive_loss(z: torch.Tensor, labels: torch.Tensor, pair_ids: torch.Tensor, temperature: float = 0.1,
                     pairing: str = "label", hard_negative_weight: float = 1.0) -> torch.Tensor:
    """Supervised contrastive loss with twin-aware pairs (``z``: ``(B, d)`` L2-normalised embeddings).

    With ``s_ij = z_i . z_j / temperature`` and, for anchor ``i``, positives ``P(i)`` and weights ``w_ij`` over all
    ``j != i`` (``hard_negative_weight`` for a twin of opposite label, else 1)::

        L_i = -1/|P(i)| sum_{p in P(i)} [ s_ip - log sum_{j != i} w_ij exp(s_ij) ]

    averaged over the anchors that have a positive (0 when none has). ``pairing="label"``: ``P(i)`` = same label
    (Khosla et al.'s SupCon when the weight is 1); ``pairing="twin"``: ``P(i)`` = same ``pair_id``.
    """
    if pairing not in ("label", "twin"):
        raise ValueError(f"pairing must be 'label' or 'twin', got {pairing!r}")
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    sim = (z @ z.t()) / temperature
    same_pair = pair_ids[:, None] == pair_ids[None, :]
    same_label = labels[:, None] == labels[None, :]
    pos = (same_label if pairing == "label" else same_pair) & ~eye
    weights = torch.ones_like(sim)
    weights[same_pair & ~same_label] = hard_negative_weight
    logits = sim.masked_fill(eye, float("-inf"))
    log_den = torch.logsumexp(logits + weights.log(), dim=1, keepdim=True)
    log_prob = sim - log_den
    count = pos.sum(1)
    has = count > 0
    if not bool(has.any()):
        return z.sum() * 0.0
    per_anchor = -(log_prob * pos).sum(1)[has] / count[has]
    return per_anchor.mean()


def lda_separation(features: torch.Tensor, labels: torch.Tensor, shrinkage: float = 0.1) -> float:
    """Closed-form two-class LDA separation ``d^T (S_w + lambda I)^-1 d`` of standardised ``features`` ``(N, D)``.

    ``d`` is the difference of the class means, ``S_w`` the pooled within-class covariance and ``lambda`` =
    ``shrinkage`` x its mean eigenvalue (trace / D) + 1e-6, which keeps the inverse stable when ``N < D``.
    """
    x = features.double()
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-8)
    y = labels.bool()
    if y.all() or (~y).all():
        raise ValueError("LDS needs probe images of both classes (authentic and manipulated)")
    m0, m1 = x[~y].mean(0), x[y].mean(0)
    xc = torch.cat([x[~y] - m0, x[y] - m1])
    sw = xc.t() @ xc / max(len(x) - 2, 1)
    lam = shrinkage * torch.trace(sw) / sw.shape[0] + 1e-6  # + eps: a probe of one image per class has S_w = 0
    d = m1 - m0
    return float(d @ torch.linalg.solve(sw + lam * torch.eye(len(d), dtype=x.dtype), d))


def cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def generalized_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise GIoU of xyxy boxes ``(N, 4)`` (Rezatofighi et al. 2019)."""
    area_a = (a[:, 2] - a[:, 0]).clamp_min(0) * (a[:, 3] - a[:, 1]).clamp_min(0)
    area_b = (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)
    lt, rb = torch.max(a[:, :2], b[:, :2]), torch.min(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    union = area_a + area_b - inter
    iou = inter / union.clamp_min(1e-7)
    hull = (torch.max(a[:, 2:], b[:, 2:]) - torch.min(a[:, :2], b[:, :2])).clamp_min(0).prod(-1)
    return iou - (hull - union) / hull.clamp_min(1e-7)


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    """A decoder: BatchNorm over the batch first (language-model states carry a large image-independent part that
    would otherwise drown the differences between images), then a two-layer MLP."""
    return nn.Sequential(nn.BatchNorm1d(d_in), nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


def config_to_dict(config: AdapterConfig | None) -> dict[str, Any] | None:
    """An adapter config as ``{"variant": registered name, **fields}`` (plain data, rebuilt by
    :func:`config_from_dict`; no class path in checkpoints)."""
    if config is None:
        return None
    from visadapt.adapters import variant_name

    return {"variant": variant_name(config), **asdict(config)}


def config_from_dict(data: dict[str, Any] | None) -> AdapterConfig | None:
    """The adapter config :func:`config_to_dict` wrote; only registered variants can be named."""
    if data is None:
        return None
    data = dict(data)
    cls = ADAPTERS.get(data.pop("variant")).config_class
    return cls(**data)


# ---------------------------------------------------------------------------------------------------------------
# The LightningModule
# ---------------------------------------------------------------------------------------------------------------
class ManipShield(AdapterModule):
    """ManipShield-style manipulation detector: contrastive LoRA on the vision encoder, LDS, detection / cue / box
    decoders on the selected language-model layer, explanations from the language head.

    Args:
        backbone: Registered VLM backbone: ``manipshield_vlm`` (offline default), ``hf_vlm`` (LLaVA / Qwen2-VL
            from a local folder), ``tiny_vlm`` (tests).
        backbone_kwargs: Keyword arguments of the backbone builder (e.g. ``model_dir``, ``image_size``).
        vision_adapter: Adapter on the vision encoder (contrastive LoRA); its ``target`` may be a backbone preset
            (``conv_1x1_late``, ``vision_attn_qv``, ...). ``None``: the vision encoder stays frozen.
        lm_adapter: Optional adapter on the language model (for large pretrained ones; target e.g.
            ``language_model\\..*(q_proj|v_proj)``).
        train_language_model: Train every language-model weight (the offline default's randomly initialised LM
            must be trained); ``False`` keeps it frozen apart from ``lm_adapter``.
        train_projector: Train the projector.
        prompt: The question placed after the visual tokens; its last token is the query position.
        contrastive_weight: Weight of the contrastive loss (0 switches it off).
        temperature: Temperature of the contrastive loss.
        pairing: ``label`` (supervised contrastive on authenticity, twins as hard negatives) or ``twin`` (InfoNCE
            with the twin as positive).
        hard_negative_weight: Denominator weight of a twin of opposite label (1 = plain SupCon).
        contrastive_dim: Output size of the contrastive projection head.
        lds_layer: Use this language-model layer (1..num_layers) and skip the probe; ``None`` runs LDS.
        lds_at_step: Optimiser step at which LDS runs (decoders train from then on).
        lds_probe_images: Number of fixed training images the LDS probe scores.
        lds_shrinkage: Shrinkage of the within-class covariance in the LDS score.
        detection_weight: Weight of the detection BCE.
        cue_weight: Weight of the multi-label cue BCE.
        box_l1_weight: Weight of the box L1 loss.
        box_giou_weight: Weight of the box GIoU loss.
        text_weight: Weight of the explanation cross-entropy.
        max_text_tokens: Explanations are truncated to this many tokens in training.
        max_new_tokens: Greedy-decoding length limit.
        explain_eval_images: Test images whose explanation is generated and scored (ROUGE-L); 0 skips it.
        eval_ela: Score the error-level-analysis baseline on the same test images at the end of ``fit``.
        tokenizer_json: The tokenizer of a trained model (set from its checkpoint); ``None`` trains one on the
            training set's explanations when the backbone is assembled (``tokenizer_texts`` in its builder).
        optimizer: Optimiser over trainable parameters.
        lr_scheduler: Scheduler; ``None`` uses the built-in cosine schedule.
        schedule: Built-in schedule (``cosine`` or ``constant``).
        warmup_steps: Warm-up steps of the built-in schedule.
        min_lr: Final learning rate of the cosine schedule.
    """

    def __init__(
        self,
        backbone: str = "manipshield_vlm",
        backbone_kwargs: PlainKwargs | None = None,
        vision_adapter: AdapterConfig | None = None,
        lm_adapter: AdapterConfig | None = None,
        train_language_model: bool = True,
        train_projector: bool = True,
        prompt: str = "Is this image manipulated? Explain.",
        contrastive_weight: float = 0.5,
        temperature: float = 0.1,
        pairing: str = "label",
        hard_negative_weight: float = 2.0,
        contrastive_dim: int = 64,
        lds_layer: int | None = None,
        lds_at_step: int = 0,
        lds_probe_images: int = 96,
        lds_shrinkage: float = 0.1,
        detection_weight: float = 1.0,
        cue_weight: float = 0.5,
        box_l1_weight: float = 2.0,
        box_giou_weight: float = 1.0,
        text_weight: float = 0.5,
        max_text_tokens: int = 64,
        max_new_tokens: int = 48,
        explain_eval_images: int = 32,
        eval_ela: bool = True,
        tokenizer_json: str | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        schedule: str = "cosine",
        warmup_steps: int = 0,
        min_lr: float = 1e-6,
    ) -> None:
        super().__init__(optimizer, lr_scheduler, schedule, warmup_steps, min_lr)
        if pairing not in ("label", "twin"):
            raise ValueError(f"model.pairing must be 'label' or 'twin', got {pairing!r}")
        if backbone not in BACKBONES:
            raise ValueError(f"model.backbone {backbone!r} is not registered; available: {', '.join(BACKBONES)}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "vision_adapter", "lm_adapter"])
        self.hparams["vision_adapter"] = config_to_dict(vision_adapter)
        self.hparams["lm_adapter"] = config_to_dict(lm_adapter)
        self.vision_adapter_cfg, self.lm_adapter_cfg = vision_adapter, lm_adapter
        self.register_buffer("lds_layer_selected", torch.tensor(-1 if lds_layer is None else int(lds_layer)))
        self.report: dict[str, Any] = {}
        self.vlm: nn.Module | None = None
        self._needs_texts = "tokenizer_texts" in inspect.signature(BACKBONES.get(backbone)).parameters
        if tokenizer_json is not None or not self._needs_texts:
            self._build(tokenizer_json=tokenizer_json)
        else:  # built in setup(); the datamodule reads the preprocessing now (the CLI links it)
            from visadapt.backbones.vlm import assembled_preprocess

            self.preprocess = assembled_preprocess(backbone, **(backbone_kwargs or {}))

    # -- building -------------------------------------------------------------------------------------------------
    def _build(self, tokenizer_json: str | None = None, tokenizer_texts: list[str] | None = None) -> None:
        """Build the VLM, inject the adapters, choose what trains, create the heads (in ``__init__`` or ``setup``)."""
        hp = self.hparams
        kwargs = dict(hp.backbone_kwargs or {})
        if self._needs_texts:
            kwargs.update(tokenizer_json=tokenizer_json, tokenizer_texts=tokenizer_texts)
        bb = build_backbone(hp.backbone, **kwargs)
        vlm = bb.model
        self.backbone_info, self.preprocess = bb, bb.preprocess
        for p in vlm.parameters():
            p.requires_grad_(False)
        if self.vision_adapter_cfg is not None:
            from dataclasses import replace

            cfg = replace(self.vision_adapter_cfg, target=bb.resolve_target(self.vision_adapter_cfg.target))
            self.vision_injection = inject(vlm, cfg, name="contrastive")
        if self.lm_adapter_cfg is not None:
            from dataclasses import replace

            inject(vlm, replace(self.lm_adapter_cfg, target=bb.resolve_target(self.lm_adapter_cfg.target)), name="lm")
            # inject() activates only the newest adapter; both act, each on its own layers
            set_active_adapter(vlm, {n: 1.0 for n in adapter_names(vlm)})
        for n, p in vlm.named_parameters():
            if is_adapter_param(n):
                p.requires_grad_(True)  # a second inject froze the first adapter
        if hp.train_language_model:
            for n, p in vlm.language_model.named_parameters():
                if not is_adapter_param(n):
                    p.requires_grad_(True)
        projector = getattr(vlm, "projector", None)
        if hp.train_projector and projector is not None:
            for p in projector.parameters():
                p.requires_grad_(True)
        self.vlm = vlm
        d, nv = vlm.hidden_size, vlm.num_visual_tokens
        self.contrastive_head = _mlp(d, d, hp.contrastive_dim)
        self.detection_head = _mlp(2 * d, d, 1)
        self.cue_head = _mlp(2 * d, d, NUM_CUES)
        self.box_head = _mlp((nv + 1) * d, d, 4)
        self.hparams["tokenizer_json"] = self._tokenizer_json()
        self.report["backbone"] = bb.identity

    def _tokenizer_json(self) -> str | None:
        from visadapt.backbones.vlm import tokenizer_json

        return tokenizer_json(self.vlm.tokenizer) if self._needs_texts else None

    def setup(self, stage: str) -> None:
        """Assembled backbones train their tokenizer on the training explanations, so they are built here."""
        dm = self.trainer.datamodule
        if self.vlm is None:
            records = getattr(getattr(dm, "train_set", None), "records", None)
            if not records:
                raise ValueError("ManipShield with an assembled backbone trains its tokenizer on the training set's "
                                 "explanations: the datamodule needs a train_set with records "
                                 "(ManipulationDataModule)")
            self._build(tokenizer_texts=[r.text for r in records if r.text] + [self.hparams.prompt])
        pre = getattr(dm, "preprocess", None)
        if pre is not None and (tuple(pre.mean), tuple(pre.std)) != (tuple(self.preprocess.mean),
                                                                     tuple(self.preprocess.std)):
            raise ValueError(f"data.preprocess normalises with mean {tuple(pre.mean)} / std {tuple(pre.std)}, the "
                             f"backbone {self.hparams.backbone!r} expects mean {tuple(self.preprocess.mean)} / std "
                             f"{tuple(self.preprocess.std)}: set data.preprocess to match")

    # -- sequences ------------------------------------------------------------------------------------------------
    def _prefix(self) -> list[int]:
        bos = self.vlm.bos_id
        return ([bos] if bos is not None else []) + self.vlm.encode(self.hparams.prompt)

    def _sequences(self, texts: list[str] | None, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Token ids ``(B, T)``, attention mask, language-model targets (-100 = ignored) and the query position."""
        prefix = self._prefix()
        q = len(prefix) - 1
        rows = []
        for i in range(b):
            answer = [] if texts is None else self.vlm.encode(texts[i])[: self.hparams.max_text_tokens] + [
                self.vlm.eos_id]
            rows.append((prefix + answer, len(answer)))
        t = max(len(r) for r, _ in rows)
        ids = torch.full((b, t), self.vlm.pad_id, dtype=torch.long)
        mask = torch.zeros((b, t), dtype=torch.long)
        targets = torch.full((b, t), -100, dtype=torch.long)
        for i, (r, n_ans) in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
            if n_ans:
                # position p predicts token p + 1: the answer tokens are predicted from q .. len(r) - 2
                targets[i, q:len(r) - 1] = torch.tensor(r[q + 1:])
        return ids.to(self.device), mask.to(self.device), targets.to(self.device), q

    # -- forward --------------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, texts: list[str] | None = None, layer: int | None = None
                ) -> dict[str, torch.Tensor]:
        """Outputs for a batch: ``score`` (detection probability), ``det_logit``, ``cue_logits``, ``box`` (xyxy in
        [0, 1]), ``z`` (contrastive embedding), ``lm_loss`` (when ``texts``), plus ``out`` (the VLM output)."""
        ids, mask, targets, q = self._sequences(texts, len(images))
        out = self.vlm(images, ids, mask)
        res: dict[str, Any] = {"out": out, "query": q}
        res["z"] = F.normalize(self.contrastive_head(out.visual_pooled(0).float()), dim=-1)
        if texts is not None:
            logits = out.logits[:, out.text_start:].float()
            res["lm_loss"] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=-100)
        layer = int(self.lds_layer_selected) if layer is None else layer
        if layer >= 0:
            res.update(self.decode(out, q, layer))
        return res

    def layer_features(self, out: Any, q: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pooled, visual)``: ``[query state, mean visual state]`` ``(B, 2D)`` and the visual states ``(B, N, D)``."""
        h = out.hidden_states[layer].float()
        visual = h[:, out.visual_mask]
        query = h[:, out.text_start + q]
        return torch.cat([query, visual.mean(1)], -1), visual

    def decode(self, out: Any, q: int, layer: int) -> dict[str, torch.Tensor]:
        pooled, visual = self.layer_features(out, q, layer)
        det = self.detection_head(pooled).squeeze(-1)
        box_in = torch.cat([pooled[:, : visual.shape[-1]], visual.flatten(1)], -1)
        box = cxcywh_to_xyxy(torch.sigmoid(self.box_head(box_in))).clamp(0, 1)
        return {"det_logit": det, "score": torch.sigmoid(det), "cue_logits": self.cue_head(pooled), "box": box}

    # -- training -------------------------------------------------------------------------------------------------
    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        hp = self.hparams
        res = self(batch["image"], batch["text"])
        label = batch["label"].float()
        parts: dict[str, torch.Tensor] = {"text": res["lm_loss"]}
        if hp.contrastive_weight > 0:
            parts["contrastive"] = contrastive_loss(res["z"], batch["label"], batch["pair_id"], hp.temperature,
                                                    hp.pairing, hp.hard_negative_weight)
        if "det_logit" in res:
            parts["detection"] = F.binary_cross_entropy_with_logits(res["det_logit"], label)
            has_cues = batch.get("has_cues", torch.ones_like(batch["label"], dtype=torch.bool)).bool()
            if bool(has_cues.any()):
                parts["cues"] = F.binary_cross_entropy_with_logits(res["cue_logits"][has_cues],
                                                                   batch["cues"][has_cues].float())
            has_box = batch["has_box"].bool()
            if bool(has_box.any()):
                pred, gt = res["box"][has_box], batch["box"][has_box].float()
                parts["box_l1"] = F.l1_loss(pred, gt)
                parts["box_giou"] = (1 - generalized_iou(pred, gt)).mean()
        weights = {"text": hp.text_weight, "contrastive": hp.contrastive_weight, "detection": hp.detection_weight,
                   "cues": hp.cue_weight, "box_l1": hp.box_l1_weight, "box_giou": hp.box_giou_weight}
        parts["loss"] = sum(weights[k] * v for k, v in parts.items())
        return parts

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if int(self.lds_layer_selected) < 0 and self.global_step >= self.hparams.lds_at_step:
            self.select_layer()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        parts = self.losses(batch)
        b = len(batch["label"])
        self.log("train_loss", parts["loss"], prog_bar=True, batch_size=b)
        for k, v in parts.items():
            if k != "loss":
                self.log(f"train_{k}", v, batch_size=b)
        return parts["loss"]

    # -- Layer Discrimination Selection ---------------------------------------------------------------------------
    def probe_loader(self) -> Any:
        """The fixed LDS probe images: the first ``lds_probe_images`` of the datamodule's validation set (held-out
        groups of the training editors, evaluation transform; the training set when it lacks a class), index order."""
        from torch.utils.data import DataLoader, Subset

        from visadapt.data.base import collate

        dm = self.trainer.datamodule
        ds = dm.train_set
        val = getattr(dm, "val_set", None)
        if val is not None and len(set(val.labels)) == 2:  # held-out images of the training editors
            ds = val
        n = min(self.hparams.lds_probe_images, len(ds))
        return DataLoader(Subset(ds, range(n)), batch_size=getattr(dm, "batch_size", 16), shuffle=False,
                          collate_fn=collate)

    @torch.no_grad()
    def lds_scores(self, loader: Any) -> list[float]:
        """LDA separation (:func:`lda_separation`) of every language-model layer ``1..num_layers`` on ``loader``."""
        was_training = self.training
        self.eval()
        feats: list[list[torch.Tensor]] = [[] for _ in range(self.vlm.num_layers + 1)]
        labels = []
        with torch.random.fork_rng(devices=[]):  # the probe must not shift training's random stream
            for batch in tqdm(loader, desc="LDS probe", leave=False, disable=not self._progress()):
                ids, mask, _, q = self._sequences(None, len(batch["image"]))
                out = self.vlm(batch["image"].to(self.device), ids, mask)
                for layer in range(1, self.vlm.num_layers + 1):
                    feats[layer].append(self.layer_features(out, q, layer)[0].cpu())
                labels.append(batch["label"].cpu())
        self.train(was_training)
        y = torch.cat(labels)
        return [lda_separation(torch.cat(feats[layer]), y, self.hparams.lds_shrinkage)
                for layer in range(1, self.vlm.num_layers + 1)]

    def select_layer(self, loader: Any = None) -> int:
        """Run LDS, store the chosen layer (buffer and hyperparameters) and return it."""
        scores = self.lds_scores(loader if loader is not None else self.probe_loader())
        layer = int(np.argmax(scores)) + 1
        self.lds_layer_selected.fill_(layer)
        self.hparams["lds_layer_selected"] = layer
        self.report["lds"] = {"layer": layer, "scores": [round(s, 4) for s in scores], "step": int(self.global_step),
                              "criterion": "LDA separation d^T (S_w + lambda I)^-1 d of [query, mean visual] states"}
        return layer

    def extra_state_keys(self) -> set[str]:
        """The LDS choice and the decoders' BatchNorm statistics (buffers, so not in the trainable parameters)."""
        heads = ("contrastive_head", "detection_head", "cue_head", "box_head")
        return {"lds_layer_selected"} | {k for k, _ in self.named_buffers() if k.split(".")[0] in heads}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["hyper_parameters"]["tokenizer_json"] = self._tokenizer_json()
        checkpoint["hyper_parameters"]["lds_layer_selected"] = int(self.lds_layer_selected)

    def _progress(self) -> bool:
        trainer = self._trainer
        return trainer is None or trainer.is_global_zero

    # -- evaluation -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_batch(self, images: torch.Tensor, explain: bool = False) -> dict[str, Any]:
        """Scores, cue probabilities, boxes (and greedy explanations) for a batch of preprocessed images."""
        res = self(images.to(self.device))
        out = {"score": res["score"].float().cpu(), "cues": torch.sigmoid(res["cue_logits"]).float().cpu(),
               "box": res["box"].float().cpu()}
        if explain:
            ids, _, _, _ = self._sequences(None, len(images))
            gen = self.vlm.greedy_generate(images.to(self.device), ids, self.hparams.max_new_tokens)
            out["text"] = [self.vlm.decode(g) for g in gen]
        return out

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if int(self.lds_layer_selected) < 0:
            return
        res = self(batch["image"])
        self._val.append((res["score"].float().cpu(), batch["label"].cpu()))

    def on_validation_epoch_start(self) -> None:
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        from visadapt.metrics.manipulation import image_metrics

        s = torch.cat([v[0] for v in self._val]).numpy()
        y = torch.cat([v[1] for v in self._val]).numpy()
        m = image_metrics(s, y)
        self.log("val_auc", float(m["auc"]), prog_bar=True)
        self.log("val_acc", float(m["acc"]))

    @torch.no_grad()
    def collect_predictions(self, loader: Any, desc: str, explain_images: int = 0) -> dict[str, Any]:
        """Predictions and ground truth over a loader (one batch under ``fast_dev_run``)."""
        was_training = self.training
        self.eval()
        keys = ("score", "cues", "box")
        pred: dict[str, list] = {k: [] for k in (*keys, "text")}
        gt: dict[str, list] = {k: [] for k in ("label", "box", "has_box", "cues", "editor", "category", "text")}
        limit = 1 if (self._trainer is not None and self.trainer.fast_dev_run) else None
        explained = 0
        for i, batch in enumerate(tqdm(loader, desc=desc, leave=False, disable=not self._progress())):
            if limit is not None and i >= limit:
                break
            explain = explained < explain_images
            p = self.predict_batch(batch["image"], explain=explain)
            for k in keys:
                pred[k].append(p[k])
            texts = p.get("text", [None] * len(batch["image"]))
            pred["text"] += texts
            explained += len(batch["image"]) if explain else 0
            for k in ("label", "box", "has_box", "cues", "category"):
                gt[k].append(torch.as_tensor(batch[k]).cpu())
            gt["editor"] += list(batch["editor"])
            gt["text"] += list(batch["text"])
        self.train(was_training)
        out_pred = {k: torch.cat(pred[k]).numpy() for k in keys}
        out_pred["text"] = pred["text"]
        out_gt = {k: torch.cat(gt[k]).numpy() for k in ("label", "box", "has_box", "cues", "category")}
        out_gt["editor"], out_gt["text"] = gt["editor"], gt["text"]
        return {"pred": out_pred, "gt": out_gt}

    def on_fit_start(self) -> None:
        from visadapt.adapters import count_parameters

        trainable, total = count_parameters(self)
        self.report.update(trainable_params=trainable, total_params=total)
        dm = self.trainer.datamodule
        for key, attr in (("train_editors", "seen_editors"), ("held_out_editors", "held_out_editors")):
            if hasattr(dm, attr):
                self.report[key] = list(getattr(dm, attr) or [])
        self._fit_started = time.perf_counter()

    def on_fit_end(self) -> None:
        self.report["train_seconds"] = round(self.resumed_train_seconds + time.perf_counter()
                                             - self._fit_started, 2)
        self.report["steps"] = int(self.global_step)
        dm = self.trainer.datamodule
        if int(self.lds_layer_selected) < 0:  # a run shorter than lds_at_step: select now, decoders untrained
            self.select_layer()
        loader = dm.test_dataloader()
        if isinstance(loader, (list, tuple)):
            loader = loader[0]
        preds = self.collect_predictions(loader, "ManipShield test", self.hparams.explain_eval_images)
        self.report["manipshield"] = score_predictions(preds["pred"], preds["gt"])
        if self.hparams.eval_ela:
            ela = ela_predictions(loader.dataset, limit=len(preds["gt"]["label"]))
            self.report["ela"] = score_predictions(ela["pred"], ela["gt"])
        self.report["examples"] = [
            {"editor": e, "label": int(y), "score": round(float(s), 4), "reference": r, "generated": g}
            for e, y, s, r, g in zip(preds["gt"]["editor"], preds["gt"]["label"], preds["pred"]["score"],
                                     preds["gt"]["text"], preds["pred"]["text"]) if g is not None][:6]
        for logger in self.trainer.loggers:
            flat = {f"{who}_{k}": v for who in ("manipshield", "ela") for k, v in
                    self.report.get(who, {}).get("overall", {}).items() if isinstance(v, float)}
            logger.log_metrics(flat, step=self.global_step)
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir
        if self.trainer.is_global_zero and log_dir:
            for logger in self.trainer.loggers:
                logger.save()
            md = write_manipulation_report(log_dir, self.report)
            print(md.read_text())
            print(f"report written to {md}")

    # -- loading a trained model ----------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str = "cpu") -> "ManipShield":
        """Rebuild a trained model from its checkpoint alone (hyperparameters, tokenizer, LDS layer, weights).

        Read with ``torch.load(weights_only=True)``; adapters are rebuilt from registered variants only. A
        checkpoint that lacks a trained tensor is an error.
        """
        ckpt = read_checkpoint(path)
        hp = dict(ckpt.get("hyper_parameters") or {})
        params = inspect.signature(cls.__init__).parameters
        kwargs = {k: v for k, v in hp.items() if k in params and k not in ("optimizer", "lr_scheduler")}
        kwargs["vision_adapter"] = config_from_dict(hp.get("vision_adapter"))
        kwargs["lm_adapter"] = config_from_dict(hp.get("lm_adapter"))
        if "lds_layer_selected" in hp and int(hp["lds_layer_selected"]) >= 0:
            kwargs["lds_layer"] = int(hp["lds_layer_selected"])
        model = cls(**kwargs)
        if model.vlm is None:
            raise ValueError(f"{path}: the checkpoint has no tokenizer; it was not written by a trained ManipShield")
        model.on_load_checkpoint(ckpt)
        model.load_state_dict(ckpt["state_dict"], strict=False)
        return model.to(map_location).eval()


# ---------------------------------------------------------------------------------------------------------------
# Scoring (shared by the model and the ELA baseline) and the report
# ---------------------------------------------------------------------------------------------------------------
def score_predictions(pred: dict[str, Any], gt: dict[str, Any]) -> dict[str, Any]:
    """Image ACC / F1 / AUC, box IoU and IoU >= 0.5 share, cue micro / macro F1 and explanation ROUGE-L, overall and
    per editor (each held-out editor scored with the authentic images of the same set as negatives)."""
    from visadapt.metrics import manipulation as mm

    labels, scores = np.asarray(gt["label"]), np.asarray(pred["score"], dtype=np.float64)
    editors = np.asarray(gt["editor"])

    def block(idx: np.ndarray) -> dict[str, float]:
        row: dict[str, float] = {"n": float(len(idx)), "n_manipulated": float(labels[idx].sum())}
        im = mm.image_metrics(scores[idx], labels[idx])  # AUC is nan when one class is missing
        row.update(acc=float(im["acc"]), f1=float(im["f1"]), auc=float(im["auc"]))
        has_box = np.asarray(gt["has_box"]).astype(bool)[idx]
        if pred.get("box") is not None and has_box.any():
            bm = mm.box_metrics(np.asarray(pred["box"])[idx], np.asarray(gt["box"])[idx], valid=has_box)
            row.update(box_iou=float(bm["iou"]), box_iou50=float(bm["iou50"]))
        if pred.get("cues") is not None:
            cm = mm.cue_f1(np.asarray(pred["cues"])[idx], np.asarray(gt["cues"])[idx])
            row.update(cue_f1_micro=float(cm["micro"]), cue_f1_macro=float(cm["macro"]))
        texts = [(pred["text"][i], gt["text"][i]) for i in idx
                 if pred.get("text") and i < len(pred["text"]) and pred["text"][i] is not None]
        if texts:
            from visadapt.metrics.text import mean_rouge_l

            row["rouge_l"] = float(mean_rouge_l([p for p, _ in texts], [r for _, r in texts]))
            row["n_explained"] = float(len(texts))
        return row

    out: dict[str, Any] = {"overall": block(np.arange(len(labels)))}
    authentic = np.flatnonzero(labels == 0)
    out["per_editor"] = {e: block(np.concatenate([authentic, np.flatnonzero(editors == e)]))
                         for e in sorted(set(editors[labels == 1].tolist()))}
    return out


def ela_predictions(dataset: Any, limit: int | None = None, **ela_kwargs: Any) -> dict[str, Any]:
    """The error-level-analysis baseline's predictions on ``dataset`` (a ManipulationDataset), in the layout
    :func:`score_predictions` reads (no cues, no explanations)."""
    from visadapt.methods.ela import ErrorLevelAnalysis

    ela = ErrorLevelAnalysis(**ela_kwargs)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    pred: dict[str, list] = {"score": [], "box": []}
    gt: dict[str, list] = {k: [] for k in ("label", "box", "has_box", "cues", "category", "editor", "text")}
    for i in tqdm(range(n), desc="ELA baseline", leave=False):
        item = dataset[i]
        p = ela.predict(dataset.sample(i)["image"])
        pred["score"].append(float(p["score"]))
        pred["box"].append(np.asarray(p["box"], dtype=np.float64) if p.get("box") is not None else np.zeros(4))
        for k in ("label", "has_box", "category", "editor", "text"):
            gt[k].append(item[k])
        gt["box"].append(item["box"].numpy())
        gt["cues"].append(item["cues"].numpy())
    return {"pred": {"score": np.asarray(pred["score"]), "box": np.stack(pred["box"]), "cues": None, "text": []},
            "gt": {**{k: np.asarray(v) for k, v in gt.items() if k not in ("editor", "text")},
                   "editor": gt["editor"], "text": gt["text"]}}


def write_manipulation_report(log_dir: str | Path, report: dict[str, Any]) -> Path:
    """``report.json`` plus a Markdown table (ManipShield vs ELA, overall and per held-out editor)."""
    md = write_report(log_dir, {k: v for k, v in report.items() if k not in ("manipshield", "ela", "examples", "lds")},
                      title="ManipShield report")
    cols = ("auc", "acc", "f1", "box_iou", "box_iou50", "cue_f1_micro", "cue_f1_macro", "rouge_l")
    lines = ["", "## Held-out editors: ManipShield vs error-level analysis", "",
             "| editor | method | n | " + " | ".join(cols) + " |", "|---" * (len(cols) + 3) + "|"]
    for editor in ["overall", *sorted((report.get("manipshield") or {}).get("per_editor", {}))]:
        for who in ("manipshield", "ela"):
            r = report.get(who) or {}
            row = r.get("overall") if editor == "overall" else r.get("per_editor", {}).get(editor)
            if row is None:
                continue
            cells = [f"{row[c]:.3f}" if isinstance(row.get(c), float) and not math.isnan(row[c]) else "–"
                     for c in cols]
            lines.append(f"| {editor} | {who} | {int(row['n'])} | " + " | ".join(cells) + " |")
    if "lds" in report:
        lines += ["", f"LDS: layer {report['lds']['layer']} (scores per layer {report['lds']['scores']})"]
    for ex in report.get("examples", []):
        lines += ["", f"- `{ex['editor']}` (score {ex['score']}): generated: {ex['generated']!r}; "
                      f"reference: {ex['reference']!r}"]
    (Path(log_dir) / "report.json").write_text(json.dumps(report, indent=2, default=str))
    md.write_text(md.read_text() + "\n".join(lines) + "\n")
    return md


__all__ = ["ManipShield", "config_from_dict", "config_to_dict", "contrastive_loss", "cxcywh_to_xyxy",
           "ela_predictions", "generalized_iou", "lda_separation", "score_predictions", "write_manipulation_report"]
