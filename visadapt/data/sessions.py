"""Incremental-session splits for few-shot class-incremental learning (FSCIL).

A split is a list of sessions: session 0 holds the *base* classes (with all, or a limited number of, their training
images), every later session adds ``way`` new classes with ``shot`` training images each. It is a function of
``(dataset, seed)`` and the split settings alone: every random choice uses a private
``numpy.random.default_rng([seed, ...])``, never the global random state. A split is saved to and read from JSON
(:meth:`SessionSplit.save` / :meth:`SessionSplit.load`) so that a run can be reproduced elsewhere.

Two ways to get a split:

* :func:`read_cec_index_files`: the community's session index files (CEC, Zhang et al. CVPR'21; reused by CoACT and
  most FSCIL papers): ``session_1.txt`` lists the base-session training images, ``session_k.txt`` (k >= 2) the
  ``way x shot`` images of incremental session k-1. A line is either an integer index into the training set
  (CIFAR-100) or an image path whose file name identifies the image (miniImageNet ``.../n0153282900000005.jpg``,
  CUB ``CUB_200_2011/images/001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg``).
* :func:`make_session_split`: the documented rule used when no index files are given. Classes are taken in their
  natural label order (CEC / CoACT: CIFAR-100 ``fine_label`` order, miniImageNet sorted wnids, CUB class id - 1) or
  in a seeded random order; the first ``base_classes`` form session 0 and each following block of ``way`` classes
  one session; ``shot`` training images per novel class are drawn with ``default_rng([seed, 0, class])``; base
  classes keep all their training images unless ``base_shot`` limits them (drawn the same way). Because each class
  has its own generator, the shots of a class do not depend on which other classes are in the split.

Standard benchmark settings are registered by dataset name (:data:`SESSION_SPLITS`): CIFAR-100 and miniImageNet
60 base classes + 8 sessions of 5-way 5-shot, CUB-200 100 + 10 x 10-way 5-shot, Fashion-MNIST 6 + 4 x 1-way 5-shot.
Any other registered dataset is split generically by giving ``base_classes``, ``way`` and ``shot``.

Labels: sessions are defined on the dataset's own labels; :meth:`SessionSplit.label_map` renames them to
``0 .. C-1`` in session order so that "the classes seen after session t" are the labels ``< seen_classes(t)``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from visadapt.data.base import LabeledImageDataset, collate
from visadapt.registry import Registry

SPLIT_FORMAT_VERSION = 1


@dataclass(frozen=True)
class SessionSpec:
    """Standard session structure of a benchmark (class counts and shots)."""

    base_classes: int
    """Classes in session 0."""
    way: int
    """New classes per incremental session."""
    shot: int
    """Training images per new class."""
    sessions: int
    """Number of incremental sessions (session 0 not counted)."""
    base_shot: int | None = None
    """Training images per base class; ``None`` keeps all (the standard FSCIL base session)."""


SESSION_SPLITS: Registry = Registry("session split")
"""Dataset name -> :class:`SessionSpec` of its standard FSCIL benchmark."""

SESSION_SPLITS.register("cifar100", help="CEC/CoACT: 60 base classes + 8 sessions of 5-way 5-shot")(
    SessionSpec(60, 5, 5, 8))
SESSION_SPLITS.register("mini_imagenet", help="CEC/CoACT: 60 base classes + 8 sessions of 5-way 5-shot")(
    SessionSpec(60, 5, 5, 8))
SESSION_SPLITS.register("cub200", help="CEC/CoACT: 100 base classes + 10 sessions of 10-way 5-shot")(
    SessionSpec(100, 10, 5, 10))
CEC_BENCHMARKS: dict[str, int] = {"cifar100": 9, "mini_imagenet": 9, "cub200": 11}
"""Datasets whose standard sessions come from CEC's index files, and how many files (sessions) they have."""

SESSION_SPLITS.register("fashion_mnist", help="visadapt CPU task: 6 base classes + 4 sessions of 1-way 5-shot")(
    SessionSpec(6, 1, 5, 4))


