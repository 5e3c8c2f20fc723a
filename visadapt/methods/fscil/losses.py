"""Losses of the FSCIL methods: supervised contrastive loss (SupCon, Khosla et al. 2020) as CoACT uses it."""

from __future__ import annotations

import torch
from torch import Tensor


def supcon_loss(features: Tensor, labels: Tensor, temperature: float = 0.07,
                base_temperature: float | None = None) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, Eq. 2, "all" mode) over a set of embeddings.

    Every row of ``features`` (L2-normalised, ``(N, D)``; views of one image are separate rows with the same label)
    is an anchor ``i``. With ``P(i)`` the other rows of the same label and ``A(i)`` all other rows::

        L = -(tau / tau_base) * 1/N * sum_i 1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p / tau)
                                                                          / sum_{a in A(i)} exp(z_i.z_a / tau) )

    An anchor without positives contributes 0 but still counts in ``N`` (as in the CoACT / SupContrast code).
    Rows computed without gradient (teacher embeddings) act as anchors and contrasts all the same.
    """
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"features must be (N, D) with N labels, got {tuple(features.shape)} and "
                         f"{tuple(labels.shape)}")
    base_temperature = temperature if base_temperature is None else base_temperature
    n = features.shape[0]
    sim = features @ features.T / temperature
    sim = sim - sim.max(dim=1, keepdim=True).values.detach()  # numerical stability; cancels in the log-ratio
    not_self = ~torch.eye(n, dtype=torch.bool, device=features.device)
    positives = (labels[:, None] == labels[None, :]) & not_self
    log_denominator = torch.logsumexp(sim.masked_fill(~not_self, float("-inf")), dim=1, keepdim=True)
    log_prob = sim - log_denominator
    num_pos = positives.sum(1)
    mean_log_prob_pos = (log_prob * positives).sum(1) / num_pos.clamp(min=1)
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()


__all__ = ["supcon_loss"]
