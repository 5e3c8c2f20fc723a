"""The sample contract shared by every dataset, and the labelled-image base class.

A sample is a dict of named fields: ``image`` (a tensor after the transform, a PIL image before it), ``label``
(int), ``classname`` (str), and task-specific fields such as ``mask``, ``boxes`` or ``text``. One collate
(:func:`collate`) and one transform stack serve every task.

:class:`LabeledImageDataset` keeps the list of labels in memory so that samplers (few-shot, base/novel, sessions)
never have to decode an image to know its class.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate

from visadapt.rng import capture_rng_states, restore_rng_states

log = logging.getLogger(__name__)


class BadImageError(ValueError):
    """Raised when an image file cannot be decoded; the message names the file."""


def load_image(path: str | Path) -> Image.Image:
    """Open ``path`` as an RGB PIL image, or raise :class:`BadImageError` naming the file and the reason.

    A decompression bomb (more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` allows) is a bad image too.
    """
    path = Path(path)
    if not path.is_file():
        raise BadImageError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except Image.DecompressionBombError as e:
        raise BadImageError(f"refusing image {path}: {e} (a possible decompression bomb; raise "
                            "PIL.Image.MAX_IMAGE_PIXELS if the file is trusted)") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadImageError(f"cannot decode image {path}: {e}") from e


def skipped_images(datasets: Iterable[Dataset]) -> list[str]:
    """The unreadable images ``on_bad_image: skip`` left out of ``datasets`` and their parents, each once."""
    out: list[str] = []
    seen: set[int] = set()
    for ds in datasets:
        while ds is not None and id(ds) not in seen:
            seen.add(id(ds))
            out.extend(s for s in getattr(ds, "skipped", []) if s not in out)
            ds = getattr(ds, "parent", None)
    return out


class LabeledImageDataset(Dataset):
    """Images with integer labels and class names.

    Subclasses fill ``self.labels`` (list of int), ``self.classnames`` (index -> name) and implement
    :meth:`load` (index -> PIL image). Selection (few-shot, class subsets, relabelling) goes through
    :meth:`subset`, which returns a view without copying image data.

    Args:
        transform: Callable applied to the PIL image.
        on_bad_image: ``"raise"`` (default) stops with the file name; ``"skip"`` leaves unreadable files out of the
            index when the dataset is built (every file is decoded once then), lists them in ``self.skipped`` and
            logs the count with the first few paths. A skipped file is never replaced by another sample.
    """

    def __init__(self, transform: Callable | None = None, on_bad_image: str = "raise") -> None:
        if on_bad_image not in ("raise", "skip"):
            raise ValueError(f"on_bad_image must be 'raise' or 'skip', got {on_bad_image!r}")
        self.transform = transform
        self.on_bad_image = on_bad_image
        self.labels: list[int] = []
        self.classnames: list[str] = []
        self.skipped: list[str] = []

    # -- to implement -------------------------------------------------------------------------------------------
    def load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """Human-readable identity of sample ``index`` (a file path where there is one)."""
        return f"{type(self).__name__}[{index}]"

    # -- shared -------------------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            image = self.load(index)
        except BadImageError as e:
            if self.on_bad_image == "skip":
                raise BadImageError(f"{e} (on_bad_image=skip leaves out the files that are unreadable when the "
                                    f"dataset is built; {type(self).__name__} was not scanned, or the file changed "
                                    "since)") from e
            raise
        if self.transform is not None:
            image = self.transform(image)
        label = self.labels[index]
        return {"image": image, "label": label, "classname": self.classnames[label], "index": index}

    def _drop_unreadable(self, fields: Sequence[str] = ()) -> None:
        """Decode every sample once and remove the unreadable ones from ``labels`` and the per-sample ``fields``.

        Called by subclasses at the end of ``__init__`` when ``on_bad_image`` is ``"skip"``; the removed files are
        listed in ``self.skipped`` and logged (count and the first paths).
        """
        keep, bad = [], []
        for i in range(len(self.labels)):
            try:
                self.load(i)
                keep.append(i)
            except BadImageError as e:
                bad.append(f"{self.describe(i)}: {e}")
        if not bad:
            return
        self.labels = [self.labels[i] for i in keep]
        for name in fields:
            values = getattr(self, name)
            setattr(self, name, [values[i] for i in keep])
        self.skipped.extend(bad)
        log.warning("on_bad_image=skip: %d unreadable image(s) left out of %s, e.g. %s", len(bad),
                    type(self).__name__, "; ".join(bad[:3]))

    def subset(self, indices: Sequence[int], label_map: dict[int, int] | None = None,
               classnames: list[str] | None = None) -> "SubsetDataset":
        """A view on ``indices``; ``label_map`` relabels (old -> new) with the new ``classnames``."""
        return SubsetDataset(self, list(indices), label_map, classnames)


class SubsetDataset(LabeledImageDataset):
    """A selection of another dataset's samples, optionally relabelled. Shares the parent's transform."""

    def __init__(self, parent: LabeledImageDataset, indices: list[int], label_map: dict[int, int] | None = None,
                 classnames: list[str] | None = None) -> None:
        super().__init__(parent.transform, parent.on_bad_image)
        self.parent = parent
        self.indices = indices
        self.label_map = label_map
        old = [parent.labels[i] for i in indices]
        self.labels = [label_map[y] for y in old] if label_map else old
        self.classnames = classnames if classnames is not None else list(parent.classnames)

    def load(self, index: int) -> Image.Image:
        return self.parent.load(self.indices[index])

    def describe(self, index: int) -> str:
        return self.parent.describe(self.indices[index])


class ArrayImageDataset(LabeledImageDataset):
    """Images held in memory as a uint8 array ``(N, H, W)`` or ``(N, H, W, 3)``; used for idx / pickle formats."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], classnames: list[str], name: str = "array",
                 transform: Callable | None = None) -> None:
        super().__init__(transform)
        self.images = images
        self.labels = [int(y) for y in labels]
        self.classnames = list(classnames)
        self.name = name

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index]).convert("RGB")

    def describe(self, index: int) -> str:
        return f"{self.name}[{index}]"


class EpochSeededSampler(Sampler[int]):
    """``RandomSampler``'s order (a seed drawn from the global torch generator, or ``generator``, at every epoch),
    with the epoch's seed and position exposed so that a resumed run can continue the same order mid-epoch."""

    def __init__(self, num_samples: int, shuffle: bool = True, generator: torch.Generator | None = None) -> None:
        self.num_samples, self.shuffle, self.generator = num_samples, shuffle, generator
        self.seed: int | None = None
        self.resume_at: tuple[int, int] | None = None  # (seed, first position) for the next iteration

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        if self.resume_at is not None:
            seed, start = self.resume_at
            self.resume_at = None
        else:
            start = 0
            seed = int(torch.empty((), dtype=torch.int64).random_(generator=self.generator).item()) \
                if self.shuffle else 0
        self.seed = seed
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(seed)).tolist()
        else:
            order = list(range(self.num_samples))
        yield from order[start:]


class ResumableDataLoader(DataLoader):
    """A training DataLoader that Lightning can checkpoint mid-epoch (``state_dict`` / ``load_state_dict``).

    The state holds the epoch's shuffling seed, the batches already delivered and the global random states at that
    moment; a run resumed from it delivers the rest of the same epoch, in the same order, with the same
    augmentation draws (bit-identical with ``num_workers=0``; worker processes have their own random streams, so
    with workers an epoch-boundary resume is exact and a mid-epoch one continues the same order only). The order
    equals ``DataLoader(shuffle=True)``'s for the same global random state.
    """

    def __init__(self, dataset: Dataset, batch_size: int = 1, shuffle: bool = False, sampler: Any = None,
                 generator: torch.Generator | None = None, **kwargs: Any) -> None:
        if sampler is None:
            sampler = EpochSeededSampler(len(dataset), shuffle, generator)  # type: ignore[arg-type]
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, generator=generator, **kwargs)
        self._delivered = 0
        self._pending: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        pending, self._pending = self._pending, None
        if pending is None:
            self._delivered = 0
            yield from self._counted(super().__iter__())
            return
        restore_rng_states(pending["rng"])
        before = torch.get_rng_state()
        sampler = self.sampler
        if isinstance(sampler, EpochSeededSampler):
            sampler.resume_at = (pending["seed"], pending["batches"] * (self.batch_size or 1))
            it = super().__iter__()
            skip = 0
        else:  # a sampler Lightning injected (e.g. distributed): replay its order, then skip the delivered batches
            it = super().__iter__()
            skip = pending["batches"]
        for _ in range(skip):
            next(it)
        torch.set_rng_state(before)  # creating / replaying the iterator must not move the restored random state
        restore_rng_states(pending["rng"])
        self._delivered = pending["batches"]
        yield from self._counted(it)

    def _counted(self, it: Iterator[Any]) -> Iterator[Any]:
        for batch in it:
            self._delivered += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        seed = self.sampler.seed if isinstance(self.sampler, EpochSeededSampler) else None
        return {"seed": seed, "batches": self._delivered, "rng": capture_rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if 0 < state_dict.get("batches", 0) < len(self):
            self._pending = dict(state_dict)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate a list of sample dicts: tensors and numbers are stacked, strings and ragged fields become lists."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], str) or key in ("boxes", "text", "path"):
            out[key] = values
        elif isinstance(values[0], torch.Tensor) and any(v.shape != values[0].shape for v in values):
            out[key] = values
        else:
            out[key] = default_collate(values)
    return out
