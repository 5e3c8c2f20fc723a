"""Few-shot classification with CLIP-style dual encoders and low-rank adapters.

Logits are a fixed scale times the cosine similarity between image features and the text features of one prompt
per class (CLIP-LoRA). The adapter is any registered :class:`~visadapt.adapters.AdapterConfig` (LoRA, Block-LoRA,
Comp-LoRA, ...); its ``target`` is a regular expression or a preset name of the backbone (``python -m visadapt list
backbones``), so it can cover the vision tower, the text tower or both. When the text tower carries trainable
adapters its features are recomputed at every step; otherwise they are computed once and cached.

During ``fit`` the module also measures, on every test subset of the datamodule:

* ``zeroshot``: the pretrained model (adapters disabled) with the template ensemble when ``eval_ensemble``;
* ``class_mean``: a nearest-class-mean classifier on frozen image features of the K-shot training images;
* ``linear_probe``: logistic regression on the same features (``C`` chosen on the validation images, which are
  never test images: where a dataset's val split is its test set, they are held-out training images; the report
  says which under ``linear_probe_C_chosen_on``);
* ``adapted``: the final (last-step) adapted model — nothing is selected on test data.

These numbers go to the run's report (``report.json`` / ``report.md``) and to the logger, with the templates each
test set's zero-shot row used (``zeroshot_templates``) and the few-shot draw (``few_shot``).

The training length can follow the shot count: ``iters_per_shot`` sets ``max_steps = iters_per_shot x K`` (CLIP-LoRA
trains 500 x K iterations), in ``fit`` and in every cell of a ``sweep`` over shots.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from tqdm.auto import tqdm

from visadapt.adapters import AdapterConfig, adapter_layers, disable_adapters, inject
from visadapt.backbones import Backbone, DualEncoder, build_backbone, to_device
from visadapt.data.datamodule import FewShotData
from visadapt.methods.base import AdapterModule, PlainKwargs
from visadapt.metrics import top1
from visadapt.report import write_report


def _top1(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 in percent (the report's unit)."""
    return top1(scores, labels, percent=True)


def config_to_dict(config: Any) -> dict[str, Any] | None:
    """A dataclass config as a ``class_path`` / ``init_args`` dict (what the CLI writes), ``None`` stays."""
    if config is None:
        return None
    return {"class_path": f"{type(config).__module__}.{type(config).__qualname__}", "init_args": asdict(config)}


def default_templates(dataset: str, ensemble: bool) -> list[str]:
    """The dataset's CoOp template (or the ensemble) when templates are known, else ``a photo of a {}.``."""
    try:
        from visadapt.data.templates import get_templates
    except ImportError:
        return ["a photo of a {}."]
    return get_templates(dataset, ensemble=ensemble)


