"""Few-shot sampling and base/novel class splits: functions of ``(labels, shots, seed)`` only, saved as JSON.

CoOp/Dassl sample K images per class with Python's ``random.sample`` after seeding the *global* generator, so
their selection depends on whatever consumed random numbers before. Here a private ``random.Random(seed)`` is used,
so the same ``(dataset, K, seed)`` always gives the same images, whatever the global state (documented difference).
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path


def sample_per_class(labels: Sequence[int], shots: int, seed: int, classes: Sequence[int] | None = None) -> list[int]:
    """Indices of ``shots`` samples per class (all of a class that has fewer, as Dassl's ``repeat=False``).

    Args:
        labels: Label of every sample.
        shots: Samples per class; ``<= 0`` keeps everything.
        seed: Seed of a private generator; the global random state is neither read nor changed.
        classes: Restrict to these labels (default: all present).
    """
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[int(y)].append(i)
    keep = sorted(by_class) if classes is None else sorted(int(c) for c in classes)
    rng = random.Random(seed)
    out: list[int] = []
    for c in keep:
        items = by_class.get(c, [])
        out.extend(items if shots <= 0 or len(items) <= shots else sorted(rng.sample(items, shots)))
    return out


def base_novel_classes(num_classes: int) -> tuple[list[int], list[int]]:
    """CoCoOp's rule: with labels sorted, base = the first ``ceil(n/2)``, novel = the rest."""
    n_base = math.ceil(num_classes / 2)
    return list(range(n_base)), list(range(n_base, num_classes))


@dataclass
class FewShotSplit:
    """A reproducible few-shot selection; write it with :meth:`save` and reuse it with :meth:`load`."""

    dataset: str
    shots: int
    seed: int
    classes: list[int]
    train: list[int] = field(default_factory=list)
    val: list[int] = field(default_factory=list)

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "FewShotSplit":
        try:
            data = json.loads(Path(path).read_text())
            return cls(**data)
        except FileNotFoundError:
            raise FileNotFoundError(f"few-shot split file not found: {path}") from None
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{path} is not a few-shot split file ({e}); expected keys "
                             "dataset, shots, seed, classes, train, val") from None


def make_fewshot_split(dataset: str, train_labels: Sequence[int], val_labels: Sequence[int] | None, shots: int,
                       seed: int, classes: Sequence[int] | None = None,
                       val_shots: int | None = None) -> FewShotSplit:
    """K shots per class from train and ``min(K, 4)`` per class from val (CoOp's rule).

    Without a val split, the validation shots come from the train images that were not picked. ``val_shots``
    replaces CoOp's ``min(K, 4)`` (e.g. a larger held-out set for choosing hyperparameters); the training shots do
    not depend on it.
    """
    classes = sorted(set(int(y) for y in train_labels)) if classes is None else sorted(classes)
    train = sample_per_class(train_labels, shots, seed, classes)
    if val_shots is None:
        val_shots = min(shots, 4) if shots > 0 else 4
    if val_labels is not None:
        val = sample_per_class(val_labels, val_shots, seed, classes)
    else:
        picked = set(train)
        rest = [i for i in range(len(train_labels)) if i not in picked]
        sub = sample_per_class([train_labels[i] for i in rest], val_shots, seed + 1_000_003, classes)
        val = [rest[j] for j in sub]
    return FewShotSplit(dataset, shots, seed, list(classes), train, val)
