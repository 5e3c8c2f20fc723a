"""LightningDataModules over the dataset registry."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from visadapt.backbones.base import Preprocess
from visadapt.data._registry import DATASETS
from visadapt.data.base import LabeledImageDataset, collate
from visadapt.data.fewshot import FewShotSplit, base_novel_classes, make_fewshot_split, sample_per_class
from visadapt.data.transforms import build_transform

SUBSETS = ("all", "base", "novel")
TARGET_KEYS = ("dataset", "root", "dataset_kwargs", "split")


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
    class; each entry of ``eval_subsets`` becomes one test dataloader in which the subset's classes are relabelled
    0..m-1 and scored among themselves (base-to-novel). The selection depends on ``(dataset, shots, seed)`` only.

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
            images.
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
        self.classnames = list(train.classnames)
        classes = self.subset_classes(self.train_classes)
        if self.split_file and Path(self.split_file).is_file():
            split = FewShotSplit.load(self.split_file)
            if (split.dataset, split.shots, split.seed, split.classes) != (self.dataset, self.shots, self.seed,
                                                                             classes):
                raise ValueError(f"{self.split_file} holds a split for dataset={split.dataset} shots={split.shots} "
                                 f"seed={split.seed}, not for this run's {self.dataset}/{self.shots}/{self.seed}")
            if self.val_shots is not None and len(split.val) != self.val_shots * len(classes):
                raise ValueError(f"{self.split_file} holds {len(split.val)} validation images, not val_shots="
                                 f"{self.val_shots} per class; delete it or drop val_shots")
        else:
            split = make_fewshot_split(self.dataset, train.labels, val.labels if val else None, self.shots,
                                       self.seed, classes, val_shots=self.val_shots)
            if self.split_file:
                split.save(self.split_file)
        self.split = split
        train_tf = build_transform(self.preprocess, train=True, augment=self.augment)
        eval_tf = self.eval_transform = build_transform(self.preprocess, train=False)
        self.train_set = self._relabelled(train, split.train, self.train_classes)
        self.train_set.transform = train_tf
        self.val_set = self._relabelled(val if val else train, split.val, self.train_classes)
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
        return DataLoader(ds, batch_size=self.batch_size if train else self.eval_batch_size, shuffle=train,
                          drop_last=False, num_workers=self.num_workers, collate_fn=collate,
                          persistent_workers=self.num_workers > 0, generator=generator)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(self.test_sets[s], False) for s in self.test_names]

    def predict_dataloader(self) -> list[DataLoader]:
        return self.test_dataloader()
