"""TrackingNet reader: chunks ``TRAIN_0 ... TRAIN_11`` and ``TEST``, each with ``anno/<video>.txt`` (comma-separated
``x,y,w,h`` per frame; the test files hold the first frame only) and ``frames/<video>/<i>.jpg`` numbered from 0."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from visadapt.data._registry import register_dataset
from visadapt.data.tracking.sequence import TrackingDataset, TrackingSequence, list_frames, read_number_rows
from visadapt.errors import UserError


def read_trackingnet_chunk(chunk: str | Path, max_sequences: int | None = None,
                           dataset: str = "trackingnet") -> list[TrackingSequence]:
    """Every video of one chunk folder (``TRAIN_k`` or ``TEST``)."""
    chunk = Path(chunk)
    anno = chunk / "anno"
    if not anno.is_dir():
        raise UserError(f"TrackingNet annotation folder not found: {anno} (expected <chunk>/anno/<video>.txt)")
    out = []
    for txt in sorted(anno.glob("*.txt"))[:max_sequences]:
        boxes = read_number_rows(txt, 4)
        frames = list_frames(chunk / "frames" / txt.stem, (".jpg", ".jpeg", ".png"))
        if len(boxes) != 1 and len(boxes) != len(frames):
            raise UserError(f"{txt}: {len(boxes)} boxes for {len(frames)} images in {chunk / 'frames' / txt.stem}")
        out.append(TrackingSequence(txt.stem, frames, boxes, np.zeros(len(boxes), bool), dataset=dataset))
    return out


@register_dataset("trackingnet")
def trackingnet(root: str, split: str = "train", chunks: list[int] | None = None,
                max_sequences: int | None = None) -> TrackingDataset:
    """TrackingNet videos: ``train`` (the ``TRAIN_k`` chunks present, or ``chunks``) or ``test`` (``TEST``).

    Args:
        root: The TrackingNet folder holding ``TRAIN_0 ... TRAIN_11`` and ``TEST``.
        split: ``train`` or ``test``.
        chunks: Training chunk numbers to read (default: every ``TRAIN_k`` folder present).
        max_sequences: Read only the first N videos of each chunk.
    """
    base = Path(root)
    if not base.is_dir():
        raise UserError(f"TrackingNet root not found: {base} (expected TRAIN_0 ... TRAIN_11 and TEST)")
    if split == "test":
        folders = [base / "TEST"]
    elif split == "train":
        folders = [base / f"TRAIN_{k}" for k in chunks] if chunks is not None else \
            sorted((p for p in base.glob("TRAIN_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))
        if not folders:
            raise UserError(f"no TRAIN_k chunk folder in {base}")
    else:
        raise ValueError(f"TrackingNet split must be train or test, got {split!r}")
    seqs = [s for f in folders for s in read_trackingnet_chunk(f, max_sequences)]
    return TrackingDataset("trackingnet", split, seqs, base)


__all__ = ["read_trackingnet_chunk", "trackingnet"]
