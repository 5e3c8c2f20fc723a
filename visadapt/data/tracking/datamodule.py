"""``TrackingPairDataModule``: training / validation pairs for a tracker, and the sequences it is evaluated on."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from visadapt.data._registry import DATASETS
from visadapt.data.tracking.pairs import IMAGENET_MEAN, IMAGENET_STD, EpochPairSampler, PairConfig, TrackingPairDataset
from visadapt.data.tracking.sequence import TrackingDataset, TrackingSequence

SPEC_KEYS = ("dataset", "root", "split", "dataset_kwargs", "weight")


def build_tracking_dataset(spec: dict[str, Any]) -> TrackingDataset:
    """A registered tracking dataset from ``{"dataset": name, "root": ..., "split": ..., "dataset_kwargs": {...}}``."""
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"tracking dataset spec {spec} has unknown keys {unknown}; allowed: {', '.join(SPEC_KEYS)}")
    if "dataset" not in spec:
        raise ValueError(f"tracking dataset spec {spec} needs a 'dataset' (a registered name)")
    kwargs = dict(spec.get("dataset_kwargs") or {})
    if spec.get("root") is not None:
        kwargs["root"] = spec["root"]
    if spec.get("split") is not None:
        kwargs["split"] = spec["split"]
    ds = DATASETS.get(spec["dataset"])(**kwargs)
    if not isinstance(ds, TrackingDataset):
        raise ValueError(  # noqa: TRY004  (a configuration error: reported to the user as such)
            f"dataset {spec['dataset']!r} is not a tracking dataset (it returned {type(ds).__name__})")
    return ds


class TrackingPairDataModule(pl.LightningDataModule):
    """Template/search pairs for training a tracker, validation pairs, and the evaluation sequences.

    A batch is a dict of
    ``template`` ``(B, 3, T, T)`` and ``search`` ``(B, 3, S, S)`` float images normalised with ``mean`` / ``std``,
    ``template_box`` and ``search_box`` ``(B, 4)``: the object's box as ``(x0, y0, x1, y1)`` divided by the crop
    side (clipped to ``[0, 1]``).

    Datasets are given as specs ``{"dataset": <registered name>, "root": ..., "split": ..., "dataset_kwargs":
    {...}, "weight": 1.0}``; the default is the offline procedural generator (``tracking_synthetic``) with its
    train / val / test splits (disjoint object photos).

    Args:
        train: Training sources (each drawn with its ``weight``, then a sequence uniformly).
        val: Validation source (pairs drawn once, with crop jitter but no flips or colour changes), or ``None``.
        test: The sequences :meth:`test_sequences` returns (the tracker evaluation set), or ``None``.
        template_size: Template crop side (112; 196 for the 378 variants).
        search_size: Search crop side (224; 378).
        template_area_factor: SiamFC area factor of the template crop (2).
        search_area_factor: Of the search crop (4; 5 for the 378 variants).
        pairs_per_epoch: Pairs in one training epoch (LoRAT: 131,072).
        val_pairs: Validation pairs.
        batch_size: Pairs per batch (per process).
        num_workers: DataLoader workers.
        max_gap: Largest frame distance between template and search.
        scale_jitter: Search-crop scale jitter (0.25).
        translation_jitter: Search-crop translation jitter (3).
        min_object_size: Smallest visible object side in the search crop (pixels) a jittered draw may leave.
        flip_prob: Horizontal flip probability, per crop.
        color_jitter: Brightness / contrast / saturation jitter (0.4).
        three_augment: DeiT-III 3-augment on both crops.
        mean: Normalisation mean (ImageNet).
        std: Normalisation std (ImageNet).
        seed: Seed of the pair draws (pair ``i`` of epoch ``e`` depends on ``(seed, e, i)`` only).
    """

    def __init__(self, train: list[dict[str, Any]] | None = None, val: dict[str, Any] | None = None,
                 test: dict[str, Any] | None = None, template_size: int = 112, search_size: int = 224,
                 template_area_factor: float = 2.0, search_area_factor: float = 4.0, pairs_per_epoch: int = 1024,
                 val_pairs: int = 128, batch_size: int = 16, num_workers: int = 0, max_gap: int = 100,
                 scale_jitter: float = 0.25, translation_jitter: float = 3.0, min_object_size: float = 10.0,
                 flip_prob: float = 0.5, color_jitter: float = 0.4, three_augment: bool = True,
                 mean: tuple[float, float, float] = IMAGENET_MEAN, std: tuple[float, float, float] = IMAGENET_STD,
                 seed: int = 0) -> None:
        super().__init__()
        self.train_specs = train if train is not None else [{"dataset": "tracking_synthetic", "split": "train"}]
        self.val_spec = val if val is not None else {"dataset": "tracking_synthetic", "split": "val"}
        self.test_spec = test if test is not None else {"dataset": "tracking_synthetic", "split": "test"}
        for spec in [*self.train_specs, self.val_spec, self.test_spec]:
            unknown = sorted(set(spec) - set(SPEC_KEYS))
            if unknown:
                raise ValueError(f"tracking dataset spec {spec} has unknown keys {unknown}; allowed: "
                                 f"{', '.join(SPEC_KEYS)}")
        self.config = PairConfig(template_size=template_size, search_size=search_size,
                                 template_area_factor=template_area_factor, search_area_factor=search_area_factor,
                                 max_gap=max_gap, scale_jitter=scale_jitter, translation_jitter=translation_jitter,
                                 min_object_size=min_object_size, flip_prob=flip_prob, color_jitter=color_jitter,
                                 three_augment=three_augment, mean=tuple(mean), std=tuple(std))
        self.pairs_per_epoch, self.val_pairs = int(pairs_per_epoch), int(val_pairs)
        self.batch_size, self.num_workers, self.seed = int(batch_size), int(num_workers), int(seed)
        self._train: TrackingPairDataset | None = None
        self._val: TrackingPairDataset | None = None
        self._cache: dict[str, TrackingDataset] = {}

    # -- datasets -------------------------------------------------------------------------------------------------
    def _dataset(self, spec: dict[str, Any]) -> TrackingDataset:
        key = repr(sorted((k, repr(v)) for k, v in spec.items() if k != "weight"))
        if key not in self._cache:
            self._cache[key] = build_tracking_dataset({k: v for k, v in spec.items() if k != "weight"})
        return self._cache[key]

    def prepare_data(self) -> None:
        """Build (for the generator: write) every dataset once, on the first process."""
        for spec in [*self.train_specs, self.val_spec, self.test_spec]:
            if spec:
                self._dataset(spec)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self._train is None:
            sources = [self._dataset(s) for s in self.train_specs]
            weights = [float(s.get("weight", 1.0)) for s in self.train_specs]
            self._train = TrackingPairDataset(sources, weights, self.pairs_per_epoch, self.seed, self.config)
            if self.val_spec and self.val_pairs > 0:
                self._val = TrackingPairDataset([self._dataset(self.val_spec)], None, self.val_pairs,
                                                self.seed + 1, self.config, augment=False, fixed_epoch=0)

    @property
    def train_set(self) -> TrackingPairDataset:
        self.setup("fit")
        assert self._train is not None
        return self._train

    @property
    def val_set(self) -> TrackingPairDataset | None:
        self.setup("fit")
        return self._val

    def train_sequences(self) -> list[TrackingSequence]:
        """Every training sequence, over all sources."""
        return [s for spec in self.train_specs for s in self._dataset(spec)]

    def val_sequences(self) -> list[TrackingSequence]:
        """The validation sequences (empty without a val source)."""
        return list(self._dataset(self.val_spec)) if self.val_spec else []

    def test_sequences(self) -> list[TrackingSequence]:
        """The evaluation sequences (the ``test`` source)."""
        return list(self._dataset(self.test_spec)) if self.test_spec else []

    @property
    def test_dataset_name(self) -> str:
        """Registered name of the evaluation dataset (picks the metric convention)."""
        return str(self.test_spec.get("dataset", "")) if self.test_spec else ""

    # -- loaders --------------------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        ds = self.train_set
        return DataLoader(ds, batch_size=self.batch_size, sampler=EpochPairSampler(len(ds)),
                          num_workers=self.num_workers, drop_last=True, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader | list:
        ds = self.val_set
        if ds is None:
            return []
        return DataLoader(ds, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)


__all__ = ["TrackingPairDataModule", "build_tracking_dataset"]
