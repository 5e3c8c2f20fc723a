"""Readers of manipulation datasets on disk, registered in the dataset registry.

* ``manipulation_json``: IMDL-BenCo JSON, plain or extended (:mod:`visadapt.data.manipulation.format`);
* ``imdl_folder``: IMDL-BenCo's ``ManiDataset`` layout, ``Tp/`` (manipulated images) and ``Gt/`` (masks) paired by
  sorted file-name order as BenCo does, plus ``Au/`` (authentic images) when present;
* ``manipbench_folder``: a ManipBench-style folder (real images, one folder per editing model, box annotations),
  laid out as described in :func:`manipbench_folder`.

Each builder takes ``root`` and ``split``: when ``root/<split>`` holds the layout (or ``root/<split>.json`` exists),
that is read; otherwise ``root`` itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from visadapt.data._registry import register_dataset
from visadapt.data.manipulation.dataset import ManipulationDataset
from visadapt.data.manipulation.format import ManipulationRecord, parse_item, read_manipulation_json
from visadapt.data.manipulation.vocab import AUTHENTIC
from visadapt.errors import CorruptFileError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _need_root(root: str | None, name: str) -> Path:
    if root is None:
        raise ValueError(f"dataset {name!r} needs root= (a folder or file); see `python -m visadapt list datasets`")
    path = Path(root).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"dataset {name!r}: root {path} does not exist")
    return path


@register_dataset("manipulation_json")
def manipulation_json(root: str | None = None, split: str = "train", transform: Callable | None = None,
                      on_bad_image: str = "raise") -> ManipulationDataset:
    """Manipulation data from IMDL-BenCo JSON ([image, mask|"Negative"] items, optionally with annotations).

    Args:
        root: The JSON file, or a folder holding ``<split>.json``.
        split: Which ``<split>.json`` to read when ``root`` is a folder.
    """
    path = _need_root(root, "manipulation_json")
    if path.is_dir():
        path = path / f"{split}.json"
    return ManipulationDataset(read_manipulation_json(path), transform, name=str(path), on_bad_image=on_bad_image)


def _split_dir(root: Path, split: str, marker: str) -> Path:
    return root / split if (root / split / marker).is_dir() else root


@register_dataset("imdl_folder")
def imdl_folder(root: str | None = None, split: str = "train", transform: Callable | None = None,
                on_bad_image: str = "raise") -> ManipulationDataset:
    """IMDL-BenCo's folder layout: Tp/ images and Gt/ masks paired by sorted name, plus Au/ authentic images.

    Args:
        root: The folder holding ``Tp/`` and ``Gt/`` (or ``<split>/Tp`` ...).
        split: Sub-folder to read when ``root/<split>/Tp`` exists.

    An ``Au/`` image and a ``Tp/`` image with the same file stem share a ``pair_id`` (twins); the rest get their own.
    """
    base = _split_dir(_need_root(root, "imdl_folder"), split, "Tp")
    tp_dir, gt_dir, au_dir = base / "Tp", base / "Gt", base / "Au"
    for d in (tp_dir, gt_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"dataset 'imdl_folder': {d} is missing (expected Tp/ images and Gt/ masks)")
    tp, gt = _images(tp_dir), _images(gt_dir)
    if len(tp) != len(gt):
        raise CorruptFileError(f"dataset 'imdl_folder': {tp_dir} holds {len(tp)} images but {gt_dir} {len(gt)} "
                               "masks; BenCo pairs them by sorted file name, so the counts must match")
    au = _images(au_dir) if au_dir.is_dir() else []
    stems = sorted({p.stem for p in tp} | {p.stem for p in au})
    pid = {s: i for i, s in enumerate(stems)}
    records = [ManipulationRecord(image=str(t), mask=str(g), label=1, pair_id=pid[t.stem]) for t, g in zip(tp, gt)]
    records += [ManipulationRecord(image=str(a), label=0, editor=AUTHENTIC, pair_id=pid[a.stem]) for a in au]
    return ManipulationDataset(records, transform, name=str(base), on_bad_image=on_bad_image)


def _read_jsonl(path: Path, base: Path) -> dict[str, dict]:
    """``annotations.jsonl``: relative image path -> annotation dict, with line numbers in errors."""
    out: dict[str, dict] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorruptFileError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from e
        if not isinstance(obj, dict) or not isinstance(obj.get("image"), str):
            raise CorruptFileError(f"{path}, line {lineno}: expected an object with an \"image\" path")
        key = Path(obj.pop("image")).as_posix()
        if "explanation" in obj:
            obj["text"] = obj.pop("explanation")
        out[key] = {**obj, "_line": lineno}
    return out


@register_dataset("manipbench_folder")
def manipbench_folder(root: str | None = None, split: str = "train", transform: Callable | None = None,
                      on_bad_image: str = "raise") -> ManipulationDataset:
    """A ManipBench-style folder: real/ images, one folder per editing model, optional masks and annotations.

    Layout (``root``, or ``root/<split>`` when that holds ``real/``)::

        real/<id>.<ext>                 authentic images
        <editor>/<id>.<ext>             images edited by <editor>; the same <id> as a real image makes them twins
        masks/<editor>/<id>.png         optional pixel masks (ManipBench itself annotates boxes only)
        annotations.jsonl               optional, one JSON object per line:
            {"image": "<editor>/<id>.png", "boxes": [[x0, y0, x1, y1], ...], "category": "addition",
             "cues": ["texture", "light"], "explanation": "...", "editor": "..."}

    ManipBench (per the reference notes) holds ~22K real images edited by 25 editing models into 450K+ images, with
    boxes, cues and explanations for a 100K subset; this layout mirrors that: the editor is the folder name, the
    twin relation is the shared file stem. A manipulated image without mask or boxes has ``has_box`` False.
    """
    base = _split_dir(_need_root(root, "manipbench_folder"), split, "real")
    if not (base / "real").is_dir():
        raise FileNotFoundError(f"dataset 'manipbench_folder': {base / 'real'} is missing (expected real/ and one "
                                "folder per editor)")
    ann_path = base / "annotations.jsonl"
    ann = _read_jsonl(ann_path, base) if ann_path.is_file() else {}
    editors = sorted(p.name for p in base.iterdir() if p.is_dir() and p.name not in ("real", "masks"))
    files = [(AUTHENTIC, p) for p in _images(base / "real")]
    files += [(e, p) for e in editors for p in _images(base / e)]
    stems = sorted({p.stem for _, p in files})
    pid = {s: i for i, s in enumerate(stems)}
    records = []
    for editor, p in files:
        rel = p.relative_to(base).as_posix()
        meta = dict(ann.pop(rel, {}))
        line = meta.pop("_line", None)
        where = f"{ann_path}, line {line}" if line else f"{p}"
        mask_file = base / "masks" / editor / f"{p.stem}.png"
        if editor == AUTHENTIC:
            mask: str | None = "Negative"
        elif mask_file.is_file():
            mask = str(mask_file)
        else:
            mask, meta["label"] = None, 1
        meta.setdefault("editor", editor)
        meta.setdefault("pair_id", pid[p.stem])
        records.append(parse_item([str(p), mask, meta], ann_path, len(records), base, where))
    if ann:
        first = next(iter(ann))
        raise CorruptFileError(f"{ann_path}, line {ann[first]['_line']}: annotation for {first!r}, which is not an "
                               f"image under {base}")
    return ManipulationDataset(records, transform, name=str(base), on_bad_image=on_bad_image)


__all__ = ["IMAGE_EXTENSIONS", "imdl_folder", "manipbench_folder", "manipulation_json"]
