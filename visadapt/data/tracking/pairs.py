"""Training pairs for Siamese / one-stream trackers: a template crop and a search crop of the same object.

Each pair is a pure function of ``(seed, epoch, index)``: a ``torch.Generator`` seeded from those three numbers draws
every random choice (dataset, sequence, frames, jitter, flips, colour), so an epoch (a fixed number of pairs) is
reproducible with any number of workers and processes.

The recipe follows LoRAT / trackit (``reference/fscil_tracking.md`` 2.5):

* template and search frames of one track at most ``max_gap`` frames apart, absent frames skipped (a static-image
  dataset such as COCO gives the same image twice);
* template: SiamFC crop with area factor 2 (no jitter by default); search: area factor 4 with trackit's jitter, the
  scale divided by ``exp(N(0, 1) * scale_jitter)`` per axis and the centre moved uniformly within
  ``+-translation_jitter * (w' + h') / 2`` crop pixels (``w', h'``: the object's size in the crop); a draw that
  leaves less than ``min_object_size`` crop pixels of the object is redrawn (10 tries, then no jitter);
* horizontal flip (probability ``flip_prob``) and colour jitter (brightness, contrast, saturation factors in
  ``[1 - color_jitter, 1 + color_jitter]``, applied in that order), each drawn independently for template and search;
* DeiT-III "3-augment" (one of grayscale, solarise, Gaussian blur, the same for both crops) when ``three_augment``;
* normalisation with ``mean`` / ``std`` (ImageNet by default).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from torch.utils.data import Dataset, Sampler

from visadapt.data.tracking.crop import CropParams, crop_image, siamfc_params
from visadapt.data.tracking.sequence import TrackingSequence

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PairConfig:
    """How pairs are cut and augmented (see the module docstring for the recipe)."""

    template_size: int = 112
    search_size: int = 224
    template_area_factor: float = 2.0
    search_area_factor: float = 4.0
    max_gap: int = 100
    scale_jitter: float = 0.25
    translation_jitter: float = 3.0
    template_scale_jitter: float = 0.0
    template_translation_jitter: float = 0.0
    min_object_size: float = 10.0
    flip_prob: float = 0.5
    color_jitter: float = 0.4
    three_augment: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def pair_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed mixed from ``(seed, epoch, index)`` (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(2, np.uint64)[0] >> 1)


def _uniform(g: torch.Generator, low: float = 0.0, high: float = 1.0, n: int = 1) -> torch.Tensor:
    return torch.rand(n, generator=g, dtype=torch.float64) * (high - low) + low


def jittered_params(box: np.ndarray, area_factor: float, size: int, scale_jitter: float, translation_jitter: float,
                    min_object_size: float, g: torch.Generator, tries: int = 10) -> CropParams:
    """trackit's jittered SiamFC crop; falls back to the plain crop when ``tries`` draws all lose the object."""
    plain = siamfc_params(box, area_factor, size)
    if scale_jitter == 0 and translation_jitter == 0:
        return plain
    for _ in range(tries):
        factor = torch.exp(-torch.randn(2, generator=g, dtype=torch.float64) * scale_jitter).numpy()
        sx, sy = plain.scale[0] * factor[0], plain.scale[1] * factor[1]
        max_move = (box[2] * sx + box[3] * sy) * 0.5 * translation_jitter
        offset = (_uniform(g, -1.0, 1.0, 2) * max_move).numpy()
        p = siamfc_params(box, area_factor, size, (factor[0], factor[1]), (offset[0], offset[1]))
        b = p.to_crop(box)
        x0, y0 = max(b[0], 0.0), max(b[1], 0.0)
        x1, y1 = min(b[0] + b[2], size), min(b[1] + b[3], size)
        if x1 - x0 >= min_object_size and y1 - y0 >= min_object_size:
            return p
    return plain


def _color_jitter(img: Image.Image, amount: float, g: torch.Generator) -> Image.Image:
    """Brightness, contrast and saturation factors in ``[1 - amount, 1 + amount]`` (PIL ``ImageEnhance``, the
    operations torchvision's ``ColorJitter`` uses), applied in that order."""
    if amount <= 0:
        return img
    b, c, s = _uniform(g, max(0.0, 1 - amount), 1 + amount, 3).tolist()
    img = ImageEnhance.Brightness(img).enhance(b)
    img = ImageEnhance.Contrast(img).enhance(c)
    return ImageEnhance.Color(img).enhance(s)


def _three_augment(images: list[Image.Image], g: torch.Generator) -> list[Image.Image]:
    """DeiT-III 3-augment: one of grayscale, solarise (threshold 128), Gaussian blur (sigma in [0.1, 2])."""
    choice = int(torch.randint(3, (1,), generator=g))
    if choice == 0:
        return [im.convert("L").convert("RGB") for im in images]
    if choice == 1:
        return [ImageOps.solarize(im, 128) for im in images]
    sigma = float(_uniform(g, 0.1, 2.0))
    return [im.filter(ImageFilter.GaussianBlur(sigma)) for im in images]


def _usable(seq: TrackingSequence) -> np.ndarray:
    """Indices of annotated, visible frames with a box of positive size."""
    b = seq.boxes
    ok = seq.visible & (b[:, 2] > 0) & (b[:, 3] > 0) & np.isfinite(b).all(1)
    return np.flatnonzero(ok)


