"""COCO as static tracking pairs: every object annotation becomes a one-frame "sequence", so the pair sampler cuts
the template and the search region from the same image (LoRAT trains on COCO-2017 this way).

Layout: ``<root>/annotations/instances_<split>2017.json`` and ``<root>/<split>2017/<file_name>`` (or an explicit
``annotation_file`` / ``image_dir``). COCO boxes are ``[x, y, w, h]`` in 0-based continuous pixels already.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from visadapt.data._registry import register_dataset
from visadapt.data.tracking.sequence import TrackingDataset, TrackingSequence
from visadapt.errors import CorruptFileError, UserError


@register_dataset("coco_pairs")
def coco_pairs(root: str, split: str = "train", annotation_file: str | None = None, image_dir: str | None = None,
               min_size: float = 4.0, include_crowd: bool = False,
               max_sequences: int | None = None) -> TrackingDataset:
    """COCO object instances as single-frame tracking sequences (static template/search pairs).

    Args:
        root: The COCO folder.
        split: ``train`` or ``val`` (the 2017 file names).
        annotation_file: Instances JSON (default ``root/annotations/instances_<split>2017.json``).
        image_dir: Image folder (default ``root/<split>2017``).
        min_size: Leave out boxes with a side smaller than this (pixels).
        include_crowd: Keep ``iscrowd`` annotations.
        max_sequences: Keep only the first N instances.
    """
    base = Path(root)
    ann = Path(annotation_file) if annotation_file else base / "annotations" / f"instances_{split}2017.json"
    images = Path(image_dir) if image_dir else base / f"{split}2017"
    if not ann.is_file():
        raise UserError(f"COCO annotation file not found: {ann}")
    try:
        data = json.loads(ann.read_text(encoding="utf-8"))
        files = {int(im["id"]): im["file_name"] for im in data["images"]}
        annotations = data["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CorruptFileError(f"{ann}: not a COCO instances file ({type(e).__name__}: {e})") from e
    seqs = []
    for i, a in enumerate(annotations):
        try:
            box = np.asarray(a["bbox"], dtype=np.float64).reshape(4)
            image_id, crowd = int(a["image_id"]), bool(a.get("iscrowd", 0))
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptFileError(f"{ann}: annotation #{i} (id {a.get('id', '?') if isinstance(a, dict) else '?'}) "
                                   f"is malformed: {e}") from e
        if (crowd and not include_crowd) or box[2] < min_size or box[3] < min_size:
            continue
        if image_id not in files:
            raise CorruptFileError(f"{ann}: annotation #{i} refers to image_id {image_id}, which is not listed")
        seqs.append(TrackingSequence(f"{image_id}_{a.get('id', i)}", [images / files[image_id]], box[None],
                                     np.zeros(1, bool), dataset="coco_pairs"))
        if max_sequences is not None and len(seqs) >= max_sequences:
            break
    return TrackingDataset("coco_pairs", split, seqs, base)


__all__ = ["coco_pairs"]
