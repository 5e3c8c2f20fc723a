"""The manipulation data format: IMDL-BenCo's JSON list, extended with optional per-item annotations.

IMDL-BenCo's ``JsonDataset`` reads a JSON list of ``[image_path, mask_path]`` pairs, where the string
``"Negative"`` instead of a mask path marks an authentic image (all-zero mask, label 0) and any other item has
label 1. It reads ``record[0]`` and ``record[1]`` only, so this format appends a third, optional element, a dict of
annotations, and stays readable by BenCo::

    [
      ["Tp/0001.png", "Gt/0001.png", {"boxes": [[12, 30, 80, 96]], "category": "addition",
                                      "cues": ["relation", "light"], "editor": "splicing",
                                      "text": "Manipulated: ...", "pair_id": 1}],
      ["Au/0001.png", "Negative", {"editor": "authentic", "text": "Authentic: ...", "pair_id": 1}],
      ["Tp/0002.jpg", "Gt/0002.png"]
    ]

Annotation keys (all optional):

* ``boxes``: list of ``[x0, y0, x1, y1]`` in pixels of the image (exclusive right/bottom edge, like a slice);
  without it a manipulated item's box is the bounding box of its mask;
* ``category``: one of :data:`~visadapt.data.manipulation.vocab.CATEGORIES`;
* ``cues``: list of names from :data:`~visadapt.data.manipulation.vocab.CUES`;
* ``editor``: the editing model (``"authentic"`` for a real image);
* ``text``: the explanation;
* ``pair_id``: an integer shared by an authentic image and its edited twins;
* ``label``: 0 or 1; only needed for a manipulated image without a mask (box-only annotation, as in ManipBench),
  written with ``null`` as the mask.

Relative paths are resolved against the JSON file's folder first, then the working directory (BenCo resolves
against the working directory); the writer stores paths relative to the JSON file's folder when they lie below it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visadapt.data.manipulation.vocab import AUTHENTIC, category_index, cue_index
from visadapt.errors import CorruptFileError

NEGATIVE = "Negative"
ANNOTATION_KEYS = ("boxes", "category", "cues", "editor", "text", "pair_id", "label")


@dataclass
class ManipulationRecord:
    """One image of a manipulation dataset and its annotations (paths are absolute once read)."""

    image: str
    mask: str | None = None
    """Mask file (white = manipulated), or ``None`` (authentic, or a manipulated image with boxes only)."""
    label: int = 0
    boxes: list[list[float]] = field(default_factory=list)
    category: str | None = None
    cues: list[str] | None = None
    """Cue names; ``None`` when the item has no cue annotation (distinct from an empty list)."""
    editor: str = ""
    text: str = ""
    pair_id: int = -1

    def annotations(self) -> dict[str, Any]:
        """The optional third element of the JSON item (keys with a value only)."""
        out: dict[str, Any] = {}
        if self.boxes:
            out["boxes"] = [[float(v) for v in b] for b in self.boxes]
        if self.category:
            out["category"] = self.category
        if self.cues is not None:
            out["cues"] = list(self.cues)
        if self.editor:
            out["editor"] = self.editor
        if self.text:
            out["text"] = self.text
        if self.pair_id >= 0:
            out["pair_id"] = int(self.pair_id)
        if self.mask is None and self.label == 1:
            out["label"] = 1
        return out


def _resolve(path: str, base: Path) -> str:
    p = Path(path).expanduser()
    if p.is_absolute():
        return str(p)
    if (base / p).exists() or not p.exists():
        return str(base / p)
    return str(p.resolve())


def _where(json_path: Path, index: int) -> str:
    return f"{json_path}, item {index}"


def parse_item(item: Any, json_path: Path, index: int, base: Path | None = None,
               where: str | None = None) -> ManipulationRecord:
    """One JSON item (``[image, mask|"Negative"|null]`` plus an optional annotation dict) as a record.

    Args:
        base: Folder that relative paths are resolved against (default: the JSON file's).
        where: How messages name the item (default ``"<json_path>, item <index>"``).

    Raises:
        CorruptFileError: naming the file and the item index when the item is malformed.
    """
    where = where or _where(json_path, index)
    base = json_path.parent if base is None else base
    if not isinstance(item, (list, tuple)) or len(item) not in (2, 3):
        raise CorruptFileError(f"{where}: expected [image_path, mask_path or \"Negative\"] with an optional "
                               f"annotation dict, got {str(item)[:120]}")
    image, mask = item[0], item[1]
    meta = item[2] if len(item) == 3 else {}
    if not isinstance(image, str) or not image:
        raise CorruptFileError(f"{where}: the image path must be a non-empty string, got {image!r}")
    if mask is not None and not isinstance(mask, str):
        raise CorruptFileError(f"{where}: the mask must be a path, \"Negative\" or null, got {mask!r}")
    if not isinstance(meta, dict):
        raise CorruptFileError(f"{where}: the third element must be a dict of annotations, got {type(meta).__name__}")
    unknown = sorted(set(meta) - set(ANNOTATION_KEYS))
    if unknown:
        raise CorruptFileError(f"{where}: unknown annotation key(s) {unknown}; allowed: {', '.join(ANNOTATION_KEYS)}")
    negative = mask == NEGATIVE
    label = 0 if negative else 1
    if mask is None:
        label = meta.get("label", 0)
    if "label" in meta and meta["label"] != label:
        raise CorruptFileError(f"{where}: label {meta['label']!r} contradicts the mask field {mask!r} "
                               "(a mask path means 1, \"Negative\" means 0)")
    if label not in (0, 1):
        raise CorruptFileError(f"{where}: label must be 0 or 1, got {label!r}")
    boxes = meta.get("boxes", [])
    if not isinstance(boxes, list) or any(not isinstance(b, (list, tuple)) or len(b) != 4 or
                                          not all(isinstance(v, (int, float)) for v in b) for b in boxes):
        raise CorruptFileError(f"{where}: boxes must be a list of [x0, y0, x1, y1] numbers, got {boxes!r}")
    for b in boxes:
        if not (b[2] > b[0] and b[3] > b[1]):
            raise CorruptFileError(f"{where}: box {list(b)} is empty (need x1 > x0 and y1 > y0)")
    try:
        category_index(meta.get("category"))
        cues = meta.get("cues")
        if cues is not None:
            if not isinstance(cues, list):
                raise ValueError(f"cues must be a list of names, got {cues!r}")
            for c in cues:
                cue_index(c)
    except ValueError as e:
        raise CorruptFileError(f"{where}: {e}") from e
    pair_id = meta.get("pair_id", -1)
    if not isinstance(pair_id, int):
        raise CorruptFileError(f"{where}: pair_id must be an integer, got {pair_id!r}")
    editor = meta.get("editor", AUTHENTIC if label == 0 else "")
    if not isinstance(editor, str) or not isinstance(meta.get("text", ""), str):
        raise CorruptFileError(f"{where}: editor and text must be strings")
    return ManipulationRecord(
        image=_resolve(image, base), mask=None if (negative or mask is None) else _resolve(mask, base),
        label=int(label), boxes=[[float(v) for v in b] for b in boxes], category=meta.get("category"),
        cues=list(cues) if cues is not None else None, editor=editor, text=meta.get("text", ""), pair_id=pair_id)


def read_manipulation_json(path: str | Path) -> list[ManipulationRecord]:
    """Read an IMDL-BenCo JSON file, plain or extended (see the module docstring).

    Raises:
        FileNotFoundError: the file does not exist (the message names it).
        CorruptFileError: not JSON (with the line and column), not a list, or a malformed item (with its index).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"manipulation JSON not found: {path}")
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CorruptFileError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e
    except UnicodeDecodeError as e:
        raise CorruptFileError(f"{path}: not a UTF-8 text file ({e})") from e
    if not isinstance(items, list):
        raise CorruptFileError(f"{path}: expected a JSON list of [image, mask] items (IMDL-BenCo format), got "
                               f"{type(items).__name__}")
    base = path.resolve().parent
    return [parse_item(item, path, i, base) for i, item in enumerate(items)]


def _relative(path: str, base: Path) -> str:
    try:
        return Path(os.path.relpath(Path(path).resolve(), base)).as_posix() \
            if Path(path).resolve().is_relative_to(base) else str(path)
    except ValueError:
        return str(path)


def write_manipulation_json(records: list[ManipulationRecord], path: str | Path, annotations: bool = True) -> Path:
    """Write ``records`` as (extended) IMDL-BenCo JSON; ``annotations=False`` writes the plain two-element form.

    The file is written to a temporary name and renamed, so a reader never sees half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.resolve().parent
    items = []
    for r in records:
        mask: str | None = _relative(r.mask, base) if r.mask else (NEGATIVE if r.label == 0 else None)
        item: list[Any] = [_relative(r.image, base), mask]
        meta = r.annotations() if annotations else {}
        if meta:
            item.append(meta)
        items.append(item)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(items, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


__all__ = ["ANNOTATION_KEYS", "NEGATIVE", "ManipulationRecord", "parse_item", "read_manipulation_json",
           "write_manipulation_json"]
