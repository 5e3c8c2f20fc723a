"""The offline generator's "editors": real manipulations of real photos, each with its exact mask.

Every editor takes the base image (uint8 HxWx3), a random generator and a donor provider, edits one region and
returns ``(edited, mask, info)``. The edit is *composited through the mask*: outside the mask the edited image is
bit-identical to the base, for every editor. Inside the mask the pixels come from the edit; the mask is the edited
region (for ``text_insertion``, the pixels the rendered glyphs cover, antialiasing included), so an edited pixel can
occasionally equal its original value. ``info`` holds the editor's fixed cues, words for the explanation and a few
parameters.

Cues are partly fixed per editor (what the edit is: a copy-move duplicates *structure*) and partly measured on the
pixels (:func:`measured_cues`: a change of brightness is *light*, of chroma *color*, a loss of high frequencies
*blur*, a gain *noise*), so the cue labels of two edits by the same editor can differ.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

Donor = Callable[[np.random.Generator], np.ndarray]
"""Returns another real photo crop (uint8, the base image's size), e.g. for splicing."""

WORDS = ("SALE", "OPEN", "EXIT", "STOP", "CAFE", "HOTEL", "2024", "FREE", "NEWS", "PARK", "BANK", "TAXI", "LOVE",
         "POLICE", "HELLO", "DANGER", "MUSEUM", "OK")


# -- regions ----------------------------------------------------------------------------------------------------------
def blob_mask(rng: np.random.Generator, h: int, w: int, area: tuple[float, float] = (0.04, 0.14),
              center: tuple[float, float] | None = None) -> np.ndarray:
    """A random star-shaped polygon (6-10 vertices) or ellipse covering about ``area`` of the image, as bool HxW."""
    frac = rng.uniform(*area)
    r = np.sqrt(frac * h * w / np.pi)
    if center is None:
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    else:
        cx, cy = center
    im = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(im)
    if rng.random() < 0.3:
        ratio = rng.uniform(0.6, 1.6)
        rx, ry = r * np.sqrt(ratio), r / np.sqrt(ratio)
        d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    else:
        n = int(rng.integers(6, 11))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = r * rng.uniform(0.7, 1.3, n)
        d.polygon([(float(cx + q * np.cos(a)), float(cy + q * np.sin(a))) for a, q in zip(angles, radii)], fill=255)
    return np.asarray(im) > 127


def shift_mask(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``mask`` translated by ``(dy, dx)``; what moves out of the frame is lost."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    ys, xs = slice(max(dy, 0), h + min(dy, 0)), slice(max(dx, 0), w + min(dx, 0))
    yt, xt = slice(max(-dy, 0), h + min(-dy, 0)), slice(max(-dx, 0), w + min(-dx, 0))
    out[ys, xs] = mask[yt, xt]
    return out


def shift_image(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``img`` translated by ``(dy, dx)`` (content at p moves to p + (dy, dx)); uncovered pixels keep ``img``."""
    out = img.copy()
    h, w = img.shape[:2]
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = img[max(-dy, 0):h + min(-dy, 0),
                                                                    max(-dx, 0):w + min(-dx, 0)]
    return out


def composite(base: np.ndarray, edited: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``edited`` inside ``mask``, ``base`` (bit for bit) outside."""
    return np.where(mask[..., None], edited, base).astype(np.uint8)


# -- measured cues ----------------------------------------------------------------------------------------------------
def _luma(img: np.ndarray) -> np.ndarray:
    return img[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def _high_freq(gray: np.ndarray) -> np.ndarray:
    lap = np.zeros_like(gray)
    lap[1:-1, 1:-1] = (4 * gray[1:-1, 1:-1] - gray[:-2, 1:-1] - gray[2:, 1:-1] - gray[1:-1, :-2] - gray[1:-1, 2:])
    return np.abs(lap)


def measured_cues(before: np.ndarray, after: np.ndarray, mask: np.ndarray) -> list[str]:
    """Low-level cues read off the pixels of the edited region.

    * ``light``: the mean luma inside the mask moved by more than 12 (of 255);
    * ``color``: the mean absolute change of chroma (RGB minus luma) inside the mask exceeds 10;
    * ``blur`` / ``noise``: the mean absolute Laplacian inside the mask fell below 0.6x / rose above 1.6x.
    """
    if not mask.any():
        return []
    lb, la = _luma(before), _luma(after)
    cues = []
    if abs(float(la[mask].mean() - lb[mask].mean())) > 12:
        cues.append("light")
    chroma_b = before.astype(np.float32) - lb[..., None]
    chroma_a = after.astype(np.float32) - la[..., None]
    if float(np.abs(chroma_a - chroma_b)[mask].mean()) > 10:
        cues.append("color")
    hb, ha = float(_high_freq(lb)[mask].mean()), float(_high_freq(la)[mask].mean())
    if ha < 0.6 * hb:
        cues.append("blur")
    elif ha > 1.6 * max(hb, 1.0):
        cues.append("noise")
    return cues


# -- editors ----------------------------------------------------------------------------------------------------------
def splicing(base: np.ndarray, rng: np.random.Generator, donor: Donor) -> tuple[np.ndarray, np.ndarray, dict]:
    """Paste a region of *another* real photo (never JPEG-compressed like the base) into the base image."""
    h, w = base.shape[:2]
    other = donor(rng)  # a random crop of another photo: the pasted object sits where the mask is
    mask = blob_mask(rng, h, w)
    return composite(base, other, mask), mask, {"cues": ["relation", "shape"]}


def copy_move(base: np.ndarray, rng: np.random.Generator, donor: Donor) -> tuple[np.ndarray, np.ndarray, dict]:
    """Copy a region of the same image and paste it elsewhere (destination mask; the source stays untouched)."""
    h, w = base.shape[:2]
    for _ in range(20):
        src = blob_mask(rng, h, w, area=(0.03, 0.10))
        dy, dx = int(rng.integers(-h // 2, h // 2 + 1)), int(rng.integers(-w // 2, w // 2 + 1))
        dst = shift_mask(src, dy, dx)
        if dst.sum() > 0.8 * src.sum() and (np.abs(dy) + np.abs(dx)) > 0.15 * (h + w):
            break
    edited = shift_image(base, dy, dx)
    return composite(base, edited, dst), dst, {"cues": ["structure", "relation"], "shift": (dy, dx)}


def removal(base: np.ndarray, rng: np.random.Generator, donor: Donor) -> tuple[np.ndarray, np.ndarray, dict]:
    """Erase a region and fill it by biharmonic inpainting (``skimage.restoration.inpaint_biharmonic``)."""
    from skimage.restoration import inpaint_biharmonic

    h, w = base.shape[:2]
    mask = blob_mask(rng, h, w, area=(0.02, 0.08))
    filled = inpaint_biharmonic(base.astype(np.float64) / 255.0, mask, channel_axis=-1)
    edited = np.clip(np.round(filled * 255.0), 0, 255).astype(np.uint8)
    return composite(base, edited, mask), mask, {"cues": ["structure", "detail"]}


def color_change(base: np.ndarray, rng: np.random.Generator, donor: Donor) -> tuple[np.ndarray, np.ndarray, dict]:
    """Rotate the hue of a region (and give grey regions a colour), keeping its brightness pattern."""
    h, w = base.shape[:2]
    mask = blob_mask(rng, h, w)
    hsv = np.asarray(Image.fromarray(base).convert("HSV")).astype(np.int32)
    shift = int(rng.integers(50, 206))  # 70-290 degrees on PIL's 0-255 hue circle
    hsv[..., 0] = (hsv[..., 0] + shift) % 256
    if hsv[..., 1][mask].mean() < 40:  # a grey region has no hue to rotate: tint it
        hsv[..., 0] = int(rng.integers(0, 256))
        hsv[..., 1] = np.maximum(hsv[..., 1], int(rng.integers(90, 170)))
    edited = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"))
    return composite(base, edited, mask), mask, {"cues": ["color"], "hue_shift": shift}


def material_change(base: np.ndarray, rng: np.random.Generator, donor: Donor,
                    textures: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Replace the surface texture of a region with a real texture photo (brick, grass, gravel), keeping the region's
    low-frequency shading and colour."""
    h, w = base.shape[:2]
    mask = blob_mask(rng, h, w)
    tex = textures[int(rng.integers(len(textures)))] if textures else _luma(donor(rng))
    th, tw = tex.shape
    side = int(rng.integers(min(th, tw) // 4, min(th, tw) // 2 + 1))
    y0, x0 = int(rng.integers(0, th - side + 1)), int(rng.integers(0, tw - side + 1))
    patch = np.asarray(Image.fromarray(tex[y0:y0 + side, x0:x0 + side].astype(np.uint8)).resize((w, h),
                       Image.BILINEAR), np.float32)
    patch = (patch - patch.mean()) / (patch.std() + 1e-6)
    smooth = np.asarray(Image.fromarray(base).filter(ImageFilter.GaussianBlur(4)), np.float32)
    edited = np.clip(smooth + rng.uniform(22, 40) * patch[..., None], 0, 255).round().astype(np.uint8)
    return composite(base, edited, mask), mask, {"cues": ["texture", "detail"]}


def resizing(base: np.ndarray, rng: np.random.Generator, donor: Donor) -> tuple[np.ndarray, np.ndarray, dict]:
    """Enlarge a region by 1.25-1.6x about its centre: the scaled region is drawn over the original."""
    h, w = base.shape[:2]
    s = float(rng.uniform(1.25, 1.6))
    r = np.sqrt(0.06 * h * w / np.pi) * s
    cx, cy = float(rng.uniform(r, w - r)), float(rng.uniform(r, h - r))
    small = blob_mask(rng, h, w, area=(0.03, 0.07), center=(cx, cy))
    # output pixel p shows input pixel c + (p - c) / s (PIL's affine maps output to input coordinates)
    coeffs = (1 / s, 0.0, cx - cx / s, 0.0, 1 / s, cy - cy / s)
    edited = np.asarray(Image.fromarray(base).transform((w, h), Image.AFFINE, coeffs, Image.BICUBIC))
    mask = np.asarray(Image.fromarray(small.astype(np.uint8) * 255).transform((w, h), Image.AFFINE, coeffs,
                                                                                Image.NEAREST)) > 127
    return composite(base, edited, mask), mask, {"cues": ["shape", "relation"], "scale": s}


def text_insertion(base: np.ndarray, rng: np.random.Generator, donor: Donor) -> tuple[np.ndarray, np.ndarray, dict]:
    """Write a word onto the photo with PIL's built-in FreeType font; the mask is every pixel the glyphs touch."""
    h, w = base.shape[:2]
    word = WORDS[int(rng.integers(len(WORDS)))]
    font = ImageFont.load_default(size=max(8, int(h * rng.uniform(0.10, 0.18))))
    layer = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(layer)
    x0, y0, x1, y1 = d.textbbox((0, 0), word, font=font)
    tw, th = x1 - x0, y1 - y0
    px = int(rng.integers(0, max(w - tw, 0) + 1)) - x0
    py = int(rng.integers(0, max(h - th, 0) + 1)) - y0
    d.text((px, py), word, fill=255, font=font)
    alpha = np.asarray(layer, np.float32) / 255.0
    mask = alpha > 0
    region = base[mask] if mask.any() else base.reshape(-1, 3)
    colour = np.where(region.mean(0) > 127, rng.integers(0, 60, 3), rng.integers(195, 256, 3)).astype(np.float32)
    edited = np.round(base * (1 - alpha[..., None]) + colour * alpha[..., None]).astype(np.uint8)
    return composite(base, edited, mask), mask, {"cues": ["text"], "word": word}


def blur(base: np.ndarray, rng: np.random.Generator, donor: Donor) -> tuple[np.ndarray, np.ndarray, dict]:
    """Gaussian-blur a region (radius 1.5-3.5 px)."""
    h, w = base.shape[:2]
    mask = blob_mask(rng, h, w)
    radius = float(rng.uniform(1.5, 3.5))
    edited = np.asarray(Image.fromarray(base).filter(ImageFilter.GaussianBlur(radius)))
    return composite(base, edited, mask), mask, {"cues": ["blur", "detail"], "radius": radius}


def noise(base: np.ndarray, rng: np.random.Generator, donor: Donor) -> tuple[np.ndarray, np.ndarray, dict]:
    """Add Gaussian noise (sigma 6-16 of 255) to a region."""
    h, w = base.shape[:2]
    mask = blob_mask(rng, h, w)
    sigma = float(rng.uniform(6, 16))
    edited = np.clip(base + rng.normal(0, sigma, base.shape), 0, 255).round().astype(np.uint8)
    return composite(base, edited, mask), mask, {"cues": ["noise", "texture"], "sigma": sigma}


def jpeg(base: np.ndarray, rng: np.random.Generator, donor: Donor) -> tuple[np.ndarray, np.ndarray, dict]:
    """Replace a region by a JPEG-recompressed copy of itself (quality 10-40): local recompression."""
    h, w = base.shape[:2]
    mask = blob_mask(rng, h, w)
    quality = int(rng.integers(10, 41))
    edited = jpeg_roundtrip(base, quality)
    return composite(base, edited, mask), mask, {"cues": ["detail", "texture"], "quality": quality}


def jpeg_roundtrip(img: np.ndarray, quality: int) -> np.ndarray:
    """``img`` saved as JPEG at ``quality`` (PIL, 4:2:0 chroma subsampling) and decoded again."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


EDITOR_FUNCTIONS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray, dict[str, Any]]]] = {
    "splicing": splicing, "copy_move": copy_move, "removal": removal, "color_change": color_change,
    "material_change": material_change, "resizing": resizing, "text_insertion": text_insertion, "blur": blur,
    "noise": noise, "jpeg": jpeg,
}


# -- explanations -----------------------------------------------------------------------------------------------------
_WHAT = {
    "splicing": ("an object from another photograph was pasted in", "a region was spliced in from a different picture"),
    "copy_move": ("a part of the image was copied and pasted elsewhere in the same image",
                  "a region was duplicated from another part of the same photo"),
    "removal": ("something was removed and the hole filled by inpainting",
                "content was erased and smoothly filled in"),
    "color_change": ("the colour of a region was changed", "a region was recoloured"),
    "material_change": ("the material of a surface was replaced with a different texture",
                        "a surface was given a new texture"),
    "resizing": ("an object was enlarged", "a region was scaled up"),
    "text_insertion": ('the text "{word}" was added', 'the word "{word}" was written onto the photo'),
    "blur": ("a region was blurred", "a region was artificially defocused"),
    "noise": ("noise was added to a region", "the grain of a region was changed by added noise"),
    "jpeg": ("a region was recompressed at a low JPEG quality", "a region carries stronger compression artefacts"),
}
_AUTHENTIC = ("Authentic. No sign of editing: lighting, texture and noise are consistent across the image.",
              "Authentic. The image shows no manipulated region; its details and compression look uniform.")


def position_words(box: list[float], w: int, h: int) -> str:
    """Where a pixel box lies, in words (``upper left``, ``centre``, ``bottom`` ...)."""
    cx, cy = (box[0] + box[2]) / 2 / w, (box[1] + box[3]) / 2 / h
    row = 0 if cy < 1 / 3 else (1 if cy < 2 / 3 else 2)
    col = 0 if cx < 1 / 3 else (1 if cx < 2 / 3 else 2)
    return [["upper left", "top", "upper right"], ["left", "centre", "right"],
            ["lower left", "bottom", "lower right"]][row][col]


def explanation(editor: str | None, cues: list[str], box: list[float] | None, size: tuple[int, int],
                rng: np.random.Generator, info: dict | None = None) -> str:
    """A templated explanation: verdict, what was done where, and the cues that give it away."""
    if editor is None:
        return _AUTHENTIC[int(rng.integers(len(_AUTHENTIC)))]
    what = _WHAT[editor][int(rng.integers(2))].format(**(info or {}))
    where = position_words(box, *size) if box else "image"
    text = f"Manipulated. In the {where} of the image, {what}."
    if cues:
        names = [c.replace("_", " ") for c in cues]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        text += f" Cues: {listed}."
    return text


__all__ = ["EDITOR_FUNCTIONS", "WORDS", "blob_mask", "composite", "explanation", "jpeg_roundtrip", "measured_cues",
           "position_words", "shift_image", "shift_mask"]
