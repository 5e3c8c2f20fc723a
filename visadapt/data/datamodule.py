"""LightningDataModules over the dataset registry, and the interface a few-shot method relies on.

:class:`FewShotData` is that interface (a ``typing.Protocol``): what :class:`~visadapt.methods.ClipFewShot` reads
from its datamodule. :class:`FewShotDataModule` implements it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from visadapt.backbones.base import Preprocess
from visadapt.data._registry import DATASETS
from visadapt.data.base import LabeledImageDataset, ResumableDataLoader, collate
from visadapt.data.fewshot import DRAWS, SHORT_CLASS_RULES, FewShotSplit, base_novel_classes, draw_fewshot, \
    sample_per_class
from visadapt.data.transforms import build_transform

SUBSETS = ("all", "base", "novel")
TARGET_KEYS = ("dataset", "root", "dataset_kwargs", "split")
EVAL_SPLITS = ("train", "val")


@runtime_checkable
class FewShotData(Protocol):
    """What a few-shot classification method reads from its datamodule (``trainer.datamodule``).

    Attributes:
        dataset: Registered name of the training dataset (it picks the prompt templates).
        shots: Training images per class (K).
        train_classes: The class subset trained on: ``all``, ``base`` or ``novel``.
        val_source: Where the validation images come from (``val split`` or ``held-out training images ...``);
            anything chosen on them (the linear probe's C, hyperparameters) is chosen there, never on test images.
        train_set: The K-shot training images (training transform).
        val_set: The validation images (evaluation transform).
        split: The few-shot selection (draw rule, seed, indices, shots used per class).
    """

    dataset: str
    shots: int
    train_classes: str
    val_source: str
    train_set: LabeledImageDataset
    val_set: LabeledImageDataset
    split: FewShotSplit

    @property
    def test_names(self) -> list[str]:
        """Names of the test sets, in the order of :meth:`test_dataloader`."""

    def subset_classes(self, subset: str) -> list[int]:
        """Labels of a class subset (``all``, ``base``, ``novel``)."""

    def subset_classnames(self, subset: str) -> list[str]:
        """Class names of a subset, in the order of its relabelled targets."""

    def test_classnames(self, name: str) -> list[str]:
        """Class names of a test set, in the order of its labels."""

    def test_dataset_name(self, name: str) -> str:
        """Registered dataset behind a test set."""

    def test_dataloader(self) -> list[DataLoader]:
        """One loader per test set, in the order of :attr:`test_names`."""

    def eval_dataloader(self, split: str) -> DataLoader:
        """The K-shot ``train`` or the ``val`` images with the evaluation transform, in a fixed order."""


def _check_targets(targets: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Validate ``targets`` up front so that a typo fails before any model is built."""
    out = {}
    for name, spec in targets.items():
        if name in SUBSETS:
            raise ValueError(f"target name {name!r} clashes with a class subset name {SUBSETS}; rename it")
        if not isinstance(spec, dict) or "dataset" not in spec:
            raise ValueError(f"target {name!r} needs a mapping with at least 'dataset', e.g. "
                             f"{{dataset: fashion_mnist, dataset_kwargs: {{invert: false}}}}; got {spec!r}")
        unknown = set(spec) - set(TARGET_KEYS)
        if unknown:
            raise ValueError(f"target {name!r}: unknown key(s) {sorted(unknown)}; allowed: {TARGET_KEYS}")
        if spec["dataset"] not in DATASETS:
            raise ValueError(f"target {name!r}: unknown dataset {spec['dataset']!r}; available: "
                             f"{', '.join(DATASETS.names())}")
        out[name] = {"root": None, "dataset_kwargs": {}, "split": "test", **spec}
    return out


class FewShotDataModule(pl.LightningDataModule):
    """K-shot classification data from any registered dataset, with CoOp's protocols.

    Training uses ``shots`` images per class of the ``train_classes`` subset; validation ``min(shots, 4)`` per
    class, drawn by the rule of ``draw`` (CoOp's by default, see :mod:`visadapt.data.fewshot`); each entry of
    ``eval_subsets`` becomes one test dataloader in which the subset's classes are relabelled 0..m-1 and scored
    among themselves (base-to-novel). The selection depends on ``(dataset, shots, seed, draw)`` only.

    Args:
        dataset: Registered dataset name (``python -m visadapt list datasets``).
        root: Dataset folder; ``None`` uses the dataset's default location.
        dataset_kwargs: Extra keyword arguments of the dataset builder (e.g. ``{invert: true}``).
        shots: Training images per class (K); ``0`` or less uses every training image.
        seed: Seed of the few-shot selection (independent of the training seed).
        train_classes: ``all``, ``base`` (first half of the sorted labels) or ``novel``.
        eval_subsets: Test sets to build, each one of ``all``, ``base``, ``novel``.
        targets: Transfer test sets for cross-dataset and domain-generalisation evaluation, ``{name: {dataset,
            root, dataset_kwargs, split}}`` (``split`` defaults to ``test``). Each is scored among its own classes
            with its own prompts, after the ``eval_subsets``; ``test_per_class`` caps it too.
        val_split: Name of the dataset's validation split, or ``None`` to draw validation shots from unused training
            images. A val split that holds the test images (ImageNet's) is never used: the validation shots then
            come from unused training images too, so that nothing is chosen on test images (``val_source``).
        val_shots: Validation images per class; ``None`` keeps CoOp's ``min(K, 4)``. A larger value gives a
            held-out set on which to choose hyperparameters (never the test set); training shots are unchanged.
        test_split: Name of the dataset's test split.
        test_per_class: Cap on test images per class (a seeded subsample) to keep CPU runs short; ``None`` = all.
        test_seed: Seed of that test subsample; fixed apart from ``seed`` so that every seed of a sweep is scored
            on the same test images.
        batch_size: Training batch size.
        eval_batch_size: Batch size of validation and test.
        num_workers: DataLoader worker processes.
        augment: Training augmentation: ``coop``, ``light`` or ``none``.
        split_file: JSON file of the few-shot selection: read when it exists, written otherwise.
        draw: Few-shot draw: ``coop`` (CoOp / CoCoOp / Dassl, the default) or ``clip_lora`` (CLIP-LoRA's code: val
            first, repeats for short classes); see :mod:`visadapt.data.fewshot`.
        short_classes: A class with fewer images than asked: ``error`` (default, names the class and the counts),
            ``keep`` (use what there is; the shots used per class go to the report) or ``repeat`` (fill with
            repeats, CLIP-LoRA's ``random.choices``).
        image_size: Override the backbone's input size (e.g. smaller for low-resolution data on CPU); ``None``
            keeps the size the weights expect.
        preprocess: Image size and normalisation; linked from the model's backbone by the CLI.
    """

    def __init__(
        self,
        dataset: str = "fashion_mnist",
        root: str | None = None,
        dataset_kwargs: dict[str, Any] | None = None,
        shots: int = 16,
        seed: int = 1,
        train_classes: str = "all",
        eval_subsets: list[str] | None = None,
        targets: dict[str, dict[str, Any]] | None = None,
        val_split: str | None = None,
        val_shots: int | None = None,
        test_split: str = "test",
        test_per_class: int | None = None,
        test_seed: int = 1,
        batch_size: int = 32,
        eval_batch_size: int = 128,
        num_workers: int = 0,
        augment: str = "coop",
        split_file: str | None = None,
        image_size: int | None = None,
        draw: str = "coop",
        short_classes: str = "error",
        preprocess: Preprocess | None = None,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"Unknown dataset {dataset!r}; available: {', '.join(DATASETS.names())}")
        eval_subsets = list(eval_subsets or ["all"])
        for s in [train_classes, *eval_subsets]:
            if s not in SUBSETS:
                raise ValueError(f"class subset must be one of {SUBSETS}, got {s!r}")
        self.dataset, self.root, self.dataset_kwargs = dataset, root, dict(dataset_kwargs or {})
        self.shots, self.seed, self.train_classes, self.eval_subsets = shots, seed, train_classes, eval_subsets
        self.targets = _check_targets(dict(targets or {}))
        self.val_split, self.test_split, self.test_per_class = val_split, test_split, test_per_class
        self.test_seed, self.val_shots = test_seed, val_shots
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.augment, self.split_file = augment, split_file
        if draw not in DRAWS:
            raise ValueError(f"data.draw must be one of {DRAWS}, got {draw!r}")
        if short_classes not in SHORT_CLASS_RULES:
            raise ValueError(f"data.short_classes must be one of {SHORT_CLASS_RULES}, got {short_classes!r}")
        self.draw, self.short_classes = draw, short_classes
        self.val_source = "not built yet"
        self.preprocess = preprocess or Preprocess()
        if image_size is not None:
            self.preprocess = replace(self.preprocess, image_size=image_size)
        self.classnames: list[str] = []
        self._built = False

    # -- building -----------------------------------------------------------------------------------------------
    def _load(self, split: str) -> LabeledImageDataset:
        return DATASETS.get(self.dataset)(root=self.root, split=split, **self.dataset_kwargs)

    def subset_classes(self, subset: str) -> list[int]:
        base, novel = base_novel_classes(len(self.classnames))
        return {"all": list(range(len(self.classnames))), "base": base, "novel": novel}[subset]

    def subset_classnames(self, subset: str) -> list[str]:
        """Class names of a subset, in the order of its relabelled targets."""
        return [self.classnames[c] for c in self.subset_classes(subset)]

    @property
    def test_names(self) -> list[str]:
        """Names of the test sets, in the order of :meth:`test_dataloader`: the class subsets, then the targets."""
        return [*self.eval_subsets, *self.targets]

    def test_classnames(self, name: str) -> list[str]:
        """Class names of a test set, in the order of its labels."""
        return self._target_classnames[name] if name in self.targets else self.subset_classnames(name)

    def test_dataset_name(self, name: str) -> str:
        """Registered dataset behind a test set (it picks the prompt templates)."""
        return self.targets[name]["dataset"] if name in self.targets else self.dataset

    def _relabelled(self, ds: LabeledImageDataset, indices: list[int], subset: str) -> LabeledImageDataset:
        classes = self.subset_classes(subset)
        return ds.subset(indices, {c: i for i, c in enumerate(classes)}, [self.classnames[c] for c in classes])

    def setup(self, stage: str | None = None) -> None:
        if self._built:
            return
        train = self._load("train")
        val = self._load(self.val_split) if self.val_split else None
        test = self._load(self.test_split)
        self.val_source = "val split"
        if val is not None and holds_test_images(val, test, self.val_split, self.test_split):
            # ImageNet's val split is its test set: validating there would choose things on test images
            val = None
            self.val_source = (f"held-out training images (the '{self.val_split}' split of {self.dataset} holds its "
                               "test images)")
        elif val is None:
            self.val_source = "held-out training images"
        self.classnames = list(train.classnames)
        classes = self.subset_classes(self.train_classes)
        if self.split_file and Path(self.split_file).is_file():
            split = FewShotSplit.load(self.split_file)
            if (split.dataset, split.shots, split.seed, split.classes, split.draw) != (
                    self.dataset, self.shots, self.seed, classes, self.draw):
                raise ValueError(f"{self.split_file} holds a split for dataset={split.dataset} shots={split.shots} "
                                 f"seed={split.seed} draw={split.draw}, not for this run's {self.dataset}/"
                                 f"{self.shots}/{self.seed}/{self.draw}")
            if self.val_shots is not None and len(split.val) != self.val_shots * len(classes):
                raise ValueError(f"{self.split_file} holds {len(split.val)} validation images, not val_shots="
                                 f"{self.val_shots} per class; delete it or drop val_shots")
            if split.val_from_train != (val is None):
                raise ValueError(f"{self.split_file} takes its validation images from "
                                 f"{'the training images' if split.val_from_train else 'a val split'}, this run "
                                 f"from {self.val_source}; delete it or change val_split")
        else:
            split = draw_fewshot(self.dataset, train.labels, val.labels if val else None, self.shots, self.seed,
                                 classes, val_shots=self.val_shots, draw=self.draw, short_classes=self.short_classes,
                                 classnames=self.classnames)
            if self.split_file:
                split.save(self.split_file)
        self.split = split
        train_tf = build_transform(self.preprocess, train=True, augment=self.augment)
        eval_tf = self.eval_transform = build_transform(self.preprocess, train=False)
        self.train_set = self._relabelled(train, split.train, self.train_classes)
        self.train_set.transform = train_tf
        self.val_set = self._relabelled(val if val is not None else train, split.val, self.train_classes)
        self.val_set.transform = eval_tf
        self.test_sets = {}
        for subset in self.eval_subsets:
            keep = set(self.subset_classes(subset))
            idx = [i for i, y in enumerate(test.labels) if y in keep]
            if self.test_per_class:
                sub = sample_per_class([test.labels[i] for i in idx], self.test_per_class, self.test_seed)
                idx = [idx[j] for j in sub]
            self.test_sets[subset] = self._relabelled(test, idx, subset)
            self.test_sets[subset].transform = eval_tf
        self._target_classnames: dict[str, list[str]] = {}
        for name, spec in self.targets.items():
            ds = DATASETS.get(spec["dataset"])(root=spec["root"], split=spec["split"], **spec["dataset_kwargs"])
            idx = list(range(len(ds)))
            if self.test_per_class:
                idx = sample_per_class(ds.labels, self.test_per_class, self.test_seed)
            self.test_sets[name] = ds.subset(idx)
            self.test_sets[name].transform = eval_tf
            self._target_classnames[name] = list(ds.classnames)
        self._built = True

    # -- loaders ------------------------------------------------------------------------------------------------
    def _loader(self, ds: LabeledImageDataset, train: bool) -> DataLoader:
        # Every DataLoader iterator draws a seed from its generator, the global RNG by default: evaluation loaders
        # get their own, so that validating (or not) leaves the training run's dropout and augmentation unchanged.
        generator = None if train else torch.Generator().manual_seed(0)
        # the training loader can be checkpointed mid-epoch (same order and random draws after a resume)
        return (ResumableDataLoader if train else DataLoader)(
                          ds, batch_size=self.batch_size if train else self.eval_batch_size, shuffle=train,
                          drop_last=False, num_workers=self.num_workers, collate_fn=collate,
                          persistent_workers=self.num_workers > 0, generator=generator)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def eval_dataloader(self, split: str) -> DataLoader:
        """The K-shot ``train`` images or the ``val`` images with the evaluation transform, in a fixed order.

        Used for image features of the frozen baselines (class mean, linear probe) and the validation accuracy.
        """
        if split not in EVAL_SPLITS:
            raise ValueError(f"eval_dataloader: split must be one of {EVAL_SPLITS}, got {split!r}")
        ds = self.train_set if split == "train" else self.val_set
        view = ds.subset(range(len(ds)))
        view.transform = self.eval_transform
        return self._loader(view, False)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(self.test_sets[s], False) for s in self.test_names]

    def predict_dataloader(self) -> list[DataLoader]:
        return self.test_dataloader()


def holds_test_images(val: LabeledImageDataset, test: LabeledImageDataset, val_split: str | None,
                      test_split: str) -> bool:
    """Whether the val split is (or shares images with) the test split, e.g. ImageNet's ``val``."""
    if val_split == test_split:
        return True
    if getattr(val, "val_is_test", False):
        return True
    paths_v, paths_t = getattr(val, "paths", None), getattr(test, "paths", None)
    if paths_v is not None and paths_t is not None:
        return not set(map(str, paths_v)).isdisjoint(map(str, paths_t))
    return False