@dataclass
class SessionSplit:
    """A reproducible FSCIL split: which classes and which training images make up each session.

    Indices refer to the dataset's ``train`` split (``train``) and ``test`` split (``test``) in their own order; class
    ids are the dataset's own labels.
    """

    dataset: str
    seed: int
    session_classes: list[list[int]]
    """Dataset labels introduced in each session; session 0 = base classes."""
    train: list[list[int]]
    """Training-set indices used in each session."""
    test: list[int] | None = None
    """Test-set indices evaluated (restricted to the split's classes); ``None`` = every test image of those classes."""
    way: int = 0
    shot: int = 0
    base_shot: int | None = None
    source: str = "generated"
    """``generated`` (the documented rule) or ``index_files:<folder>``."""
    format_version: int = SPLIT_FORMAT_VERSION
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.session_classes) != len(self.train):
            raise ValueError(f"{len(self.session_classes)} sessions of classes but {len(self.train)} of train indices")
        seen: set[int] = set()
        for t, classes in enumerate(self.session_classes):
            if not classes:
                raise ValueError(f"session {t} has no class")
            dup = seen.intersection(classes)
            if dup:
                raise ValueError(f"classes {sorted(dup)} of session {t} already appeared in an earlier session")
            seen.update(classes)

    # -- structure ----------------------------------------------------------------------------------------------
    @property
    def num_sessions(self) -> int:
        """Sessions in total, the base session included."""
        return len(self.session_classes)

    @property
    def num_base_classes(self) -> int:
        return len(self.session_classes[0])

    @property
    def class_order(self) -> list[int]:
        """Dataset labels in session order; position = the label used during training and evaluation."""
        return [c for classes in self.session_classes for c in classes]

    @property
    def num_classes(self) -> int:
        return sum(len(c) for c in self.session_classes)

    def label_map(self) -> dict[int, int]:
        """Dataset label -> session-order label ``0 .. num_classes-1``."""
        return {c: i for i, c in enumerate(self.class_order)}

    def seen_classes(self, session: int) -> int:
        """Number of classes seen after ``session`` (they are the session-order labels ``0 .. n-1``)."""
        if not 0 <= session < self.num_sessions:
            raise IndexError(f"session {session} out of range 0..{self.num_sessions - 1}")
        return sum(len(c) for c in self.session_classes[: session + 1])

    def test_indices(self, test_labels: Sequence[int], session: int) -> list[int]:
        """Test-set indices of the classes seen after ``session``, grouped by class in session order."""
        wanted = self.class_order[: self.seen_classes(session)]
        pool = range(len(test_labels)) if self.test is None else self.test
        by_class: dict[int, list[int]] = defaultdict(list)
        for i in pool:
            by_class[int(test_labels[i])].append(int(i))
        return [i for c in wanted for i in by_class.get(c, [])]

    # -- JSON ---------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SessionSplit:
        version = data.get("format_version", SPLIT_FORMAT_VERSION)
        if version != SPLIT_FORMAT_VERSION:
            raise ValueError(f"session split format version {version} is not supported (expected "
                             f"{SPLIT_FORMAT_VERSION})")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        """Write the split as JSON (one session per line for the index lists, so diffs stay readable)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> SessionSplit:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"session split file not found: {path}")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{path} is not a session split file ({e}); expected the keys dataset, seed, "
                             "session_classes, train, test, way, shot, base_shot, source") from None

    def describe(self) -> str:
        inc = self.num_sessions - 1
        return (f"{self.dataset}: {self.num_base_classes} base classes + {inc} sessions of {self.way}-way "
                f"{self.shot}-shot ({self.source}, seed {self.seed}); train images per session "
                f"{[len(t) for t in self.train]}")


# ---------------------------------------------------------------------------------------------------------------
# The documented rule
# ---------------------------------------------------------------------------------------------------------------
def _test_subsample(session_classes, test_labels, test_per_class: int | None, seed: int) -> list[int] | None:
    """``test_per_class`` seeded test images of every session class (``None``: the whole test set is used)."""
    if test_per_class is None:
        return None
    if test_labels is None:
        raise ValueError("test_per_class needs test_labels")
    test_by_class = _by_class(test_labels)
    return [i for cl in session_classes for c in cl for i in _draw(test_by_class.get(c, []), test_per_class,
                                                                   [seed, 3, c])]


def _by_class(labels: Sequence[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        out[int(y)].append(i)
    return out


def _draw(items: list[int], k: int | None, rng_key: list[int]) -> list[int]:
    """``k`` of ``items`` (sorted) drawn with ``default_rng(rng_key)``; all of them when ``k`` is None or too big."""
    if k is None or k <= 0 or len(items) <= k:
        return sorted(items)
    rng = np.random.default_rng(rng_key)
    return sorted(int(items[j]) for j in rng.choice(len(items), size=k, replace=False))


def make_session_split(dataset: str, train_labels: Sequence[int], seed: int, base_classes: int, way: int, shot: int,
                       sessions: int | None = None, base_shot: int | None = None,
                       test_labels: Sequence[int] | None = None, test_per_class: int | None = None,
                       class_order: Literal["natural", "shuffled"] = "natural",
                       classes: Sequence[int] | None = None) -> SessionSplit:
    """Split a labelled dataset into a base session and ``way``-way ``shot``-shot incremental sessions.

    Args:
        dataset: Name recorded in the split.
        train_labels: Label of every training image.
        seed: The only source of randomness (class order when shuffled, shots, test subset).
        base_classes: Classes in session 0.
        way: New classes per incremental session.
        shot: Training images per new class.
        sessions: Incremental sessions; default as many full sessions as the classes allow.
        base_shot: Training images per base class; ``None`` keeps all of them.
        test_labels: Labels of the test split; needed only with ``test_per_class``.
        test_per_class: Evaluate on at most this many test images per class (drawn with the seed); ``None`` = all.
        class_order: ``natural`` (sorted labels, the CEC/CoACT rule) or ``shuffled`` with the seed.
        classes: Restrict to these labels (default: every label present in ``train_labels``).
    """
    by_class = _by_class(train_labels)
    pool = sorted(by_class) if classes is None else sorted(int(c) for c in classes)
    missing = [c for c in pool if c not in by_class]
    if missing:
        raise ValueError(f"classes {missing} have no training image in {dataset}")
    if class_order == "shuffled":
        pool = [pool[j] for j in np.random.default_rng([seed, 2]).permutation(len(pool))]
    elif class_order != "natural":
        raise ValueError(f"class_order must be 'natural' or 'shuffled', got {class_order!r}")
    if base_classes < 1 or way < 1 or shot < 1:
        raise ValueError(f"base_classes, way and shot must be >= 1 (got {base_classes}, {way}, {shot})")
    max_sessions = (len(pool) - base_classes) // way
    if sessions is None:
        sessions = max_sessions
    if sessions < 0 or sessions > max_sessions:
        raise ValueError(f"{dataset} has {len(pool)} classes: {base_classes} base classes leave room for at most "
                         f"{max_sessions} sessions of {way} classes, not {sessions}")
    session_classes = [pool[:base_classes]] + [pool[base_classes + s * way: base_classes + (s + 1) * way]
                                               for s in range(sessions)]
    train = [[i for c in session_classes[0] for i in _draw(by_class[c], base_shot, [seed, 1, c])]]
    for classes_t in session_classes[1:]:
        train.append([i for c in classes_t for i in _draw(by_class[c], shot, [seed, 0, c])])
    for c in (c for cl in session_classes[1:] for c in cl):
        if len(by_class[c]) < shot:
            raise ValueError(f"class {c} of {dataset} has only {len(by_class[c])} training images, fewer than "
                             f"shot={shot}")
    test = _test_subsample(session_classes, test_labels, test_per_class, seed)
    return SessionSplit(dataset=dataset, seed=seed, session_classes=[list(map(int, c)) for c in session_classes],
                        train=train, test=test, way=way, shot=shot, base_shot=base_shot, source="generated",
                        meta={"class_order": class_order, "test_per_class": test_per_class})


# ---------------------------------------------------------------------------------------------------------------
# CEC session index files
# ---------------------------------------------------------------------------------------------------------------
_SESSION_FILE = re.compile(r"session_(\d+)\.txt")


def _sample_keys(train_set: Any) -> dict[str, int]:
    """File name -> index for datasets whose samples are files (``describe(i)`` returns the path)."""
    keys: dict[str, int] = {}
    dup: set[str] = set()
    for i in range(len(train_set)):
        name = Path(str(train_set.describe(i))).name
        if name in keys:
            dup.add(name)
        keys[name] = i
    for name in dup:  # ambiguous file names cannot identify a sample
        keys.pop(name, None)
    return keys


def read_cec_index_files(index_dir: str | Path, train_set: Any, dataset: str = "", seed: int = 0,
                         test_labels: Sequence[int] | None = None,
                         test_per_class: int | None = None) -> SessionSplit:
    """Read CEC's ``session_1.txt`` .. ``session_N.txt`` into a :class:`SessionSplit`.

    Args:
        index_dir: Folder with the files (e.g. CEC's ``data/index_list/cifar100``).
        train_set: The training split they index; needs ``.labels`` and, for path lines, ``describe(i)`` returning
            the image path.
        dataset: Name recorded in the split.
        seed: Recorded; only used to draw the test subset when ``test_per_class`` is given.
        test_labels, test_per_class: As in :func:`make_session_split`.

    The classes of a session are the labels of its lines, in sorted order. ``way`` and ``shot`` are read off the
    incremental files.
    """
    index_dir = Path(index_dir)
    if not index_dir.is_dir():
        raise FileNotFoundError(f"session index folder not found: {index_dir} (expected session_1.txt, "
                                "session_2.txt, ... as in CEC's data/index_list/<dataset>/)")
    numbers = sorted(int(m.group(1)) for p in index_dir.iterdir() if (m := _SESSION_FILE.fullmatch(p.name)))
    if not numbers or numbers != list(range(1, len(numbers) + 1)):
        raise FileNotFoundError(f"{index_dir}: expected consecutive session_1.txt .. session_N.txt, found "
                                f"{[f'session_{n}.txt' for n in numbers] or 'none'}")
    labels = list(train_set.labels)
    path_keys: dict[str, int] | None = None
    session_classes: list[list[int]] = []
    train: list[list[int]] = []
    for n in numbers:
        path = index_dir / f"session_{n}.txt"
        indices: list[int] = []
        for lineno, raw in enumerate(path.read_text().splitlines(), 1):
            line = raw.strip()
            if not line:
                continue
            if line.isdigit():
                idx = int(line)
                if idx >= len(labels):
                    raise ValueError(f"{path}:{lineno}: index {idx} is out of range for a training set of "
                                     f"{len(labels)} images")
            else:
                if path_keys is None:
                    path_keys = _sample_keys(train_set)
                name = Path(line.replace("\\", "/")).name
                if name not in path_keys:
                    raise ValueError(f"{path}:{lineno}: no training image named {name!r} in {dataset or 'the dataset'}")
                idx = path_keys[name]
            indices.append(idx)
        if not indices:
            raise ValueError(f"{path} lists no image")
        train.append(indices)
        session_classes.append(sorted({int(labels[i]) for i in indices}))
    inc = train[1:]
    way = len(session_classes[1]) if inc else 0
    shot = max((len(t) // max(len(c), 1) for t, c in zip(inc, session_classes[1:])), default=0)
    test = _test_subsample(session_classes, test_labels, test_per_class, seed)
    return SessionSplit(dataset=dataset, seed=seed, session_classes=session_classes, train=train, test=test,
                        way=way, shot=shot, base_shot=None, source=f"index_files:{index_dir}",
                        meta={"test_per_class": test_per_class})


def write_cec_index_files(split: SessionSplit, index_dir: str | Path, train_set: Any | None = None,
                          as_paths: bool = False) -> list[Path]:
    """Write ``split`` as ``session_1.txt`` .. files (integer indices, or ``describe(i)`` paths with ``as_paths``)."""
    index_dir = Path(index_dir)
    index_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for n, indices in enumerate(split.train, 1):
        lines = [str(train_set.describe(i)) if as_paths else str(i) for i in indices]
        path = index_dir / f"session_{n}.txt"
        path.write_text("\n".join(lines) + "\n")
        out.append(path)
    return out


def build_session_split(dataset: str, train_set: Any, seed: int = 0, *, base_classes: int | None = None,
                        way: int | None = None, shot: int | None = None, sessions: int | None = None,
                        base_shot: int | None = None, test_labels: Sequence[int] | None = None,
                        test_per_class: int | None = None,
                        class_order: Literal["natural", "shuffled"] = "natural",
                        index_dir: str | Path | None = None,
                        split_rule: Literal["auto", "generated"] = "auto") -> SessionSplit:
    """The split of ``dataset``: from CEC index files when ``index_dir`` is given, else by the documented rule.

    Settings left ``None`` come from the dataset's registered :class:`SessionSpec` (an error names the missing
    settings when the dataset has none). For CEC's benchmarks (:data:`CEC_BENCHMARKS`) the index files are the
    default: without ``index_dir`` the generated rule needs ``split_rule="generated"``, and missing files are an
    error that names them.
    """
    if index_dir is None and dataset in CEC_BENCHMARKS and split_rule != "generated":
        raise FileNotFoundError(
            f"{dataset} is a CEC benchmark: its sessions come from CEC's session files session_1.txt .. "
            f"session_{CEC_BENCHMARKS[dataset]}.txt (data/index_list/{dataset}/ in CEC's repository). Set "
            f"data.index_dir to their folder, or opt in to the generated rule (CEC's class blocks, seeded shots) "
            f"with data.split_rule=generated")
    if index_dir is not None:
        index_dir = Path(index_dir)
        expected = CEC_BENCHMARKS.get(dataset)
        missing = [] if expected is None else [f"session_{n}.txt" for n in range(1, expected + 1)
                                                if not (index_dir / f"session_{n}.txt").is_file()]
        if missing:
            raise FileNotFoundError(
                f"CEC session files missing in {index_dir}: {', '.join(missing)} (expected session_1.txt .. "
                f"session_{expected}.txt from CEC's data/index_list/{dataset}/). Put them there, or opt in to the "
                f"generated rule with data.index_dir=null data.split_rule=generated")
        split = read_cec_index_files(index_dir, train_set, dataset, seed, test_labels, test_per_class)
        if base_shot is not None:
            by_class = _by_class([train_set.labels[i] for i in split.train[0]])
            split.train[0] = sorted(split.train[0][j] for c in split.session_classes[0]
                                    for j in _draw(by_class[c], base_shot, [seed, 1, c]))
            split.base_shot = base_shot
        return split
    spec = SESSION_SPLITS.get(dataset) if dataset in SESSION_SPLITS else None
    values = {"base_classes": base_classes, "way": way, "shot": shot}
    if spec is not None:
        values = {k: (v if v is not None else getattr(spec, k)) for k, v in values.items()}
        sessions = spec.sessions if sessions is None and (base_classes, way) == (None, None) else sessions
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise ValueError(f"dataset {dataset!r} has no registered session structure; give {', '.join(missing)} "
                         f"(registered: {', '.join(SESSION_SPLITS.names())})")
    return make_session_split(dataset, train_set.labels, seed, values["base_classes"], values["way"],
                              values["shot"], sessions=sessions, base_shot=base_shot, test_labels=test_labels,
                              test_per_class=test_per_class, class_order=class_order)


# ---------------------------------------------------------------------------------------------------------------
# Seeds, views and the per-session DataModule
# ---------------------------------------------------------------------------------------------------------------
def derive_seed(seed: int, *keys: int | str) -> int:
    """A 32-bit seed (what Lightning's ``seed_everything`` accepts) that depends only on ``seed`` and ``keys``."""
    parts = [int(seed)] + [k if isinstance(k, int) else int(hashlib.sha256(k.encode()).hexdigest()[:8], 16)
                           for k in keys]
    return int(np.random.SeedSequence(parts).generate_state(1, dtype=np.uint32)[0])


class MultiView:
    """Apply a random transform ``n`` times: the sample's ``image`` becomes a list of ``n`` views."""

    def __init__(self, transform: Callable, n: int) -> None:
        self.transform, self.n = transform, n

    def __call__(self, image: Any) -> list[torch.Tensor]:
        return [self.transform(image) for _ in range(self.n)]


class EpochSeededSampler(Sampler[int]):
    """A random order of ``range(n)`` that depends only on ``(seed, epoch)``; Lightning calls :meth:`set_epoch`.

    Resuming at an epoch boundary therefore reproduces the uninterrupted run's order.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class SessionDataModule(pl.LightningDataModule):
    """The training data of one FSCIL session at a time (the runner calls :meth:`set_session` before each fit).

    Args:
        train_set: The dataset's training split.
        split: The session split.
        train_transform: Augmentation of training images (applied ``num_views`` times).
        eval_transform: Transform of the class-mean (prototype) pass.
        seed: Run seed; session ``k``'s order in epoch ``e`` is seeded from ``(seed, k, e)``.
        batch_size: Training batch size.
        eval_batch_size: Batch size of the prototype pass.
        num_views: Augmented views per training image.
        exclude: Training indices left out (unreadable images under ``on_bad_image: skip``).
    """

    def __init__(self, train_set: LabeledImageDataset, split: SessionSplit, train_transform: Callable,
                 eval_transform: Callable, seed: int = 0, batch_size: int = 64, eval_batch_size: int = 100,
                 num_views: int = 1, exclude: set[int] | None = None) -> None:
        super().__init__()
        self.train_set, self.split = train_set, split
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self.seed, self.batch_size, self.eval_batch_size, self.num_views = seed, batch_size, eval_batch_size, \
            num_views
        self.exclude = set(exclude or ())
        self.session = 0
        self.label_map = split.label_map()
        self.classnames = [train_set.classnames[c] for c in split.class_order]

    def set_session(self, session: int) -> None:
        self.session = session
        indices = [i for i in self.split.train[session] if i not in self.exclude]
        self.train_view = self.train_set.subset(indices, self.label_map, self.classnames)
        self.train_view.transform = MultiView(self.train_transform, self.num_views) if self.num_views > 1 \
            else self.train_transform
        self.proto_view = self.train_set.subset(indices, self.label_map, self.classnames)
        self.proto_view.transform = self.eval_transform

    def train_dataloader(self) -> DataLoader:
        sampler = EpochSeededSampler(len(self.train_view), derive_seed(self.seed, "order", self.session))
        # its own generator: creating the iterator draws from it, never from the global RNG
        return DataLoader(self.train_view, batch_size=self.batch_size, sampler=sampler, num_workers=0,
                          collate_fn=collate, generator=torch.Generator().manual_seed(0))

    def prototype_dataloader(self) -> DataLoader:
        return DataLoader(self.proto_view, batch_size=self.eval_batch_size, shuffle=False, num_workers=0,
                          collate_fn=collate)


__all__ = [
    "CEC_BENCHMARKS", "SESSION_SPLITS", "EpochSeededSampler", "MultiView", "SessionDataModule", "SessionSpec",
    "SessionSplit", "build_session_split", "derive_seed", "make_session_split", "read_cec_index_files",
    "write_cec_index_files",
]
