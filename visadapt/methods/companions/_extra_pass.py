"""Helpers shared by the companion callbacks of GLAD, BA-LoRA, contrastive augmentation, Flexora and DiffoRA: an
extra pass of a method's own loss, without a line of method-specific code.

Every visadapt method returns its training loss from ``training_step(batch, batch_idx)`` (a tensor, or a dict with
``"loss"``), so a callback gets "the method's loss on a batch" by calling it; :func:`quiet_logging` keeps such an
extra pass from logging over the real step's ``train_loss``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from visadapt.errors import UserError


def trainable(module: nn.Module) -> list[torch.Tensor]:
    """The parameters that train (``requires_grad``), in ``named_parameters`` order."""
    return [p for p in module.parameters() if p.requires_grad]


@contextmanager
def quiet_logging(module: Any) -> Iterator[None]:
    """Inside the block ``module.log`` and ``module.log_dict`` do nothing (an extra pass must not overwrite the
    step's logged loss or enter its epoch mean)."""
    module.log = lambda *a, **k: None
    module.log_dict = lambda *a, **k: None
    try:
        yield
    finally:
        del module.log, module.log_dict  # the class methods are visible again


def step_loss(module: Any, batch: Any, batch_idx: int, quiet: bool = True) -> torch.Tensor:
    """The method's training loss on ``batch`` (its ``training_step``), with logging switched off when ``quiet``."""
    if quiet:
        with quiet_logging(module):
            out = module.training_step(batch, batch_idx)
    else:
        out = module.training_step(batch, batch_idx)
    loss = out.get("loss") if isinstance(out, dict) else out
    if not isinstance(loss, torch.Tensor):
        raise UserError(f"{type(module).__name__}.training_step returned {type(out).__name__}, not a loss tensor "
                        "(or a dict with 'loss'); this companion needs the method's loss")
    return loss


def require_automatic_optimisation(module: Any, companion: str) -> None:
    """Companions that change gradients need Lightning's automatic optimisation (the step is Lightning's)."""
    if not getattr(module, "automatic_optimization", True):
        raise UserError(f"the {companion} companion needs automatic optimisation; {type(module).__name__} sets "
                        "automatic_optimization = False (it steps its optimiser by hand)")
