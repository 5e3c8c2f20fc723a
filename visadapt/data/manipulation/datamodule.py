"""The manipulation-detection DataModule: editor hold-out, twin groups kept together, one collate.

Groups: an authentic image and its edited twins share a ``pair_id``; every split (train / val / test) is made of
whole groups, so no photo crop is on both sides of a split. :class:`TwinBatchSampler` puts whole groups into a batch,
which gives a contrastive loss its hard pairs (real image and edit) inside one batch.
"""

from __future__ import annotations

import inspect
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from visadapt.backbones.base import Preprocess
from visadapt.data._registry import DATASETS
from visadapt.data.base import ResumableDataLoader, collate
from visadapt.data.manipulation.dataset import ManipulationDataset, ManipulationTransform
from visadapt.data.manipulation.vocab import AUTHENTIC, EDITORS

log = logging.getLogger(__name__)

AUGMENTS = ("none", "flip")


def twin_groups(ds: ManipulationDataset) -> list[list[int]]:
    """Indices grouped by ``pair_id`` (an item without one is its own group), in order of first appearance."""
    groups: dict[Any, list[int]] = {}
    for i, r in enumerate(ds.records):
        groups.setdefault(r.pair_id if r.pair_id >= 0 else ("single", i), []).append(i)
    return list(groups.values())


def keep_editors(ds: ManipulationDataset, groups: list[list[int]], editors: Sequence[str] | None) -> list[list[int]]:
    """Within ``groups``, keep the edits by ``editors`` (all when ``None``) and the authentic images of groups that
    keep an edit or never had one (so held-out editors do not leave their real twins behind unbalanced)."""
    names = ds.editors
    out = []
    for g in groups:
        edits = [i for i in g if ds.records[i].label == 1]
        kept = [i for i in edits if editors is None or names[i] in editors]
        if kept or not edits:
            out.append([i for i in g if ds.records[i].label == 0] + kept)
    return [g for g in out if g]


