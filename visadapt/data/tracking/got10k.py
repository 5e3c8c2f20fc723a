"""GOT-10k reader: ``GOT-10k/{train,val,test}/list.txt`` plus one folder per sequence.

Each sequence folder holds ``00000001.jpg ...``, ``groundtruth.txt`` (comma-separated ``x,y,w,h`` per frame; only the
first frame in the test split), and in train/val ``absence.label`` (0/1), ``cover.label`` (visible-ratio bins 0..8)
and ``meta_info.ini`` (``resolution: (W, H)``). GOT-10k boxes are used as they are (0-based pixels).

The ``vot_train`` / ``vot_val`` splits (pytracking's split of the train set that LoRAT trains on) are read from
``split_file``: pytracking's ``got10k_vot_train_split.txt`` format (one integer per line, an index into
``train/list.txt``) or one sequence name per line.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from visadapt.data._registry import register_dataset
from visadapt.data.tracking.sequence import TrackingDataset, TrackingSequence, list_frames, read_flags, read_number_rows
from visadapt.errors import CorruptFileError, UserError

SPLITS = ("train", "val", "test", "vot_train", "vot_val")
_RESOLUTION = re.compile(r"^\s*resolution\s*:\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)", re.MULTILINE)


def _read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"GOT-10k list file not found: {path} (expected <root>/<split>/list.txt, one sequence "
                        "folder name per line)")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _select(names: list[str], split_file: str | Path) -> list[str]:
    """Names picked by a split file of indices into ``names`` (pytracking) or of names."""
    path = Path(split_file)
    if not path.is_file():
        raise UserError(f"GOT-10k split file not found: {path}")
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = line.strip()
        if not text:
            continue
        if text.isdigit():
            i = int(text)
            if i >= len(names):
                raise CorruptFileError(f"{path}:{lineno}: index {i} is outside train/list.txt ({len(names)} "
                                       "sequences)")
            out.append(names[i])
        elif text in names:
            out.append(text)
        else:
            raise CorruptFileError(f"{path}:{lineno}: {text!r} is neither an index nor a sequence of train/list.txt")
    return out


def read_got10k_sequence(folder: str | Path, dataset: str = "got10k") -> TrackingSequence:
    """One GOT-10k sequence folder; errors name the file (and line) at fault."""
    folder = Path(folder)
    frames = list_frames(folder, (".jpg", ".jpeg", ".png"))
    boxes = read_number_rows(folder / "groundtruth.txt", 4)
    if len(boxes) == 0:
        raise CorruptFileError(f"{folder / 'groundtruth.txt'} holds no box")
    if len(boxes) != 1 and len(boxes) != len(frames):
        raise UserError(f"{folder}: groundtruth.txt has {len(boxes)} boxes for {len(frames)} frame images")
    n = len(boxes)
    absent = read_flags(folder / "absence.label", n, 1).astype(bool) if (folder / "absence.label").is_file() \
        else np.zeros(n, bool)
    cover = read_flags(folder / "cover.label", n, 8) if (folder / "cover.label").is_file() else None
    resolution = None
    meta = folder / "meta_info.ini"
    if meta.is_file():
        m = _RESOLUTION.search(meta.read_text(encoding="utf-8", errors="replace"))
        if m:
            resolution = (int(m.group(1)), int(m.group(2)))
    return TrackingSequence(folder.name, frames, boxes, absent, cover=cover, dataset=dataset, resolution=resolution)


def read_got10k(root: str | Path, split: str = "train", split_file: str | Path | None = None,
                max_sequences: int | None = None, dataset: str = "got10k") -> TrackingDataset:
    """Read a GOT-10k-format split (also the procedural generator's output)."""
    if split not in SPLITS:
        raise ValueError(f"GOT-10k split must be one of {SPLITS}, got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"GOT-10k root not found: {root} (expected <root>/{{train,val,test}}/list.txt)")
    folder = root / ("train" if split.startswith("vot_") else split)
    names = _read_list(folder / "list.txt")
    if split.startswith("vot_"):
        if split_file is None:
            raise UserError(f"GOT-10k split {split!r} needs split_file= (pytracking's "
                            f"ltr/data_specs/got10k_{split}_split.txt: indices into train/list.txt)")
        names = _select(names, split_file)
    elif split_file is not None:
        names = _select(names, split_file)
    if max_sequences is not None:
        names = names[:max_sequences]
    sequences = [read_got10k_sequence(folder / n, dataset) for n in names]
    return TrackingDataset(dataset, split, sequences, root)


@register_dataset("got10k")
def got10k(root: str, split: str = "train", split_file: str | None = None,
           max_sequences: int | None = None) -> TrackingDataset:
    """GOT-10k tracking sequences (train / val / test, or vot_train / vot_val with pytracking's split file).

    Args:
        root: The GOT-10k folder holding ``train/``, ``val/``, ``test/``.
        split: ``train``, ``val``, ``test``, ``vot_train`` or ``vot_val``.
        split_file: Indices into ``train/list.txt`` (pytracking format) or names, one per line.
        max_sequences: Read only the first N sequences of the split.
    """
    return read_got10k(root, split, split_file, max_sequences)


__all__ = ["got10k", "read_got10k", "read_got10k_sequence"]
