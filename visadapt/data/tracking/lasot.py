"""LaSOT reader: ``<root>/<class>/<class>-<k>/`` with ``img/00000001.jpg ...``, ``groundtruth.txt`` (one
``x,y,w,h`` line per frame, **1-based**: converted to 0-based here, as trackit does), ``full_occlusion.txt`` and
``out_of_view.txt`` (one comma-separated 0/1 line each).

Splits: ``test`` / ``train`` are protocol II, read from ``testing_set.txt`` / ``training_set.txt`` (one sequence name
per line, as the LaSOT toolkit ships them) in ``root`` or given as ``split_file``; ``all`` is every sequence folder.
A sequence with more images than annotations (monkey-17) keeps only the annotated frames.
"""

from __future__ import annotations

from pathlib import Path

from visadapt.data._registry import register_dataset
from visadapt.data.tracking.sequence import TrackingDataset, TrackingSequence, list_frames, read_flags, read_number_rows
from visadapt.errors import UserError

SPLIT_FILES = {"train": "training_set.txt", "test": "testing_set.txt"}


def read_lasot_sequence(folder: str | Path, dataset: str = "lasot") -> TrackingSequence:
    """One LaSOT sequence folder (boxes converted to 0-based)."""
    folder = Path(folder)
    boxes = read_number_rows(folder / "groundtruth.txt", 4)
    boxes[:, :2] -= 1.0  # 1-based -> 0-based
    n = len(boxes)
    frames = list_frames(folder / "img", (".jpg", ".jpeg", ".png"))
    if len(frames) < n:
        raise UserError(f"{folder / 'img'} holds {len(frames)} images for {n} lines of {folder / 'groundtruth.txt'}")
    frames = frames[:n]
    occ = read_flags(folder / "full_occlusion.txt", n, 1)
    oov = read_flags(folder / "out_of_view.txt", n, 1)
    return TrackingSequence(folder.name, frames, boxes, (occ > 0) | (oov > 0), full_occlusion=occ, out_of_view=oov,
                            dataset=dataset)


def _names(root: Path, split: str, split_file: str | Path | None) -> list[str]:
    if split == "all" and split_file is None:
        return sorted(p.name for c in sorted(root.iterdir()) if c.is_dir()
                      for p in c.iterdir() if p.is_dir() and p.name.startswith(c.name + "-"))
    if split_file is None:
        if split not in SPLIT_FILES:
            raise ValueError(f"LaSOT split must be train, test or all, got {split!r}")
        split_file = root / SPLIT_FILES[split]
        if not split_file.is_file():
            raise UserError(f"LaSOT protocol-II list not found: {split_file} (copy {SPLIT_FILES[split]} from the "
                            "LaSOT evaluation toolkit there, or pass split_file=)")
    split_file = Path(split_file)
    if not split_file.is_file():
        raise UserError(f"LaSOT split file not found: {split_file}")
    return [line.strip() for line in split_file.read_text(encoding="utf-8").splitlines() if line.strip()]


@register_dataset("lasot")
def lasot(root: str, split: str = "test", split_file: str | None = None,
          max_sequences: int | None = None) -> TrackingDataset:
    """LaSOT tracking sequences (protocol II: 1,120 train / 280 test), 1-based ground truth converted to 0-based.

    Args:
        root: The LaSOT folder holding ``<class>/<class>-<k>/``.
        split: ``train``, ``test`` (protocol-II lists) or ``all``.
        split_file: A list of sequence names, one per line (default: ``root/training_set.txt`` or
            ``root/testing_set.txt``).
        max_sequences: Read only the first N sequences.
    """
    base = Path(root)
    if not base.is_dir():
        raise UserError(f"LaSOT root not found: {base} (expected <root>/<class>/<class>-<k>/groundtruth.txt)")
    names = _names(base, split, split_file)[:max_sequences]
    seqs = []
    for name in names:
        cls = name.rsplit("-", 1)[0]
        folder = base / cls / name
        if not folder.is_dir():
            raise UserError(f"LaSOT sequence folder not found: {folder} (listed in the {split} split)")
        seqs.append(read_lasot_sequence(folder))
    return TrackingDataset("lasot", split, seqs, base)


__all__ = ["lasot", "read_lasot_sequence"]