class TrackingPairDataset(Dataset):
    """Pairs drawn from several tracking datasets; item ``key`` is pair ``key % pairs_per_epoch`` of epoch
    ``key // pairs_per_epoch`` (the :class:`EpochPairSampler` makes the keys).

    Args:
        sources: Lists of sequences (e.g. :class:`~visadapt.data.tracking.TrackingDataset`), one per dataset.
        weights: Sampling weight of each source (a source is drawn first, then a sequence uniformly in it).
        pairs_per_epoch: Pairs in an epoch.
        seed: Base seed.
        config: Crop and augmentation settings.
        augment: ``False`` turns off flips, colour jitter and 3-augment (the crop jitter stays: validation pairs).
        fixed_epoch: Always use this epoch's draws (validation: the same pairs every time).
    """

    def __init__(self, sources: Sequence[Sequence[TrackingSequence]], weights: Sequence[float] | None = None,
                 pairs_per_epoch: int = 1024, seed: int = 0, config: PairConfig = PairConfig(),
                 augment: bool = True, fixed_epoch: int | None = None) -> None:
        self.sources: list[list[TrackingSequence]] = []
        self.frames: list[list[np.ndarray]] = []
        kept_weights = []
        weights = list(weights) if weights is not None else [1.0] * len(sources)
        if len(weights) != len(sources):
            raise ValueError(f"{len(weights)} weights for {len(sources)} sources")
        for src, w in zip(sources, weights):
            seqs, usable = [], []
            for s in src:
                u = _usable(s)
                if len(u):
                    seqs.append(s)
                    usable.append(u)
            if seqs and w > 0:
                self.sources.append(seqs)
                self.frames.append(usable)
                kept_weights.append(float(w))
        if not self.sources:
            raise ValueError("no sequence with a visible annotated frame in the training sources")
        self.weights = torch.tensor(kept_weights, dtype=torch.float64)
        self.pairs_per_epoch, self.seed, self.config = int(pairs_per_epoch), int(seed), config
        self.augment, self.fixed_epoch = augment, fixed_epoch
        self._mean = np.asarray(config.mean, dtype=np.float32)
        self._std = np.asarray(config.std, dtype=np.float32)

    def __len__(self) -> int:
        return self.pairs_per_epoch

    def draw(self, epoch: int, index: int) -> tuple[TrackingSequence, int, int, torch.Generator]:
        """The sequence and the (template, search) frame indices of pair ``index`` of ``epoch``."""
        g = torch.Generator().manual_seed(pair_seed(self.seed, epoch, index))
        src = int(torch.multinomial(self.weights, 1, generator=g)) if len(self.sources) > 1 else 0
        k = int(torch.randint(len(self.sources[src]), (1,), generator=g))
        seq, usable = self.sources[src][k], self.frames[src][k]
        t = int(usable[int(torch.randint(len(usable), (1,), generator=g))])
        near = usable[np.abs(usable - t) <= self.config.max_gap]
        s = int(near[int(torch.randint(len(near), (1,), generator=g))])
        return seq, t, s, g

    @staticmethod
    def _crop(image: np.ndarray, params: CropParams, box: np.ndarray, flip: bool) -> tuple[Image.Image,
                                                                                          torch.Tensor]:
        crop = Image.fromarray(crop_image(image, params))
        size = params.output_size[0]
        b = params.to_crop(box)
        xyxy = np.array([b[0], b[1], b[0] + b[2], b[1] + b[3]]).clip(0, size)
        if flip:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            xyxy = np.array([size - xyxy[2], xyxy[1], size - xyxy[0], xyxy[3]])
        return crop, torch.tensor(xyxy / size, dtype=torch.float32)

    def _normalise(self, img: Image.Image) -> torch.Tensor:
        x = (np.asarray(img, dtype=np.float32) / 255.0 - self._mean) / self._std
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))

    def __getitem__(self, key: int) -> dict[str, torch.Tensor]:
        epoch, index = divmod(int(key), self.pairs_per_epoch)
        if self.fixed_epoch is not None:
            epoch = self.fixed_epoch
        seq, t, s, g = self.draw(epoch, index)
        c = self.config
        t_box, s_box = seq.boxes[t], seq.boxes[s]
        t_params = jittered_params(t_box, c.template_area_factor, c.template_size, c.template_scale_jitter,
                                   c.template_translation_jitter, c.min_object_size, g)
        s_params = jittered_params(s_box, c.search_area_factor, c.search_size, c.scale_jitter,
                                   c.translation_jitter, c.min_object_size, g)
        flips = (_uniform(g, n=2) < c.flip_prob).tolist() if self.augment else [False, False]
        template, template_box = self._crop(seq.load_frame(t), t_params, t_box, flips[0])
        search, search_box = self._crop(seq.load_frame(s), s_params, s_box, flips[1])
        if self.augment:
            template = _color_jitter(template, c.color_jitter, g)
            search = _color_jitter(search, c.color_jitter, g)
            if c.three_augment:
                template, search = _three_augment([template, search], g)
        return {"template": self._normalise(template), "search": self._normalise(search),
                "template_box": template_box, "search_box": search_box}


class EpochPairSampler(Sampler[int]):
    """Yields the keys ``epoch * n ... epoch * n + n - 1``; Lightning calls :meth:`set_epoch` every epoch (also
    through its distributed wrapper, which then splits and shuffles the keys among processes)."""

    def __init__(self, pairs_per_epoch: int) -> None:
        self.n, self.epoch = int(pairs_per_epoch), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.epoch * self.n, (self.epoch + 1) * self.n))


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EpochPairSampler",
    "PairConfig",
    "TrackingPairDataset",
    "jittered_params",
    "pair_seed",
]
