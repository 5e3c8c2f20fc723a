"""Few-shot selections as the papers draw them, base/novel class splits, and a JSON record of the selection.

Two draws are offered (``draw``), each reproducing one official code base exactly, on a private
``random.Random(seed)``: the global random state is neither read nor changed, and ``random.Random(seed)`` gives the
same stream as the official scripts' ``random.seed(seed)`` (both seed Python's generator just before the draw).

``coop`` (default; CoOp / CoCoOp / Dassl ``generate_fewshot_dataset``):
    labels are visited in the order of their first appearance in the split; for each, ``rng.sample(items, K)``
    (no repeats). The validation shots continue the same stream: ``min(K, 4)`` per label of the val split, visited
    the same way. Base-to-novel: the draw covers every class, and the subset is taken afterwards (CoOp draws the
    few-shot set before ``subsample_classes``).
``clip_lora`` (CLIP-LoRA's ``datasets/*.py``):
    the validation shots are drawn first, then the training shots, from the same stream; a label with fewer images
    than asked is filled with ``rng.choices`` (repeats). Without a val split (CLIP-LoRA's ImageNet), each label
    draws ``K + min(K, 4)`` images at once with ``rng.sample``: the first K train, the rest validate.

Without a val split, the ``coop`` draw takes the validation shots from the training images it did not pick (an
extension: CoOp's datasets all have one, and its ImageNet validates on the test set, which visadapt never does).

A class with fewer images than asked is an error by default (``short_classes="error"``). ``"keep"`` keeps all it
has (Dassl's ``repeat=False``) and records the shots actually used per class; ``"repeat"`` fills it with repeats
(``random.choices``, CLIP-LoRA's ``repeat=True``).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

DRAWS = ("coop", "clip_lora")
SHORT_CLASS_RULES = ("error", "keep", "repeat")


class NotEnoughImagesError(ValueError):
    """A class has fewer images than the few-shot draw asks for; the message names the class and the counts."""


def sample_per_class(labels: Sequence[int], shots: int, seed: int, classes: Sequence[int] | None = None) -> list[int]:
    """Sorted indices of up to ``shots`` samples per class (all of a class that has fewer), on a private generator.

    Used for seeded test subsamples (``test_per_class``), not for the training shots (see :func:`draw_fewshot`).

    Args:
        labels: Label of every sample.
        shots: Samples per class; ``<= 0`` keeps everything.
        seed: Seed of a private generator; the global random state is neither read nor changed.
        classes: Restrict to these labels (default: all present).
    """
    by_class = group_by_label(labels)
    keep = sorted(by_class) if classes is None else sorted(int(c) for c in classes)
    rng = random.Random(seed)
    out: list[int] = []
    for c in keep:
        items = by_class.get(c, [])
        out.extend(items if shots <= 0 or len(items) <= shots else sorted(rng.sample(items, shots)))
    return out


def group_by_label(labels: Sequence[int]) -> dict[int, list[int]]:
    """Indices per label, labels in the order of their first appearance (Dassl's ``split_dataset_by_label``)."""
    out: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        out.setdefault(int(y), []).append(i)
    return out


def base_novel_classes(num_classes: int) -> tuple[list[int], list[int]]:
    """CoCoOp's rule: with labels sorted, base = the first ``ceil(n/2)``, novel = the rest."""
    n_base = math.ceil(num_classes / 2)
    return list(range(n_base)), list(range(n_base, num_classes))


@dataclass
class FewShotSplit:
    """A reproducible few-shot selection; write it with :meth:`save` and reuse it with :meth:`load`.

    ``train`` and ``val`` are indices into the train split and into the val split (or, without one, into the train
    split), in the order of the draw; they may repeat under ``short_classes="repeat"``. ``shots_used`` lists the
    classes that got fewer distinct images than asked (``{label: (train, val)}``), empty when every class was full.
    """

    dataset: str
    shots: int
    seed: int
    classes: list[int]
    train: list[int] = field(default_factory=list)
    val: list[int] = field(default_factory=list)
    draw: str = "coop"
    short_classes: str = "error"
    val_from_train: bool = False
    shots_used: dict[str, list[int]] = field(default_factory=dict)

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
                             "dataset, shots, seed, classes, train, val (draw, short_classes optional)") from None


def _take(rng: random.Random, items: list[int], n: int, short: str, what: str, label: int,
          names: Sequence[str] | None, used: dict[int, int]) -> list[int]:
    """``n`` of ``items`` without repeats; a short class follows ``short`` (error / keep / repeat)."""
    if len(items) >= n:
        return rng.sample(items, n)
    name = f"{names[label]!r} (label {label})" if names and label < len(names) else f"label {label}"
    if short == "error":
        raise NotEnoughImagesError(
            f"class {name} has {len(items)} {what} image(s), fewer than the {n} the few-shot draw asks for. Lower "
            "data.init_args.shots (or val_shots), or set data.init_args.short_classes to 'keep' (use what there is; "
            "the shots used per class go to the report) or 'repeat' (fill with repeats, as CLIP-LoRA's code does)")
    used[label] = len(items)
    if short == "repeat" and items:
        return rng.choices(items, k=n)
    return list(items)


