"""Offline generator of manipulation data from the real photos that ship in scikit-image and scikit-learn.

Each *group* (one ``pair_id``) is one authentic image and its edited twin(s):

1. **Authentic image.** A random square crop (35-100 % of the short side) of one of the bundled photos
   (:func:`visadapt.data.photos.sample_photo_arrays` plus scikit-image's motorcycle), resized to ``size`` (Lanczos)
   and passed once through JPEG at a random quality 75-95, as a camera would; label 0, editor ``"authentic"``.
2. **Edits.** ``edits_per_image`` editors (taken round-robin from ``editors``, so every editor gets the same count)
   each edit that image once (:mod:`visadapt.data.manipulation.editors`): the exact mask, the box (the mask's
   bounding box), the category of the editor, cues (fixed per editor plus measured on the pixels) and a templated
   explanation are recorded. Outside its mask an edited image is bit-identical to its authentic twin.

Everything is a function of ``(seed, split, group index, editor)``: the same arguments give bit-identical files.
Images and masks are written as PNG (lossless, so the masks stay exact and the JPEG history of the authentic image
is kept as it was), with the extended IMDL-BenCo JSON ``data.json`` beside them, into a cache folder named by the
arguments; a second call reads the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from visadapt.data._registry import register_dataset
from visadapt.data.manipulation.dataset import ManipulationDataset, mask_bbox
from visadapt.data.manipulation.editors import EDITOR_FUNCTIONS, explanation, jpeg_roundtrip, measured_cues
from visadapt.data.manipulation.format import ManipulationRecord, read_manipulation_json, write_manipulation_json
from visadapt.data.manipulation.vocab import AUTHENTIC, CUES, EDITOR_CATEGORY, EDITORS

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
"""Bump when the output of the generator changes, so that old caches are not reused."""
SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}
DEFAULT_CACHE = "~/.cache/visadapt"


def default_cache_root() -> Path:
    """``$VISADAPT_CACHE`` or ``~/.cache/visadapt``, plus ``generated_manipulations``."""
    return Path(os.environ.get("VISADAPT_CACHE", DEFAULT_CACHE)).expanduser() / "generated_manipulations"


_PHOTOS: list[tuple[str, np.ndarray]] | None = None
_TEXTURES: list[np.ndarray] | None = None


def source_photos() -> list[tuple[str, np.ndarray]]:
    """``(id, HxWx3 uint8)`` of the real photos used as base images and splicing donors (loaded once)."""
    global _PHOTOS
    if _PHOTOS is None:
        from skimage import data as skdata

        from visadapt.data.photos import sample_photo_arrays

        photos = [(pid, arr) for pid, _, arr in sample_photo_arrays()]
        photos.append(("skimage.motorcycle", np.ascontiguousarray(skdata.stereo_motorcycle()[0][..., :3])))
        _PHOTOS = photos
    return _PHOTOS


def texture_photos() -> list[np.ndarray]:
    """Greyscale texture photos (scikit-image brick, grass, gravel) for ``material_change``."""
    global _TEXTURES
    if _TEXTURES is None:
        from skimage import data as skdata

        _TEXTURES = [np.asarray(getattr(skdata, n)(), np.float32) for n in ("brick", "grass", "gravel")]
    return _TEXTURES


def random_crop(photo: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop of 35-100 % of the short side, resized to ``size`` x ``size`` (Lanczos)."""
    h, w = photo.shape[:2]
    side = int(rng.uniform(0.35, 1.0) * min(h, w))
    y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(photo[y0:y0 + side, x0:x0 + side])
    return np.asarray(crop.resize((size, size), Image.LANCZOS))


def make_group(index: int, editors: Sequence[str], size: int, seed: int, stream: int,
               edits_per_image: int = 1) -> list[dict]:
    """One authentic image and its edits, in memory: a list of dicts with ``image``, ``mask`` (bool or None),
    ``editor``, ``category``, ``cues``, ``box``, ``text``."""
    photos = source_photos()
    rng = np.random.default_rng([seed, stream, index])
    src = int(rng.integers(len(photos)))
    base = jpeg_roundtrip(random_crop(photos[src][1], size, rng), int(rng.integers(75, 96)))
    out = [{"image": base, "mask": None, "editor": AUTHENTIC, "category": None, "cues": [], "box": None,
            "text": explanation(None, [], None, (size, size), rng), "source": photos[src][0]}]
    for j in range(edits_per_image):
        editor = editors[(index * edits_per_image + j) % len(editors)]
        erng = np.random.default_rng([seed, stream, index, EDITORS.index(editor), j])

        def donor(r: np.random.Generator) -> np.ndarray:
            k = int(r.integers(len(photos) - 1))
            return random_crop(photos[k + (k >= src)][1], size, r)  # any photo but the base's source

        kwargs = {"textures": texture_photos()} if editor == "material_change" else {}
        for _ in range(10):  # an edit that changes almost nothing (e.g. a flat region) is drawn again
            edited, mask, info = EDITOR_FUNCTIONS[editor](base, erng, donor, **kwargs)
            if mask.any() and (edited != base).any(-1)[mask].mean() > 0.3:
                break
        cues = [c for c in CUES if c in set(info["cues"]) | set(measured_cues(base, edited, mask))]
        box = mask_bbox(mask)
        out.append({"image": edited, "mask": mask, "editor": editor, "category": EDITOR_CATEGORY[editor],
                    "cues": cues, "box": box, "text": explanation(editor, cues, box, (size, size), erng, info),
                    "source": photos[src][0]})
    return out


