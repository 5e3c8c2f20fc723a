"""A single-object tracking sequence, the list of them a reader returns, and strict annotation-file parsing.

Coordinates everywhere in visadapt's tracking code: boxes are ``float64`` ``(x, y, w, h)`` in **0-based,
continuous pixel coordinates** (pixel ``i`` covers ``[i, i + 1)``), so the top-left pixel's box is ``(0, 0, 1, 1)``.
LaSOT's 1-based ground truth is converted by its reader (``x - 1, y - 1``), as trackit does.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from visadapt.data.base import BadImageError, load_image
from visadapt.errors import CorruptFileError, UserError

_SPLIT = re.compile(r"[,\s]+")


def read_number_rows(path: str | Path, columns: int, what: str = "box") -> np.ndarray:
    """Read a text file of ``columns`` numbers per line (comma, tab or space separated) as ``float64``.

    A malformed line raises :class:`~visadapt.errors.CorruptFileError` naming the file and the 1-based line number.
    Empty trailing lines are ignored; ``nan`` is accepted (some toolkits write it for missing boxes).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"annotation file not found: {path}")
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text:
                continue
            parts = [p for p in _SPLIT.split(text) if p]
            try:
                values = [float(p) for p in parts]
            except ValueError:
                values = []
            if len(values) != columns:
                raise CorruptFileError(f"{path}:{lineno}: expected {columns} numbers ({what}), got {text[:80]!r}")
            rows.append(values)
    return np.asarray(rows, dtype=np.float64).reshape(-1, columns)


def read_flags(path: str | Path, length: int | None = None, maximum: int = 1) -> np.ndarray:
    """Read integer per-frame labels: one per line (GOT-10k ``*.label``) or one comma-separated line (LaSOT).

    Values must be integers in ``[0, maximum]``; a bad value names the file and line. ``length`` (if given) must
    match the count.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"label file not found: {path}")
    values: list[int] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            for part in (p for p in _SPLIT.split(line.strip()) if p):
                try:
                    v = int(float(part))
                    if v != float(part) or not 0 <= v <= maximum:
                        raise ValueError
                except ValueError:
                    raise CorruptFileError(f"{path}:{lineno}: expected an integer label in 0..{maximum}, got "
                                           f"{part[:40]!r}") from None
                values.append(v)
    out = np.asarray(values, dtype=np.int64)
    if length is not None and len(out) != length:
        raise CorruptFileError(f"{path}: {len(out)} labels for {length} annotated frames")
    return out


def list_frames(folder: str | Path, suffixes: Sequence[str] = (".jpg", ".jpeg", ".png")) -> list[Path]:
    """Image files of ``folder`` in numeric order of their stem (``0.jpg, 1.jpg, ..., 10.jpg``); a missing or empty
    folder raises :class:`~visadapt.errors.UserError` naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"frame folder not found: {folder}")
    files = [p for p in folder.iterdir() if p.suffix.lower() in suffixes and p.is_file()]
    if not files:
        raise UserError(f"frame folder {folder} holds no {'/'.join(suffixes)} images")

    def key(p: Path) -> tuple[int, str]:
        return (int(p.stem), p.name) if p.stem.isdigit() else (10**12, p.name)

    return sorted(files, key=key)