class TwinBatchSampler(Sampler[list[int]]):
    """Batches made of whole twin groups: ``batch_size // (largest group)`` groups per batch, group order shuffled
    every epoch from ``seed`` and the epoch number (Lightning calls :meth:`set_epoch`; without it every iteration
    advances the epoch). The number of batches is the same every epoch."""

    def __init__(self, groups: Sequence[Sequence[int]], batch_size: int, shuffle: bool = True, seed: int = 0) -> None:
        if not groups:
            raise ValueError("TwinBatchSampler: no groups")
        self.groups = [list(g) for g in groups]
        self.per_batch = max(1, batch_size // max(len(g) for g in self.groups))
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self._epoch_set = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._epoch_set = epoch, True

    def __len__(self) -> int:
        return (len(self.groups) + self.per_batch - 1) // self.per_batch

    def __iter__(self) -> Iterator[list[int]]:
        order = list(range(len(self.groups)))
        if self.shuffle:
            order = torch.randperm(len(order), generator=torch.Generator().manual_seed(self.seed * 100003 +
                                                                                       self.epoch)).tolist()
        if not self._epoch_set:
            self.epoch += 1
        self._epoch_set = False
        for b in range(0, len(order), self.per_batch):
            yield [i for k in order[b:b + self.per_batch] for i in self.groups[k]]


class ManipulationDataModule(pl.LightningDataModule):
    """Manipulation data for detection / localisation / explanation, with editors held out for testing.

    Training and validation come from the dataset's ``train_split``, the test set from its ``test_split``; when both
    read the same images (a single JSON file), whole groups are held out as the test set instead: those with edits by
    ``test_editors`` when given, else a random ``test_fraction`` of them.
    ``val_fraction`` of the training groups form the validation set. Editors: the training and validation sets keep
    the edits of ``train_editors``, the test set those of ``test_editors`` (each ``None``: every editor but the other
    list's), together with the authentic twins of the kept edits. For ``generated_manipulations`` the editors and
    image counts go to the generator itself, so every test group is edited by a held-out editor.

    Args:
        dataset: Registered dataset (``generated_manipulations``, ``manipulation_json``, ``imdl_folder``,
            ``manipbench_folder``).
        root: Dataset root (a cache folder for the generator, a JSON file or a folder for the readers).
        dataset_kwargs: Extra keyword arguments of the dataset builder (e.g. ``{size: 128}`` for the generator).
        image_size: Side the images and masks are resized to; ``None`` uses the backbone's input size.
        batch_size: Training batch size (images; with ``pair_twins`` whole groups fill it).
        eval_batch_size: Validation / test batch size.
        num_workers: DataLoader worker processes.
        train_editors: Editors whose edits are trained on (``None``: all but ``test_editors``).
        test_editors: Held-out editors the test set is made of (``None``: all but ``train_editors``).
        num_images: Authentic images (groups) for training + validation: the generator makes that many; a dataset on
            disk is subsampled to that many groups (seeded). ``None``: the builder's default / everything.
        test_images: The same for the test set (``None``: ``num_images // 2``, at least 1, or everything).
        val_fraction: Share of the training groups held out for validation.
        test_fraction: Share of the groups held out for testing when there is no separate test split and no
            ``test_editors``.
        seed: Seed of the generator (when the dataset takes one), the subsampling, the splits and the batch order.
        pair_twins: Training batches hold whole twin groups (real image and its edits) for contrastive hard pairs;
            ``False``: plain shuffled batches. Not for multi-process (DDP) training, whose sampler would split them.
        augment: Training augmentation: ``none`` or ``flip`` (horizontal flip of image, mask and box).
        train_split: Dataset split that training and validation come from.
        test_split: Dataset split that the test set comes from.
        preprocess: Image size and normalisation; linked from the model's backbone by the CLI.
    """

    def __init__(
        self,
        dataset: str = "generated_manipulations",
        root: str | None = None,
        dataset_kwargs: dict[str, Any] | None = None,
        image_size: int | None = None,
        batch_size: int = 16,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        train_editors: list[str] | None = None,
        test_editors: list[str] | None = None,
        num_images: int | None = None,
        test_images: int | None = None,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        seed: int = 0,
        pair_twins: bool = True,
        augment: str = "none",
        train_split: str = "train",
        test_split: str = "test",
        preprocess: Preprocess | None = None,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; available: {', '.join(DATASETS.names())}")
        if augment not in AUGMENTS:
            raise ValueError(f"data.augment must be one of {AUGMENTS}, got {augment!r}")
        for name, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= v < 1.0:
                raise ValueError(f"data.{name} must be in [0, 1), got {v}")
        overlap = sorted(set(train_editors or []) & set(test_editors or []))
        if overlap:
            raise ValueError(f"editor(s) {overlap} are both trained on and held out; train_editors and test_editors "
                             "must be disjoint")
        self.dataset, self.root, self.dataset_kwargs = dataset, root, dict(dataset_kwargs or {})
        self.image_size, self.batch_size, self.eval_batch_size = image_size, batch_size, eval_batch_size
        self.num_workers = num_workers
        self.train_editors = list(train_editors) if train_editors is not None else None
        self.test_editors = list(test_editors) if test_editors is not None else None
        self.num_images, self.test_images = num_images, test_images
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed
        self.pair_twins, self.augment = pair_twins, augment
        self.train_split, self.test_split = train_split, test_split
        self.preprocess = preprocess or Preprocess()
        self.test_source = "not built yet"
        self._built = False

    # -- building -----------------------------------------------------------------------------------------------
    def _builder_args(self) -> set[str] | None:
        builder = DATASETS.get(self.dataset)
        params = inspect.signature(getattr(builder, "__wrapped__", builder)).parameters
        return set(params)

    def _load(self, split: str, editors: list[str] | None, count: int | None) -> ManipulationDataset:
        accepted = self._builder_args() or set()
        kwargs = dict(self.dataset_kwargs)
        if "editors" in accepted and editors is not None:
            kwargs.setdefault("editors", editors)
        if "num_images" in accepted and count is not None:
            kwargs.setdefault("num_images", count)
        if "seed" in accepted:
            kwargs.setdefault("seed", self.seed)
        ds = DATASETS.get(self.dataset)(root=self.root, split=split, **kwargs)
        if not isinstance(ds, ManipulationDataset):
            raise ValueError(f"dataset {self.dataset!r} is not a manipulation dataset (got {type(ds).__name__}); use "
                             "generated_manipulations, manipulation_json, imdl_folder or manipbench_folder")
        return ds

    def _subsample(self, groups: list[list[int]], count: int | None, salt: int) -> list[list[int]]:
        if count is None or count >= len(groups):
            return groups
        rng = np.random.default_rng([self.seed, salt])
        return [groups[i] for i in sorted(rng.choice(len(groups), count, replace=False))]

    def _fit_editors(self) -> list[str] | None:
        """Editors trained on: ``train_editors``, else every generator editor but ``test_editors``, else all."""
        if self.train_editors is not None:
            return self.train_editors
        if self.test_editors is not None:
            return [e for e in EDITORS if e not in self.test_editors]
        return None

    def setup(self, stage: str | None = None) -> None:
        if self._built:
            return
        fit_editors = self._fit_editors()
        train_pool = self._load(self.train_split, fit_editors, self.num_images)
        test_count = self.test_images if self.test_images is not None else (
            max(1, self.num_images // 2) if self.num_images else None)
        test_pool = self._load(self.test_split, self.test_editors, test_count)
        train_groups = self._subsample(twin_groups(train_pool), self.num_images, 1)
        if not set(train_pool.paths).isdisjoint(test_pool.paths):
            # one source for both (a single JSON file): hold out whole groups for testing; with held-out editors,
            # the groups holding their edits (all of them), otherwise a random test_fraction of the groups
            test_pool = train_pool
            names = train_pool.editors
            if self.test_editors is not None:
                held = [any(names[i] in self.test_editors for i in g) for g in train_groups]
                self.test_source = f"the groups of the '{self.train_split}' split with edits by {self.test_editors}"
            else:
                order = np.random.default_rng([self.seed, 2]).permutation(len(train_groups))
                chosen = set(order[:max(1, round(self.test_fraction * len(train_groups)))].tolist())
                held = [i in chosen for i in range(len(train_groups))]
                self.test_source = f"{self.test_fraction:.0%} of the groups of the '{self.train_split}' split"
            test_groups = [g for g, h in zip(train_groups, held) if h]
            train_groups = [g for g, h in zip(train_groups, held) if not h]
        else:
            test_groups = self._subsample(twin_groups(test_pool), test_count, 3)
            self.test_source = f"the '{self.test_split}' split"
        if fit_editors is not None and self.train_editors is None:  # a dataset on disk may have other editors
            present = {e for e, r in zip(train_pool.editors, train_pool.records) if r.label == 1}
            fit_editors = sorted(present - set(self.test_editors or []))
        train_groups = keep_editors(train_pool, train_groups, fit_editors)
        test_groups = keep_editors(test_pool, test_groups, self.test_editors)
        rng = np.random.default_rng([self.seed, 4])
        order = rng.permutation(len(train_groups))
        n_val = round(self.val_fraction * len(train_groups))
        val_groups = [train_groups[i] for i in sorted(order[:n_val])]
        fit_groups = [train_groups[i] for i in sorted(order[n_val:])]
        if not fit_groups:
            raise ValueError(f"no training images left in {self.dataset} after the editor selection "
                             f"(train_editors={fit_editors}); check the editor names and num_images")
        if not test_groups:
            raise ValueError(f"no test images in {self.dataset} for test_editors={self.test_editors}")
        size = self.image_size or self.preprocess.image_size
        self.train_transform = ManipulationTransform(size, self.preprocess.mean, self.preprocess.std,
                                                     flip=self.augment == "flip")
        self.eval_transform = ManipulationTransform(size, self.preprocess.mean, self.preprocess.std)
        self.train_set, self.train_groups = self._flatten(train_pool, fit_groups, "train", self.train_transform)
        self.val_set, _ = self._flatten(train_pool, val_groups, "val", self.eval_transform)
        self.test_set, _ = self._flatten(test_pool, test_groups, "test", self.eval_transform)
        self.seen_editors = sorted({e for e in self.train_set.editors if e != AUTHENTIC})
        self.held_out_editors = sorted({e for e in self.test_set.editors if e != AUTHENTIC} - set(self.seen_editors))
        log.info("manipulation data: %s", self.summary())
        self._built = True

    @staticmethod
    def _flatten(pool: ManipulationDataset, groups: list[list[int]], name: str,
                 transform: ManipulationTransform) -> tuple[ManipulationDataset, list[list[int]]]:
        flat = [i for g in groups for i in g]
        ds = pool.select(flat, name=f"{pool.name}:{name}")
        ds.transform = transform
        pos, out = 0, []
        for g in groups:
            out.append(list(range(pos, pos + len(g))))
            pos += len(g)
        return ds, out

    def summary(self) -> dict[str, Any]:
        """Image counts per split and editor, the held-out editors and where the test set comes from."""
        out: dict[str, Any] = {}
        for name in ("train", "val", "test"):
            ds = getattr(self, f"{name}_set", None)
            if ds is not None:
                out[name] = dict(sorted(Counter(ds.editors).items()))
        out["held_out_editors"] = getattr(self, "held_out_editors", [])
        out["test_source"] = self.test_source
        return out

    # -- loaders ------------------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        kw = {"num_workers": self.num_workers, "collate_fn": collate, "persistent_workers": self.num_workers > 0}
        if self.pair_twins:
            sampler = TwinBatchSampler(self.train_groups, self.batch_size, shuffle=True, seed=self.seed)
            return DataLoader(self.train_set, batch_sampler=sampler, **kw)
        return ResumableDataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, **kw)

    def _eval_loader(self, ds: ManipulationDataset) -> DataLoader:
        return DataLoader(ds, batch_size=self.eval_batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=collate, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)


__all__ = ["AUGMENTS", "ManipulationDataModule", "TwinBatchSampler", "keep_editors",
           "twin_groups"]
