"""Train and eval transforms built from a backbone's :class:`~visadapt.backbones.base.Preprocess`."""

from __future__ import annotations

from torchvision import transforms as T

from visadapt.backbones.base import Preprocess

_INTERP = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}


def build_transform(preprocess: Preprocess, train: bool, augment: str = "coop") -> T.Compose:
    """Eval: resize the short side, centre crop, normalise. Train with ``augment``:

    * ``coop``: RandomResizedCrop(scale 0.08-1) + horizontal flip (CoOp / CLIP-LoRA);
    * ``light``: RandomResizedCrop(scale 0.5-1) + flip, for small low-resolution images;
    * ``coact``: ``coop`` + ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8 + greyscale with p 0.2 (CoACT / FSCIL);
    * ``none``: the eval transform.
    """
    size, interp = preprocess.image_size, _INTERP.get(preprocess.interpolation, T.InterpolationMode.BICUBIC)
    norm = [T.ToTensor(), T.Normalize(preprocess.mean, preprocess.std)]
    if not train or augment == "none":
        return T.Compose([T.Resize(size, interpolation=interp), T.CenterCrop(size), *norm])
    scales = {"coop": (0.08, 1.0), "light": (0.5, 1.0), "coact": (0.08, 1.0)}
    if augment not in scales:
        raise ValueError(f"augment must be one of coop, light, coact, none; got {augment!r}")
    colour = []
    if augment == "coact":  # CoACT's recipe adds colour jitter (p 0.8) and greyscale (p 0.2)
        colour = [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2)]
    return T.Compose([T.RandomResizedCrop(size, scale=scales[augment], interpolation=interp),
                      T.RandomHorizontalFlip(), *colour, *norm])