@dataclass
class TrackingSequence:
    """One tracked object in one video (or, for static image datasets such as COCO, one object in one image).

    Attributes:
        name: Sequence name (the folder or video name; unique within its dataset).
        frames: Frame image paths, in order.
        boxes: ``float64`` array ``(N, 4)``: ``(x, y, w, h)``, 0-based continuous pixels, one row per
            **annotated** frame. ``N == len(frames)`` except for test splits whose ground truth is withheld
            (GOT-10k and TrackingNet test: only the first frame is annotated; see :attr:`fully_annotated`).
        absent: ``bool`` array ``(N,)``: the object is not visible (GOT-10k ``absence.label``; LaSOT full occlusion
            or out of view; the generator's fully occluded or out-of-frame frames).
        cover: Optional GOT-10k visible-ratio bins ``(N,)`` in 0..8 (0: invisible, 8: fully visible).
        full_occlusion: Optional LaSOT flags ``(N,)``.
        out_of_view: Optional LaSOT flags ``(N,)``.
        dataset: Name of the dataset it came from.
        resolution: Optional ``(width, height)`` of the frames (from GOT-10k ``meta_info.ini``); read from the first
            frame on demand otherwise.
    """

    name: str
    frames: list[Path]
    boxes: np.ndarray
    absent: np.ndarray
    cover: np.ndarray | None = None
    full_occlusion: np.ndarray | None = None
    out_of_view: np.ndarray | None = None
    dataset: str = ""
    resolution: tuple[int, int] | None = field(default=None)

    def __post_init__(self) -> None:
        self.frames = [Path(p) for p in self.frames]
        self.boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        self.absent = np.asarray(self.absent, dtype=bool).reshape(-1)
        if len(self.absent) != len(self.boxes):
            raise ValueError(f"sequence {self.name}: {len(self.absent)} absence flags for {len(self.boxes)} boxes")
        if len(self.boxes) > len(self.frames) or len(self.boxes) == 0:
            raise UserError(f"sequence {self.name}: {len(self.boxes)} annotated frames but {len(self.frames)} "
                            f"frame images (folder {self.frames[0].parent if self.frames else '?'})")
        for name in ("cover", "full_occlusion", "out_of_view"):
            value = getattr(self, name)
            if value is not None:
                value = np.asarray(value, dtype=np.int64).reshape(-1)
                if len(value) != len(self.boxes):
                    raise ValueError(f"sequence {self.name}: {len(value)} {name} labels for {len(self.boxes)} boxes")
                setattr(self, name, value)

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def fully_annotated(self) -> bool:
        """Every frame has a ground-truth box (false for withheld test ground truth)."""
        return len(self.boxes) == len(self.frames)

    @property
    def visible(self) -> np.ndarray:
        """``~absent`` (bool per annotated frame)."""
        return ~self.absent

    def load_frame(self, index: int) -> np.ndarray:
        """Frame ``index`` as ``uint8`` ``(H, W, 3)`` RGB; a missing or corrupt file raises
        :class:`~visadapt.data.base.BadImageError` naming the file and the sequence."""
        if not -len(self.frames) <= index < len(self.frames):
            raise IndexError(f"sequence {self.name} has {len(self.frames)} frames; frame {index} requested")
        path = self.frames[index]
        try:
            return np.asarray(load_image(path))
        except BadImageError as e:
            raise BadImageError(f"{e} (frame {index} of sequence {self.name!r}, dataset {self.dataset!r})") from e

    def frame_size(self) -> tuple[int, int]:
        """``(width, height)``: :attr:`resolution` or the first frame's size."""
        if self.resolution is None:
            from PIL import Image

            try:
                with Image.open(self.frames[0]) as im:
                    self.resolution = (int(im.width), int(im.height))
            except (OSError, ValueError) as e:
                raise BadImageError(f"cannot read image {self.frames[0]}: {e}") from e
        return self.resolution


class TrackingDataset(Dataset):
    """The sequences of one split of one tracking dataset (what every tracking reader returns).

    ``ds[i]`` is a :class:`TrackingSequence`; ``ds.by_name(name)`` looks one up.
    """

    def __init__(self, name: str, split: str, sequences: list[TrackingSequence], root: str | Path | None = None):
        self.name, self.split, self.sequences = name, split, list(sequences)
        self.root = Path(root) if root is not None else None

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> TrackingSequence:
        return self.sequences[index]

    def __iter__(self) -> Iterator[TrackingSequence]:
        return iter(self.sequences)

    def by_name(self, name: str) -> TrackingSequence:
        for s in self.sequences:
            if s.name == name:
                return s
        raise KeyError(f"no sequence {name!r} in {self.name}/{self.split}")

    def __repr__(self) -> str:
        frames = sum(len(s) for s in self.sequences)
        return f"TrackingDataset({self.name!r}, split={self.split!r}, {len(self)} sequences, {frames} frames)"


__all__ = ["TrackingDataset", "TrackingSequence", "list_frames", "read_flags", "read_number_rows"]
