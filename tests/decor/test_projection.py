"""The DECOR projection X' = X - a X P: exact invariants on random embeddings, and the undesired-vector readings."""

from __future__ import annotations

import pytest
import torch

from visadapt.methods.decor import (
    DecorConfig,
    build_projection,
    check_alpha,
    decor_project,
    projector,
    undesired_basis,
    word_rows,
)


def _embeddings(seed: int = 0, length: int = 77, width: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, length, width, generator=g)


def test_alpha_one_removes_every_undesired_component():
    undesired = torch.randn(3, 64, generator=torch.Generator().manual_seed(1)) * 5
    basis = undesired_basis(undesired)
    assert basis.shape == (3, 64)
    x = _embeddings()
    out = decor_project(x, projector(basis), 1.0)
    # no component along any undesired vector (nor along their span), on every row including PAD
    assert (out @ undesired.T).abs().max() / (x @ undesired.T).abs().max() < 1e-6
    assert (out @ basis.T).abs().max() < 1e-6 * x.abs().max()
    # the orthogonal complement is untouched
    rest = x - (x @ basis.T) @ basis
    torch.testing.assert_close(out, rest, rtol=0, atol=1e-5)


def test_alpha_zero_is_identity_and_half_is_linear():
    x = _embeddings()
    p = projector(undesired_basis(torch.randn(2, 64)))
    assert torch.equal(decor_project(x, p, 0.0), x)
    half = decor_project(x, p, 0.5)
    torch.testing.assert_close(half, x - 0.5 * x @ p, rtol=0, atol=1e-5)
    assert not torch.allclose(half, x)


def test_projection_is_idempotent_at_alpha_one():
    x = _embeddings(3)
    p = projector(undesired_basis(torch.randn(4, 64)))
    once = decor_project(x, p, 1.0)
    torch.testing.assert_close(decor_project(once, p, 1.0), once, rtol=0, atol=1e-5)
    assert not torch.allclose(decor_project(once, p, 1.0), x)


def test_svd_tolerance_drops_duplicate_rows_and_rank_keeps_top_axes():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, 32, generator=g)
    pad_like = torch.cat([v[:1].repeat(20, 1), v[1:] * 0.1, v[:1] * 1.0000001])  # PAD copies of one vector
    assert undesired_basis(pad_like).shape[0] == 2  # two directions, not 22
    top = undesired_basis(pad_like, rank=1)
    assert top.shape[0] == 1
    # the dominant axis is the repeated vector
    assert torch.nn.functional.cosine_similarity(top[0], v[0], dim=0).abs() > 0.999
    with pytest.raises(ValueError, match="all zero"):
        undesired_basis(torch.zeros(3, 8))


def test_float32_svd_of_half_precision_input():
    u = torch.randn(3, 48).half()
    basis = undesired_basis(u)
    assert basis.dtype == torch.float32
    x = torch.randn(1, 10, 48).half()
    out = decor_project(x, projector(basis), 1.0)
    assert out.dtype == torch.float16
    assert (out.float() @ basis.T).abs().max() < 1e-2  # half-precision output: rounding only


def test_alpha_is_checked():
    assert check_alpha(1) == 1.0
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            check_alpha(bad)
        with pytest.raises(ValueError):
            DecorConfig(undesired=["red"], alpha=bad)


def test_word_rows_drop_start_end_and_padding():
    e = torch.arange(10.0)[:, None].repeat(1, 4)
    mask = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    assert word_rows(e, mask)[:, 0].tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="no word token"):
        word_rows(e, torch.tensor([1, 1] + [0] * 8))


class _FakeEncoder:
    """Per-token states: BOS row, one row per word, EOS row, PAD rows that repeat a sentence vector."""

    def __init__(self, width: int = 16, length: int = 12) -> None:
        self.width, self.length = width, length
        self.words: dict[str, torch.Tensor] = {}

    def vec(self, word: str) -> torch.Tensor:
        if word not in self.words:
            self.words[word] = torch.randn(self.width, generator=torch.Generator().manual_seed(len(self.words) + 7))
        return self.words[word]

    def __call__(self, prompts: list[str]) -> dict:
        embeds = torch.zeros(len(prompts), self.length, self.width)
        mask = torch.zeros(len(prompts), self.length, dtype=torch.long)
        for i, p in enumerate(prompts):
            words = p.split()
            rows = [self.vec("<bos>")] + [self.vec(w) for w in words] + [self.vec("<eos>")]
            embeds[i, : len(rows)] = torch.stack(rows)
            embeds[i, len(rows):] = sum(rows) / len(rows)  # PAD rows: near-copies of a sentence vector
            mask[i, : len(rows)] = 1
        return {"prompt_embeds": embeds, "attention_mask": mask, "pooled": embeds[:, 0] * 2}


def test_build_projection_word_mode_spans_exactly_the_word_rows():
    enc = _FakeEncoder()
    proj = build_projection(enc, DecorConfig(undesired=["red shiny"]))
    assert proj.rank == 2
    red, shiny, bos = enc.vec("red"), enc.vec("shiny"), enc.vec("<bos>")
    torch.testing.assert_close(red @ proj.token_projector, red, rtol=0, atol=1e-5)
    torch.testing.assert_close(shiny @ proj.token_projector, shiny, rtol=0, atol=1e-5)
    assert (bos @ proj.token_projector).norm() < bos.norm()  # BOS is not part of the undesired span
    x = enc(["a red shoe"])
    out = proj.apply(x, alpha=1.0)
    assert (out["prompt_embeds"] @ red).abs().max() < 1e-4
    # negative embeddings untouched unless asked; pooled untouched unless asked
    assert torch.equal(proj.apply(x, negative=True)["prompt_embeds"], x["prompt_embeds"])
    assert torch.equal(out["pooled"], x["pooled"])


def test_build_projection_axes_mode_and_flags():
    enc = _FakeEncoder()
    cfg = DecorConfig(undesired=["red"], mode="axes", project_negative=True, project_pooled=True)
    proj = build_projection(enc, cfg)
    assert proj.rank == 1  # one dominant axis per undesired prompt by default
    full = enc(["red"])["prompt_embeds"][0]
    top = torch.linalg.svd(full, full_matrices=False).Vh[0]
    torch.testing.assert_close(top @ proj.token_projector, top, rtol=0, atol=1e-5)
    x = enc(["a red shoe"])
    neg = proj.apply(x, negative=True)
    assert not torch.equal(neg["prompt_embeds"], x["prompt_embeds"])
    assert (neg["pooled"] @ enc(["red"])["pooled"][0]).abs().max() < 1e-3