def draw_fewshot(dataset: str, train_labels: Sequence[int], val_labels: Sequence[int] | None, shots: int, seed: int,
                 classes: Sequence[int] | None = None, val_shots: int | None = None, draw: str = "coop",
                 short_classes: str = "error", classnames: Sequence[str] | None = None) -> FewShotSplit:
    """The few-shot selection of ``(dataset, shots, seed)`` by the rule of ``draw`` (see the module docstring).

    Args:
        dataset: Dataset name (recorded).
        train_labels: Label of every training image, in the split's order.
        val_labels: Label of every val-split image; ``None`` draws validation shots from the training images.
        shots: K; ``<= 0`` uses every training image (and ``val_shots``, default 4, for validation).
        seed: Seed of the private generator.
        classes: Keep only these labels (base-to-novel); the draw itself covers every label, as CoOp's does.
        val_shots: Validation images per class; ``None`` is the papers' ``min(K, 4)``.
        draw: ``coop`` or ``clip_lora``.
        short_classes: ``error``, ``keep`` or ``repeat`` for a class with fewer images than asked.
        classnames: Names of the labels, for error messages.
    """
    if draw not in DRAWS:
        raise ValueError(f"few-shot draw must be one of {DRAWS}, got {draw!r}")
    if short_classes not in SHORT_CLASS_RULES:
        raise ValueError(f"short_classes must be one of {SHORT_CLASS_RULES}, got {short_classes!r}")
    present = set(int(y) for y in train_labels)
    keep = sorted(present) if classes is None else sorted(int(c) for c in classes)
    if val_shots is None:
        val_shots = min(shots, 4) if shots > 0 else 4
    rng = random.Random(seed)
    by_train = group_by_label(train_labels)
    used_train: dict[int, int] = {}
    used_val: dict[int, int] = {}
    train: list[int] = []
    val: list[int] = []

    def draw_val_split() -> None:
        for y, items in group_by_label(val_labels).items():
            val.extend(_take(rng, items, val_shots, short_classes, "validation", y, classnames, used_val))

    def draw_train() -> None:
        for y, items in by_train.items():
            train.extend(items if shots <= 0 else _take(rng, items, shots, short_classes, "training", y, classnames,
                                                        used_train))

    if draw == "coop":
        draw_train()
        if val_labels is not None:
            draw_val_split()
        else:  # the same stream continues over the images the training draw left
            picked = set(train)
            for y, items in by_train.items():
                rest = [i for i in items if i not in picked]
                val.extend(_take(rng, rest, val_shots, short_classes, "held-out training", y, classnames, used_val))
    elif val_labels is not None:  # clip_lora: val first, then train
        draw_val_split()
        draw_train()
    else:  # clip_lora without a val split (its ImageNet): K + V per label at once, first K train
        if shots <= 0:
            raise ValueError("the clip_lora draw without a val split needs shots >= 1")
        for y, items in by_train.items():
            both = _take(rng, items, shots + val_shots, short_classes, "training", y, classnames, used_train)
            train.extend(both[:shots])  # under "keep", a short class fills its training shots first
            val.extend(both[shots:])
    keep_set = set(keep)
    labels_val = train_labels if val_labels is None else val_labels
    train = [i for i in train if int(train_labels[i]) in keep_set]
    val = [i for i in val if int(labels_val[i]) in keep_set]
    shots_used = {}
    for y in sorted(set(used_train) | set(used_val)):
        if y in keep_set:
            n_train = sum(int(train_labels[i]) == y for i in set(train))
            n_val = sum(int(labels_val[i]) == y for i in set(val))
            shots_used[str(y)] = [n_train, n_val]
    return FewShotSplit(dataset, shots, seed, keep, train, val, draw, short_classes, val_labels is None, shots_used)


def make_fewshot_split(dataset: str, train_labels: Sequence[int], val_labels: Sequence[int] | None, shots: int,
                       seed: int, classes: Sequence[int] | None = None, val_shots: int | None = None,
                       draw: str = "coop", short_classes: str = "error",
                       classnames: Sequence[str] | None = None) -> FewShotSplit:
    """K shots per class from train and ``min(K, 4)`` per class for validation (see :func:`draw_fewshot`)."""
    return draw_fewshot(dataset, train_labels, val_labels, shots, seed, classes, val_shots, draw, short_classes,
                        classnames)
