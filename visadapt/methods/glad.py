"""GLAD's gradient rule: LoRA training whose update is steered by the sharpness-aware (SAM) gradient.

GLAD ("Generalizable LoRA tuning with RegulArized GraDient", arXiv 2507.13089) uses the SAM gradient as a
reference that pulls the plain gradient towards flat, robust regions. Its code is not public and the combining rule
is not stated, so the three readings of the reference note are all offered (``rule``):

* ``mix`` (default, the gradient-norm-penalty reading): ``g_final = (1 - alpha) * g + alpha * g_sam``;
* ``project`` (ProGrad-style): when ``<g, g_sam> < 0`` remove from ``g`` its component along ``g_sam``, then
  add ``alpha * g_sam``;
* ``decompose`` (GSAM-style): ``g_final = g_sam - alpha * g_perp`` with ``g_perp`` the part of ``g`` orthogonal
  to ``g_sam``.

Both passes use the **same batch and the same dropout mask** (the random state is restored before the second
pass), and only trainable (adapter) parameters are perturbed, by ``rho * g / ||g||``, and restored before the step.
Under fp16 mixed precision the gradients of both passes carry the same loss scale; every rule is homogeneous of
degree one in (g, g_sam) and the perturbation uses only the direction of ``g``, so no unscaling is needed, and a
non-finite first gradient skips the perturbation so that the scaler can skip the step as usual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RULES = ("mix", "project", "decompose")


@dataclass
class GladConfig:
    """Settings of GLAD's SAM-referenced gradient regularisation."""

    rho: float = 0.05
    """SAM neighbourhood radius (perturbation norm)."""
    rule: str = "mix"
    """How the plain and SAM gradients combine: mix, project or decompose (see the module docstring)."""
    alpha: float = 0.5
    """Coefficient of the rule: SAM weight for mix, added SAM fraction for project, orthogonal weight for
    decompose."""

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"GladConfig.rule must be one of {RULES}, got {self.rule!r}")
        if self.rho <= 0:
            raise ValueError(f"GladConfig.rho must be > 0, got {self.rho}")


def flat_dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Inner product of two parameter lists seen as one flat vector (fp32)."""
    return sum((x.float() * y.float()).sum() for x, y in zip(a, b))


def combine(g: list[torch.Tensor], g_sam: list[torch.Tensor], rule: str, alpha: float) -> list[torch.Tensor]:
    """Combine the plain and SAM gradients (lists over parameters, treated as one flat vector)."""
    if rule == "mix":
        return [(1 - alpha) * a + alpha * b for a, b in zip(g, g_sam)]
    dot, ss = flat_dot(g, g_sam), flat_dot(g_sam, g_sam).clamp_min(1e-30)
    if rule == "project":
        coef = torch.where(dot < 0, dot / ss, torch.zeros_like(dot))
        return [a - coef * b + alpha * b for a, b in zip(g, g_sam)]
    if rule == "decompose":
        return [b - alpha * (a - (dot / ss) * b) for a, b in zip(g, g_sam)]
    raise ValueError(f"unknown GLAD rule {rule!r}; available: {RULES}")


def cosine(g: list[torch.Tensor], g_sam: list[torch.Tensor]) -> torch.Tensor:
    """Cosine between the plain and the SAM gradient (logged as ``glad_cos``; near 1, SAM barely turns ``g``)."""
    return flat_dot(g, g_sam) / (flat_dot(g, g).sqrt() * flat_dot(g_sam, g_sam).sqrt()).clamp_min(1e-30)


def perturbation(g: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """SAM's ``rho * g / ||g||``; zeros when ``g`` is not finite (an overflowing fp16 step)."""
    norm = torch.sqrt(flat_dot(g, g))
    if not torch.isfinite(norm) or norm == 0:
        return [torch.zeros_like(x) for x in g]
    return [rho * x / norm for x in g]