def _cache_key(split: str, num_images: int, size: int, editors: Sequence[str], edits_per_image: int,
               seed: int) -> str:
    spec = json.dumps([GENERATOR_VERSION, split, num_images, size, list(editors), edits_per_image, seed])
    return f"{split}-n{num_images}-s{size}-seed{seed}-{hashlib.sha1(spec.encode()).hexdigest()[:10]}"


def generate(folder: str | Path, num_images: int, split: str = "train", size: int = 224,
             editors: Sequence[str] | None = None, edits_per_image: int = 1, seed: int = 0,
             progress: bool = True, overwrite: bool = True) -> Path:
    """Generate ``num_images`` groups into ``folder`` (``images/``, ``masks/``, ``data.json``); returns the JSON path.

    The folder is written under a temporary name and renamed when complete, so an interrupted run leaves no half
    dataset behind. With ``overwrite=False`` a complete folder that appeared meanwhile (a concurrent run) is kept.
    """
    editors = _check_editors(editors)
    if split not in SPLIT_STREAMS:
        raise ValueError(f"generated_manipulations: split must be one of {list(SPLIT_STREAMS)}, got {split!r}")
    folder = Path(folder)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    (tmp / "masks").mkdir()
    records: list[ManipulationRecord] = []
    from tqdm.auto import tqdm

    start = time.perf_counter()
    for i in tqdm(range(num_images), desc=f"generating manipulations ({split})", disable=not progress):
        for item in make_group(i, editors, size, seed, SPLIT_STREAMS[split], edits_per_image):
            stem = f"{i:05d}_{item['editor']}"
            img_path = tmp / "images" / f"{stem}.png"
            Image.fromarray(item["image"]).save(img_path)
            mask_path = None
            if item["mask"] is not None:
                mask_path = tmp / "masks" / f"{stem}.png"
                Image.fromarray(item["mask"].astype(np.uint8) * 255).save(mask_path)
            records.append(ManipulationRecord(
                image=str(folder / "images" / img_path.name),
                mask=str(folder / "masks" / mask_path.name) if mask_path else None,
                label=int(item["mask"] is not None), boxes=[item["box"]] if item["box"] else [],
                category=item["category"], cues=item["cues"], editor=item["editor"], text=item["text"], pair_id=i))
    elapsed = time.perf_counter() - start
    # paths are written relative to the JSON, so they are valid after the rename
    write_manipulation_json([_rebased(r, folder, tmp) for r in records], tmp / "data.json")
    (tmp / "generator.json").write_text(json.dumps({
        "version": GENERATOR_VERSION, "split": split, "num_images": num_images, "size": size, "editors": editors,
        "edits_per_image": edits_per_image, "seed": seed, "seconds": round(elapsed, 3),
        "images": len(records)}, indent=1) + "\n")
    if (folder / "data.json").is_file() and not overwrite:
        shutil.rmtree(tmp)  # another process finished the same (deterministic) set first: keep its copy
    else:
        if folder.exists():
            shutil.rmtree(folder)
        tmp.replace(folder)
    return folder / "data.json"


def _rebased(r: ManipulationRecord, final: Path, tmp: Path) -> ManipulationRecord:
    def swap(p: str | None) -> str | None:
        return str(tmp / Path(p).relative_to(final)) if p else None

    return ManipulationRecord(swap(r.image), swap(r.mask), r.label, r.boxes, r.category, r.cues, r.editor, r.text,
                              r.pair_id)


def _check_editors(editors: Sequence[str] | None) -> list[str]:
    editors = list(EDITORS if editors is None else editors)
    unknown = [e for e in editors if e not in EDITORS]
    if unknown or not editors:
        raise ValueError(f"unknown editor(s) {unknown or '(none given)'}; the generator's editors are: "
                         f"{', '.join(EDITORS)}")
    return editors


@register_dataset("generated_manipulations")
def generated_manipulations(root: str | None = None, split: str = "train", transform: Callable | None = None,
                            num_images: int = 200, size: int = 224, editors: Sequence[str] | None = None,
                            edits_per_image: int = 1, seed: int = 0, regenerate: bool = False,
                            on_bad_image: str = "raise") -> ManipulationDataset:
    """Real edits of the photos bundled in scikit-image/scikit-learn, with exact masks, boxes, cues, explanations.

    Ten editors: splicing, copy-move, inpainting removal, colour, material, resizing, text, blur, noise and local JPEG
    recompression (:data:`~visadapt.data.manipulation.vocab.EDITORS`); the output is cached on disk.

    Args:
        root: Cache folder (default ``$VISADAPT_CACHE/generated_manipulations`` or
            ``~/.cache/visadapt/generated_manipulations``); one sub-folder per set of arguments.
        split: ``train``, ``val`` or ``test``: independent random streams (different crops and edits).
        num_images: Authentic images (groups); each brings ``edits_per_image`` edited twins.
        size: Side of the square images.
        editors: The editors to use, round-robin (default: all of ``EDITORS``).
        edits_per_image: Edited twins per authentic image.
        seed: Generator seed.
        regenerate: Ignore an existing cache folder and write it again.
    """
    editors = _check_editors(editors)
    base = Path(root).expanduser() if root else default_cache_root()
    folder = base / _cache_key(split, num_images, size, editors, edits_per_image, seed)
    json_path = folder / "data.json"
    if regenerate or not json_path.is_file():
        log.info("generating %d manipulation groups into %s", num_images, folder)
        generate(folder, num_images, split, size, editors, edits_per_image, seed, overwrite=regenerate)
    return ManipulationDataset(read_manipulation_json(json_path), transform, name=str(folder),
                               on_bad_image=on_bad_image)


__all__ = ["GENERATOR_VERSION", "default_cache_root", "generate", "generated_manipulations", "make_group",
           "random_crop", "source_photos", "texture_photos"]
