"""SiamFC-style crops with context and mean padding, and the box mappings between a frame and a crop.

A crop is the affine map ``crop = frame * scale + translation`` (per axis, continuous pixel coordinates: pixel ``i``
covers ``[i, i + 1)``), sampled bilinearly; pixels outside the frame take the frame's per-channel mean.

The crop around a box ``(x, y, w, h)`` with area factor ``f`` covers a square of side ``sqrt((w + p) (h + p))`` with
``p = (f - 1) (w + h) / 2`` centred on the box (SiamFC's context rule; LoRAT uses ``f = 2`` for the template and 4 or
5 for the search region), resized to ``output_size``. :func:`box_to_crop` and :func:`box_from_crop` map boxes each
way; the tracker maps its prediction back to the frame with :func:`box_from_crop`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


def _pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    w, h = size
    return int(w), int(h)


@dataclass(frozen=True)
class CropParams:
    """The affine map of a crop: ``crop_xy = frame_xy * scale + translation``.

    Attributes:
        scale: ``(sx, sy)`` crop pixels per frame pixel (equal for a plain SiamFC crop; jitter can make them differ).
        translation: ``(tx, ty)`` in crop pixels.
        output_size: ``(width, height)`` of the crop.
    """

    scale: tuple[float, float]
    translation: tuple[float, float]
    output_size: tuple[int, int]

    def to_crop(self, box_xywh: np.ndarray) -> np.ndarray:
        """Boxes ``(..., 4)`` xywh in frame pixels -> crop pixels."""
        return box_to_crop(box_xywh, self)

    def to_frame(self, box_xywh: np.ndarray) -> np.ndarray:
        """Boxes ``(..., 4)`` xywh in crop pixels -> frame pixels."""
        return box_from_crop(box_xywh, self)


def context_side(box_xywh: np.ndarray, area_factor: float) -> float:
    """Side of the SiamFC context square: ``sqrt((w + p)(h + p))``, ``p = (area_factor - 1)(w + h) / 2``."""
    w, h = float(box_xywh[2]), float(box_xywh[3])
    if not (w > 0 and h > 0):
        raise ValueError(f"box {list(np.asarray(box_xywh).tolist())} has no area; a crop needs w, h > 0")
    p = (area_factor - 1.0) * (w + h) / 2.0
    return float(np.sqrt((w + p) * (h + p)))


def siamfc_params(box_xywh: np.ndarray, area_factor: float, output_size: int | tuple[int, int],
                  scale_factor: tuple[float, float] = (1.0, 1.0),
                  center_offset: tuple[float, float] = (0.0, 0.0)) -> CropParams:
    """The crop centred on ``box_xywh`` covering the SiamFC context square, resized to ``output_size``.

    Args:
        box_xywh: The box in frame pixels.
        area_factor: ``f`` of the context rule.
        output_size: Crop side (int) or ``(width, height)``.
        scale_factor: Multiplies the scale per axis (training jitter: the object looks that much bigger).
        center_offset: Moves the object by this many **crop** pixels from the crop centre (training jitter).
    """
    ow, oh = _pair(output_size)
    side = context_side(box_xywh, area_factor)
    base = np.sqrt(ow * oh) / side
    sx, sy = base * float(scale_factor[0]), base * float(scale_factor[1])
    cx = float(box_xywh[0]) + float(box_xywh[2]) / 2.0
    cy = float(box_xywh[1]) + float(box_xywh[3]) / 2.0
    tx = ow / 2.0 - cx * sx + float(center_offset[0])
    ty = oh / 2.0 - cy * sy + float(center_offset[1])
    return CropParams((sx, sy), (tx, ty), (ow, oh))


def crop_image(image: np.ndarray, params: CropParams, fill: np.ndarray | tuple[float, ...] | None = None) -> np.ndarray:
    """Sample the crop ``params`` from ``image`` (``uint8`` ``(H, W, 3)``) bilinearly; outside the frame ``fill``
    (default: the per-channel mean of ``image``, SiamFC's mean padding). Returns ``uint8`` ``(oh, ow, 3)``."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    if fill is None:
        fill = image.reshape(-1, 3).mean(0)
    fill_rgb = tuple(round(float(v)) for v in np.asarray(fill).reshape(3))
    (sx, sy), (tx, ty) = params.scale, params.translation
    # PIL maps an output point u to the input point a*u + c (continuous coordinates, pixel centres at +0.5)
    data = (1.0 / sx, 0.0, -tx / sx, 0.0, 1.0 / sy, -ty / sy)
    out = Image.fromarray(np.ascontiguousarray(image.astype(np.uint8))).transform(
        params.output_size, Image.Transform.AFFINE, data, resample=Image.Resampling.BILINEAR, fillcolor=fill_rgb)
    return np.asarray(out)


def crop_around(image: np.ndarray, box_xywh: np.ndarray, area_factor: float, output_size: int | tuple[int, int],
                fill: np.ndarray | tuple[float, ...] | None = None) -> tuple[np.ndarray, CropParams]:
    """SiamFC crop of ``image`` around ``box_xywh``: ``(crop uint8 (S, S, 3), params)``.

    Map boxes with ``params.to_crop`` / ``params.to_frame`` (or :func:`box_to_crop` / :func:`box_from_crop`).
    """
    params = siamfc_params(np.asarray(box_xywh, dtype=np.float64), area_factor, output_size)
    return crop_image(image, params, fill), params


def box_to_crop(box_xywh: np.ndarray, params: CropParams) -> np.ndarray:
    """Boxes ``(..., 4)`` xywh from frame pixels to crop pixels."""
    b = np.asarray(box_xywh, dtype=np.float64)
    s = np.array([params.scale[0], params.scale[1], params.scale[0], params.scale[1]])
    t = np.array([params.translation[0], params.translation[1], 0.0, 0.0])
    return b * s + t


def box_from_crop(box_xywh: np.ndarray, params: CropParams) -> np.ndarray:
    """Boxes ``(..., 4)`` xywh from crop pixels back to frame pixels (the inverse of :func:`box_to_crop`)."""
    b = np.asarray(box_xywh, dtype=np.float64)
    s = np.array([params.scale[0], params.scale[1], params.scale[0], params.scale[1]])
    t = np.array([params.translation[0], params.translation[1], 0.0, 0.0])
    return (b - t) / s


def xywh_to_xyxy(box: np.ndarray) -> np.ndarray:
    b = np.asarray(box, dtype=np.float64)
    return np.concatenate([b[..., :2], b[..., :2] + b[..., 2:]], -1)


def xyxy_to_xywh(box: np.ndarray) -> np.ndarray:
    b = np.asarray(box, dtype=np.float64)
    return np.concatenate([b[..., :2], b[..., 2:] - b[..., :2]], -1)


def clip_box_xyxy(box: np.ndarray, width: float, height: float) -> np.ndarray:
    """Clip ``(..., 4)`` xyxy boxes to ``[0, width] x [0, height]``."""
    b = np.asarray(box, dtype=np.float64).copy()
    b[..., 0::2] = b[..., 0::2].clip(0, width)
    b[..., 1::2] = b[..., 1::2].clip(0, height)
    return b


__all__ = ["CropParams", "box_from_crop", "box_to_crop", "clip_box_xyxy", "context_side", "crop_around",
           "crop_image", "siamfc_params", "xywh_to_xyxy", "xyxy_to_xywh"]
