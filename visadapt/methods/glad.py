"""GLAD's gradient rule: LoRA training whose update is steered by the sharpness-aware (SAM) gradient.

GLAD ("Generalizable LoRA tuning with RegulArized GraDient", arXiv 2507.13089) uses the SAM gradient as a
reference signal that steers the plain gradient toward a region shared by both solutions. Its code is not public
and the exact rule is not stated; the statement reads as a ProGrad-style projection, which is the default
(``rule``):

* ``project`` (default, ProGrad, Zhu et al. 2023): where ``<g, g_sam> < 0``, remove from ``g`` its component along
  ``g_sam``; then add ``alpha * g_sam``. With ``alpha = 0`` and ``granularity = "tensor"`` (the defaults) this is
  exactly ProGrad's ``prograd_backward_and_update`` with ``lambda_ = 1``, the SAM gradient in the place of ProGrad's
  KL gradient: ProGrad tests and projects each parameter tensor on its own;
* ``mix`` (the gradient-norm-penalty reading): ``g_final = (1 - alpha) * g + alpha * g_sam``;
* ``decompose`` (GSAM-style): ``g_final = g_sam - alpha * g_perp`` with ``g_perp`` the part of ``g`` orthogonal
  to ``g_sam``.

``granularity`` says over what the inner products of ``project`` and ``decompose`` are taken: each parameter tensor
on its own (``tensor``, ProGrad's) or all trainable parameters as one flat vector (``flat``).

Both passes use the **same batch and the same dropout mask** (the random state is restored before the second
pass), and only trainable (adapter) parameters are perturbed, by ``rho * g / ||g||``, and restored before the step.
Under fp16 mixed precision the gradients of both passes carry the same loss scale; every rule is homogeneous of
degree one in (g, g_sam) and the perturbation uses only the direction of ``g``, so no unscaling is needed, and a
non-finite first gradient skips the perturbation so that the scaler can skip the step as usual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RULES = ("project", "mix", "decompose")
GRANULARITIES = ("tensor", "flat")
DEFAULT_ALPHA = {"project": 0.0, "mix": 0.5, "decompose": 0.5}
"""``alpha`` of each rule when none is given: ProGrad itself for ``project``."""


@dataclass
class GladConfig:
    """Settings of GLAD's SAM-referenced gradient regularisation."""

    rho: float = 0.05
    """SAM neighbourhood radius (perturbation norm)."""
    rule: str = "project"
    """How the plain and SAM gradients combine: project (ProGrad), mix or decompose (see the module docstring)."""
    alpha: float | None = None
    """Coefficient of the rule: added SAM fraction for project (default 0: ProGrad exactly), SAM weight for mix
    (default 0.5), orthogonal weight for decompose (default 0.5)."""
    granularity: str = "tensor"
    """Inner products of project / decompose per parameter tensor (ProGrad's) or over one flat vector."""

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"GladConfig.rule must be one of {RULES}, got {self.rule!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"GladConfig.granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.rho <= 0:
            raise ValueError(f"GladConfig.rho must be > 0, got {self.rho}")
        if self.alpha is None:
            self.alpha = DEFAULT_ALPHA[self.rule]


def flat_dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Inner product of two parameter lists seen as one flat vector (fp32)."""
    return sum((x.float() * y.float()).sum() for x, y in zip(a, b))


def _project(g: list[torch.Tensor], g_sam: list[torch.Tensor], alpha: float) -> list[torch.Tensor]:
    dot, ss = flat_dot(g, g_sam), flat_dot(g_sam, g_sam).clamp_min(1e-30)
    coef = torch.where(dot < 0, dot / ss, torch.zeros_like(dot))
    return [a - coef * b + alpha * b for a, b in zip(g, g_sam)]


def _decompose(g: list[torch.Tensor], g_sam: list[torch.Tensor], alpha: float) -> list[torch.Tensor]:
    dot, ss = flat_dot(g, g_sam), flat_dot(g_sam, g_sam).clamp_min(1e-30)
    return [b - alpha * (a - (dot / ss) * b) for a, b in zip(g, g_sam)]


def combine(g: list[torch.Tensor], g_sam: list[torch.Tensor], rule: str, alpha: float,
            granularity: str = "tensor") -> list[torch.Tensor]:
    """Combine the plain and SAM gradients (lists over parameters).

    ``project`` and ``decompose`` take their inner products per tensor (``granularity="tensor"``) or over all
    tensors as one flat vector (``"flat"``); ``mix`` is the same either way.
    """
    if rule == "mix":
        return [(1 - alpha) * a + alpha * b for a, b in zip(g, g_sam)]
    if rule not in RULES:
        raise ValueError(f"unknown GLAD rule {rule!r}; available: {RULES}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; available: {GRANULARITIES}")
    fn = _project if rule == "project" else _decompose
    if granularity == "flat":
        return fn(g, g_sam, alpha)
    return [fn([a], [b], alpha)[0] for a, b in zip(g, g_sam)]


def cosine(g: list[torch.Tensor], g_sam: list[torch.Tensor]) -> torch.Tensor:
    """Cosine between the plain and the SAM gradient (logged as ``glad_cos``; near 1, SAM barely turns ``g``)."""
    return flat_dot(g, g_sam) / (flat_dot(g, g).sqrt() * flat_dot(g_sam, g_sam).sqrt()).clamp_min(1e-30)


def perturbation(g: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """SAM's ``rho * g / ||g||``; zeros when ``g`` is not finite (an overflowing fp16 step)."""
    norm = torch.sqrt(flat_dot(g, g))
    if not torch.isfinite(norm) or norm == 0:
        return [torch.zeros_like(x) for x in g]
    return [rho * x / norm for x in g]
