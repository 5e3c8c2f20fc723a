"""Explanation metrics: ROUGE-L and the embedding cosine (FakeShield's "CSS"), as pure functions.

**ROUGE-L** (Lin, 2004) compares a candidate sentence with a reference through their longest common subsequence
(LCS) of tokens: R = LCS / len(reference), P = LCS / len(candidate), F = (1 + beta^2) R P / (R + beta^2 P). The
default ``beta = 1`` gives the plain F1 that Google's ``rouge-score`` package reports as ``fmeasure``; the COCO
caption toolkit uses ``beta = 1.2``. Both texts empty score 1; one empty scores 0.

**Tokenisation** (documented because scores depend on it): lower-case, every character that is not a letter or
digit becomes a space, then split on whitespace; no stemming and no stop-word removal (``rouge-score``'s default
tokenizer without its Porter stemmer, extended to non-ASCII letters and digits).

**Embedding cosine**: the cosine similarity between the embeddings of candidate and reference, computed by a
caller-supplied ``embed(list_of_texts) -> (N, D) array`` (e.g. a sentence encoder), averaged over pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens: letters and digits, everything else separates."""
    return "".join(c if c.isalnum() else " " for c in text.lower()).split()


def lcs_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (dynamic programming, O(len(a) len(b)))."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, reference: str, beta: float = 1.0) -> dict[str, float]:
    """ROUGE-L of one candidate against one reference: ``{"precision", "recall", "f"}``."""
    c, r = tokenize(candidate), tokenize(reference)
    if not c and not r:
        return {"precision": 1.0, "recall": 1.0, "f": 1.0}
    lcs = lcs_length(c, r)
    if lcs == 0:
        return {"precision": 0.0, "recall": 0.0, "f": 0.0}
    p, rec = lcs / len(c), lcs / len(r)
    f = (1 + beta ** 2) * p * rec / (rec + beta ** 2 * p)
    return {"precision": p, "recall": rec, "f": f}


def mean_rouge_l(candidates: Sequence[str], references: Sequence[str], beta: float = 1.0) -> float:
    """Mean ROUGE-L F over aligned candidate / reference pairs."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates for {len(references)} references")
    if not candidates:
        raise ValueError("no texts to score")
    return float(np.mean([rouge_l(c, r, beta)["f"] for c, r in zip(candidates, references)]))


def embedding_cosine(candidates: Sequence[str], references: Sequence[str],
                     embed: Callable[[list[str]], Any]) -> dict[str, Any]:
    """Cosine similarity of ``embed(candidates)[i]`` and ``embed(references)[i]``: ``{"mean", "per_pair"}``.

    Args:
        embed: Maps a list of texts to an ``(N, D)`` array or tensor (any scale; rows are L2-normalised here).
    """
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates for {len(references)} references")
    if not candidates:
        raise ValueError("no texts to score")

    def unit(x: Any) -> np.ndarray:
        if hasattr(x, "detach"):
            x = x.detach().cpu().numpy()
        x = np.asarray(x, dtype=np.float64).reshape(len(candidates), -1)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    cos = (unit(embed(list(candidates))) * unit(embed(list(references)))).sum(1)
    return {"mean": float(cos.mean()), "per_pair": cos}


__all__ = ["embedding_cosine", "lcs_length", "mean_rouge_l", "rouge_l", "tokenize"]
