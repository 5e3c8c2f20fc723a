"""Text-to-image alignment scores as pure functions of embeddings: CLIP-T, CLIP-I and DINO.

The definitions used by the DreamBooth / DECOR literature:

* **CLIP-T** (text alignment): the cosine similarity between the image embedding of a generated image and the text
  embedding of its prompt (with the identifier token removed from the prompt), averaged over images.
* **CLIP-I** (image alignment): the mean pairwise cosine similarity between the embeddings of the generated images
  and those of the reference images (every generated image against every reference image).
* **DINO**: the same mean pairwise cosine, on the features of a self-supervised image model (DINO / DINOv2).

The embedding models are not part of this module: callers pass embeddings (any dimension, any scale; they are
L2-normalised here). Offline, visadapt embeds with its dual-encoder preset, which is not CLIP; the scores keep the
names CLIP-T / CLIP-I because they are computed the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _as_2d(x: torch.Tensor, what: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{what} must be a non-empty (N, D) tensor, got shape {tuple(x.shape)}")
    return F.normalize(x.double(), dim=-1)


def text_alignment_per_image(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Cosine of each image with its prompt: ``(N,)``.

    Args:
        image_emb: ``(N, D)`` image embeddings.
        text_emb: ``(N, D)`` text embeddings, one per image, or ``(D,)`` / ``(1, D)`` for one prompt shared by all.
    """
    img, txt = _as_2d(image_emb, "image_emb"), _as_2d(text_emb, "text_emb")
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"image and text embeddings differ in width: {img.shape[1]} vs {txt.shape[1]}")
    if txt.shape[0] not in (1, img.shape[0]):
        raise ValueError(f"{txt.shape[0]} text embeddings for {img.shape[0]} images (give one per image, or one)")
    return (img * txt).sum(-1)


def clip_t(image_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    """CLIP-T: mean cosine between each generated image and its prompt (see :func:`text_alignment_per_image`)."""
    return float(text_alignment_per_image(image_emb, text_emb).mean())


def pairwise_image_similarity(generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """``(N, M)`` cosines between every generated image and every reference image."""
    gen, ref = _as_2d(generated, "generated"), _as_2d(references, "references")
    if gen.shape[1] != ref.shape[1]:
        raise ValueError(f"generated and reference embeddings differ in width: {gen.shape[1]} vs {ref.shape[1]}")
    return gen @ ref.T


def clip_i(generated: torch.Tensor, references: torch.Tensor) -> float:
    """CLIP-I: mean pairwise cosine between generated and reference image embeddings."""
    return float(pairwise_image_similarity(generated, references).mean())


def dino_score(generated: torch.Tensor, references: torch.Tensor) -> float:
    """DINO: mean pairwise cosine between generated and reference features of a DINO-family model."""
    return float(pairwise_image_similarity(generated, references).mean())


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated by another (higher is better on both axes), in input order."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


__all__ = ["clip_i", "clip_t", "dino_score", "pairwise_image_similarity", "pareto_front", "text_alignment_per_image"]