class ClipFewShot(AdapterModule):
    """CLIP-style few-shot adaptation with a low-rank adapter on either or both towers.

    Args:
        backbone: Registered dual-encoder backbone (``python -m visadapt list backbones``).
        backbone_kwargs: Keyword arguments of the backbone builder (e.g. ``pretrained: /path/to/weights``).
        adapter: Adapter configuration; its ``target`` may name a backbone preset. ``None`` trains nothing (only
            the zero-shot and class-mean baselines are measured).
        templates: Prompt templates with one ``{}``; ``None`` uses the dataset's CoOp template.
        eval_ensemble: Average the text features of the dataset's template ensemble for zero-shot evaluation.
        logit_scale: Temperature; ``None`` uses the backbone's own (100 for CLIP).
        label_smoothing: Label smoothing of the cross-entropy.
        eval_baselines: Measure zero-shot and class-mean accuracy at the start of fit.
        optimizer: Optimiser over trainable parameters.
        lr_scheduler: Scheduler; ``None`` uses the built-in cosine schedule.
        schedule: Built-in schedule (``cosine`` or ``constant``).
        warmup_steps: Warm-up steps of the built-in schedule.
        min_lr: Final learning rate of the cosine schedule.
        iters_per_shot: Train for ``iters_per_shot x K`` optimiser steps (K = the datamodule's ``shots``), replacing
            the trainer's ``max_steps`` and ``max_epochs``; CLIP-LoRA's budget is 500. ``None`` keeps the trainer's.
    """

    def __init__(
        self,
        backbone: str = "devise_effnet_minilm",
        backbone_kwargs: PlainKwargs | None = None,
        adapter: AdapterConfig | None = None,
        templates: list[str] | None = None,
        eval_ensemble: bool = False,
        logit_scale: float | None = None,
        label_smoothing: float = 0.0,
        eval_baselines: bool = True,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        schedule: str = "cosine",
        warmup_steps: int = 0,
        min_lr: float = 1e-6,
        iters_per_shot: int | None = None,
    ) -> None:
        super().__init__(optimizer, lr_scheduler, schedule, warmup_steps, min_lr)
        if iters_per_shot is not None and iters_per_shot < 1:
            raise ValueError(f"model.iters_per_shot must be >= 1 (or null), got {iters_per_shot}")
        self.iters_per_shot = iters_per_shot
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "adapter"])
        # configs as plain class_path/init_args dicts: checkpoints stay loadable with weights_only=True
        self.hparams["adapter"] = config_to_dict(adapter)
        bb: Backbone = build_backbone(backbone, **(backbone_kwargs or {}))
        if not isinstance(bb.model, DualEncoder):
            raise TypeError(f"backbone {backbone!r} is not a dual encoder (it builds {type(bb.model).__name__})")
        self.backbone_info = bb
        self.model: DualEncoder = bb.model
        self.preprocess = bb.preprocess
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.adapter_cfg = adapter
        if adapter is not None:
            self.injection = inject(self.model, replace(adapter, target=bb.resolve_target(adapter.target)))
        self.templates = templates
        self.eval_ensemble = eval_ensemble
        self.scale = float(logit_scale if logit_scale is not None else self.model.logit_scale)
        self.label_smoothing = label_smoothing
        self.eval_baselines = eval_baselines
        self.report: dict[str, Any] = {"backbone": bb.identity}
        self._text_cache: dict[tuple, torch.Tensor] = {}
        self._text_adapted: bool | None = None

    # -- text side ------------------------------------------------------------------------------------------------
    @property
    def datamodule(self) -> FewShotData:
        """The trainer's datamodule; it must offer the :class:`~visadapt.data.datamodule.FewShotData` interface."""
        return self.trainer.datamodule

    def setup(self, stage: str) -> None:
        """Apply ``iters_per_shot`` before the optimiser and its schedule are built (they read ``max_steps``)."""
        if stage != "fit" or self.iters_per_shot is None:
            return
        shots = self.datamodule.shots
        if shots < 1:
            raise ValueError(f"model.iters_per_shot needs data.shots >= 1 (K), got shots={shots}")
        if self.trainer.fast_dev_run:  # a smoke test keeps its single step
            return
        steps = self.iters_per_shot * shots
        self.trainer.fit_loop.epoch_loop.max_steps = steps  # what trainer.max_steps reads
        self.trainer.fit_loop.max_epochs = -1
        self.report["max_steps"] = steps

    def _templates(self, ensemble: bool, dataset: str | None = None) -> list[str]:
        if self.templates:
            return list(self.templates)
        return default_templates(dataset or self.datamodule.dataset, ensemble)

    def text_features(self, classnames: list[str], ensemble: bool = False, dataset: str | None = None) -> torch.Tensor:
        """L2-normalised class embeddings ``(C, D)``; averaged over templates, then renormalised.

        ``dataset`` picks the templates (default: the training dataset; transfer targets use their own).
        """
        templates = self._templates(ensemble, dataset)
        key = (tuple(classnames), tuple(templates))
        if key in self._text_cache:
            return self._text_cache[key]
        names = [c.replace("_", " ") for c in classnames]
        prompts = [t.format(c) for c in names for t in templates]
        tokens = to_device(self.model.tokenize(prompts), self.device)
        feats = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
        feats = F.normalize(feats.view(len(names), len(templates), -1).mean(1), dim=-1)
        if not self.text_tower_trains():  # nothing trainable in the text tower: compute once
            self._text_cache[key] = feats.detach()
        return feats

    def test_text(self, name: str, ensemble: bool = False) -> torch.Tensor:
        """Class embeddings of a test set (class subset or transfer target) with its dataset's templates."""
        dm = self.datamodule
        return self.text_features(dm.test_classnames(name), ensemble, dm.test_dataset_name(name))

    def text_tower_trains(self) -> bool:
        """Whether a trainable parameter reaches the text features (probed once with a one-word prompt)."""
        if self._text_adapted is None:
            if any(not layer.enabled for _, layer in adapter_layers(self.model)):
                raise RuntimeError("text_tower_trains() must first be probed with the adapters enabled")
            # forked RNG: the probe must not shift the dropout masks of the passes that follow (the GLAD companion)
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.enable_grad(), torch.random.fork_rng(devices=devices):
                probe = self.model.encode_text(to_device(self.model.tokenize(["a"]), self.device))
            self._text_adapted = bool(probe.requires_grad)
        return self._text_adapted

    def logits(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        img = F.normalize(self.model.encode_image(images).float(), dim=-1)
        return self.scale * img @ text.t()

    # -- training -------------------------------------------------------------------------------------------------
    def loss_on(self, batch: dict[str, Any]) -> torch.Tensor:
        text = self.text_features(self.datamodule.subset_classnames(self.datamodule.train_classes))
        loss = F.cross_entropy(self.logits(batch["image"], text), batch["label"], label_smoothing=self.label_smoothing)
        extra = self.adapter_regularisation()  # the adapters' own loss terms (REGULARISERS), if any
        return loss if extra is None else loss + extra

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.loss_on(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["label"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        text = self.text_features(self.datamodule.subset_classnames(self.datamodule.train_classes))
        acc = top1(self.logits(batch["image"], text), batch["label"])
        self.log("val_acc", acc, prog_bar=True, batch_size=len(batch["label"]), sync_dist=True)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        subset = self.datamodule.test_names[dataloader_idx]
        text = self.test_text(subset)
        acc = top1(self.logits(batch["image"], text), batch["label"])
        self.log(f"test_acc_{subset}", acc, batch_size=len(batch["label"]), add_dataloader_idx=False, sync_dist=True)

    # -- whole-set evaluation used for the report -----------------------------------------------------------------
    @torch.no_grad()
    def image_features(self, loader, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
        feats, labels = [], []
        # fast_dev_run is a smoke test: one batch of each evaluation is enough
        limit = 1 if self.trainer.fast_dev_run else None
        for i, batch in enumerate(tqdm(loader, desc=desc, leave=False, disable=not self.trainer.is_global_zero)):
            if limit is not None and i >= limit:
                break
            feats.append(F.normalize(self.model.encode_image(batch["image"].to(self.device)).float(), dim=-1))
            labels.append(batch["label"].to(self.device))
        if not feats:  # an empty split (e.g. no image left for validation shots)
            return torch.zeros(0, 0, device=self.device), torch.zeros(0, dtype=torch.long, device=self.device)
        return torch.cat(feats), torch.cat(labels)

    @torch.no_grad()
    def evaluate(self, tag: str, ensemble: bool = False) -> dict[str, float]:
        """Top-1 (%) of the current model on every test set: the class subsets, then the transfer targets."""
        was_training = self.training
        self.eval()
        dm, out = self.datamodule, {}
        for subset, loader in zip(dm.test_names, dm.test_dataloader()):
            feats, labels = self.image_features(loader, f"{tag} {subset}")
            text = self.test_text(subset, ensemble)
            out[subset] = _top1(feats @ text.t(), labels)
        self.train(was_training)
        return out

    @torch.no_grad()
    def validation_accuracy(self) -> float | None:
        """Top-1 (%) of the current model on the validation shots: the number to choose hyperparameters on."""
        dm = self.datamodule
        if len(dm.val_set) == 0:
            return None
        was_training = self.training
        self.eval()
        feats, labels = self.image_features(dm.eval_dataloader("val"), "adapted val")
        text = self.text_features(dm.subset_classnames(dm.train_classes))
        self.train(was_training)
        return _top1(feats @ text.t(), labels)

    @torch.no_grad()
    def frozen_baselines(self) -> dict[str, dict[str, float]]:
        """Baselines on the frozen model (adapters disabled), sharing one pass of test features per subset.

        * ``zeroshot``: text classifier from the prompts (template ensemble when ``eval_ensemble``);
        * ``class_mean``: nearest normalised class mean of the K-shot image features (eval transform);
        * ``linear_probe``: multinomial logistic regression on the K-shot features, its inverse regularisation
          ``C`` picked from {0.1, 1, 10, 100} on the validation images (never test images: the datamodule takes
          them from held-out training images where a val split is the test set).

        The two feature baselines exist only on the subset whose classes were trained (``all``, or ``base`` in
        base-to-novel); transfer targets get the zero-shot baseline only.
        """
        from sklearn.linear_model import LogisticRegression

        dm, out = self.datamodule, {"zeroshot": {}, "class_mean": {}, "linear_probe": {}}
        # probe (and remember) whether the text tower trains while the adapters are still enabled: probed inside
        # disable_adapters it would read "frozen", and training would then reuse cached text features
        self.text_tower_trains()
        was_training = self.training
        self.eval()
        with disable_adapters(self.model):
            tr_f, tr_y = self.image_features(dm.eval_dataloader("train"), "K-shot features")
            va_f, va_y = self.image_features(dm.eval_dataloader("val"), "val features")
            n = len(dm.subset_classes(dm.train_classes))
            onehot = F.one_hot(tr_y, n).float()  # sums / counts: a class absent from a truncated run stays 0
            means = F.normalize((onehot.t() @ tr_f) / onehot.sum(0).clamp_min(1).unsqueeze(1), dim=-1)
            probe = None
            if len(set(tr_y.tolist())) > 1:
                x, y, xv, yv = tr_f.cpu().numpy(), tr_y.cpu().numpy(), va_f.cpu().numpy(), va_y.cpu().numpy()
                if len(yv):
                    fits = [LogisticRegression(C=c, max_iter=2000).fit(x, y) for c in (0.1, 1.0, 10.0, 100.0)]
                    probe = max(fits, key=lambda m: (m.score(xv, yv), -m.C))  # ties: the stronger regulariser
                    chosen_on = dm.val_source
                else:  # no validation images to choose C on: sklearn's default
                    probe = LogisticRegression(C=1.0, max_iter=2000).fit(x, y)
                    chosen_on = "not chosen (no validation image): sklearn's default C=1"
                self.report["linear_probe_C"] = probe.C
                self.report["linear_probe_C_chosen_on"] = chosen_on
            for subset, loader in zip(dm.test_names, dm.test_dataloader()):
                f, y = self.image_features(loader, f"frozen {subset}")
                text = self.test_text(subset, self.eval_ensemble)
                out["zeroshot"][subset] = _top1(f @ text.t(), y)
                if subset == dm.train_classes:
                    out["class_mean"][subset] = _top1(f @ means.t(), y)
                    if probe is not None:
                        pred = torch.as_tensor(probe.predict(f.cpu().numpy()), device=y.device)
                        out["linear_probe"][subset] = _top1(pred, y)
        self._text_cache.clear()  # text features of the disabled model must not serve the adapted one
        self.train(was_training)
        return {k: v for k, v in out.items() if v}

    def on_fit_start(self) -> None:
        from visadapt.adapters import count_parameters

        trainable, total = count_parameters(self.model)
        dm = self.datamodule
        self.report.update(trainable_params=trainable, total_params=total,
                           adapter=None if self.adapter_cfg is None else type(self.adapter_cfg).__name__)
        split = dm.split
        self.report["few_shot"] = {"draw": split.draw, "shots": split.shots, "seed": split.seed,
                                   "short_classes": split.short_classes, "validation": dm.val_source,
                                   "train_images": len(split.train), "val_images": len(split.val)}
        if split.shots_used:  # classes that got fewer distinct images than asked: {class: [train, val]}
            names = dm.subset_classnames("all")
            self.report["few_shot"]["shots_used"] = {names[int(c)]: n for c, n in split.shots_used.items()}
        self.report["zeroshot_templates"] = {
            name: self._templates(self.eval_ensemble, dm.test_dataset_name(name)) for name in dm.test_names}
        if self.eval_baselines:
            self.report.update(self.frozen_baselines())
        self._fit_started = time.perf_counter()

    def on_fit_end(self) -> None:
        self.report["train_seconds"] = round(self.resumed_train_seconds + time.perf_counter() - self._fit_started, 2)
        self.report["steps"] = self.global_step
        self._text_cache.clear()
        self.report["adapted"] = self.evaluate("adapted")
        self.report["adapted_val_acc"] = self.validation_accuracy()
        for key in ("zeroshot", "class_mean", "linear_probe", "adapted"):
            for subset, acc in self.report.get(key, {}).items():
                # on_fit_end cannot call self.log; loggers receive the numbers directly
                for logger in self.trainer.loggers:
                    logger.log_metrics({f"{key}_acc_{subset}": acc}, step=self.global_step)
        # a collective under DDP: every rank must ask; fast_dev_run has no logger directory
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir
        if self.trainer.is_global_zero and log_dir:
            for logger in self.trainer.loggers:
                logger.save()
            md = write_report(log_dir, self.report, title=f"{type(self).__name__} report")
            print(md.read_text())
            print(f"report written to {md}")
