"""BA-LoRA's bias-aware regularisers (cyp-jlu-ai/BA-LoRA) as a callback for any method, with gradients flowing.

Three terms on the outputs ``Z`` (batch x features) of one submodule (``module``; for ClipFewShot the image
encoder ``model.visual``: the reference notes advise pre-logit features or CLIP logits for a ViT, since a new
classifier head has no pre-trained counterpart):

* consistency (NLU form): ``mse(normalize(Z), normalize(Z_pre))``, ``Z_pre`` the same submodule's output with
  the adapters disabled (the pre-trained model; the official code keeps a second frozen copy of it);
* diversity: ``sum(offdiag(cov(Z))^2) / dim``, the covariance over the batch with ``B - 1``;
* SVD: ``-(sum of the top-k singular values / sum of all)`` of ``Z`` (flattened to ``(B, -1)``), k = 3.

``task="nlg"`` uses the official NLG forms on softmax outputs instead: consistency ``KL(pre || fine)``
(``batchmean``), diversity ``-entropy``; the SVD term is the same.

Total: ``loss + lambda1 * consistency + lambda2 * diversity + lambda3 * svd`` with the official 1e-4, 3e-4, 1e-4.
**Difference from the official code:** its SVD runs under ``torch.no_grad()``, so the lambda3 term has no gradient
there; here every term is differentiable (``torch.linalg.svdvals``), as the issue asks.

How it joins the method's loss without method code: a forward hook keeps the submodule's output of the training
step; in ``on_before_backward`` the weighted terms are backpropagated with ``retain_graph=True`` (scaled like the
loss under mixed precision and gradient accumulation), so Lightning's own backward then adds the task gradient and
``.grad`` holds the gradient of the total. One extra backward per step, plus one no-grad forward of the submodule
with the adapters disabled when ``lambda1 > 0``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from visadapt.adapters import REGULARISERS, disable_adapters
from visadapt.errors import UserError


def consistency(fine: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """MSE between the l2-normalised fine-tuned and pre-trained outputs (BA-LoRA's NLU consistency)."""
    return F.mse_loss(F.normalize(fine, dim=-1), F.normalize(pre, dim=-1))


def diversity(z: torch.Tensor) -> torch.Tensor:
    """Sum of squared off-diagonal entries of the batch covariance of ``z`` (B x D), divided by D."""
    b, d = z.shape
    zc = z - z.mean(dim=0)
    cov = zc.t() @ zc / (b - 1)
    off = cov - torch.diag(torch.diag(cov))
    return (off**2).sum() / d


def svd_term(z: torch.Tensor, k: int = 3) -> torch.Tensor:
    """``-(sum of the k largest singular values / sum of all)`` of ``z`` flattened to ``(B, -1)``; differentiable."""
    s = torch.linalg.svdvals(z.reshape(z.shape[0], -1).float())
    return -(s[:k].sum() / (s.sum() + 1e-10))


def consistency_nlg(fine_logits: torch.Tensor, pre_logits: torch.Tensor) -> torch.Tensor:
    """``KL(pre || fine)`` of the softmax distributions, ``batchmean`` (BA-LoRA's NLG consistency)."""
    return F.kl_div(F.log_softmax(fine_logits, dim=-1), F.softmax(pre_logits, dim=-1), reduction="batchmean")


def diversity_nlg(fine_logits: torch.Tensor) -> torch.Tensor:
    """Negative mean entropy of the softmax distribution (minimising it maximises entropy)."""
    p = F.softmax(fine_logits, dim=-1)
    return (p * torch.log(p + 1e-10)).sum(dim=-1).mean()


def _tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise UserError(f"BA-LoRA: the regularised submodule returned {type(out).__name__}; name a submodule that "
                    "returns a tensor (features or logits)")


@REGULARISERS.register("ba_lora")
class BaLora(pl.Callback):
    """BA-LoRA: consistency, diversity and SVD regularisers on a submodule's outputs, all with gradients.

    Args:
        module: Dotted name (in the LightningModule) of the submodule whose output is regularised.
        lambda1: Weight of the consistency term (official 1e-4).
        lambda2: Weight of the diversity term (official 3e-4).
        lambda3: Weight of the SVD term (official 1e-4).
        k: Top singular values of the SVD term (official 3).
        task: ``nlu`` (normalised-MSE consistency, covariance diversity) or ``nlg`` (KL, entropy).
    """

    def __init__(self, module: str = "model.visual", lambda1: float = 1e-4, lambda2: float = 3e-4,
                 lambda3: float = 1e-4, k: int = 3, task: str = "nlu") -> None:
        if task not in ("nlu", "nlg"):
            raise ValueError(f"BaLora.task must be 'nlu' or 'nlg', got {task!r}")
        self.module, self.k, self.task = module, k, task
        self.lambdas = (lambda1, lambda2, lambda3)
        self._hook: Any = None
        self._seen: tuple[Any, Any, torch.Tensor] | None = None
        self.last: dict[str, float] = {}

    def _submodule(self, pl_module: pl.LightningModule) -> torch.nn.Module:
        try:
            return pl_module.get_submodule(self.module)
        except AttributeError:
            raise UserError(f"BA-LoRA: {type(pl_module).__name__} has no submodule {self.module!r}; set the "
                            "callback's `module` (e.g. model.visual for ClipFewShot)") from None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._submodule(pl_module)  # fail early with the message above

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._hook is not None:  # a step that never reached backward
            self._hook.remove()
        self._seen = None

        def keep(mod: Any, args: Any, kwargs: Any, out: Any) -> None:
            if self._seen is None and torch.is_grad_enabled():
                self._seen = (args, kwargs, _tensor(out))

        self._hook = self._submodule(pl_module).register_forward_hook(keep, with_kwargs=True)

    def terms(self, pl_module: pl.LightningModule, z: torch.Tensor, args: Any, kwargs: Any) -> dict[str, torch.Tensor]:
        """The three terms on ``z`` (the pre-trained output recomputed with the adapters disabled)."""
        out = {}
        if self.lambdas[0]:
            with torch.no_grad(), disable_adapters(pl_module), torch.random.fork_rng(devices=[]):
                pre = _tensor(self._submodule(pl_module)(*args, **kwargs)).float()
            out["consistency"] = consistency(z, pre) if self.task == "nlu" else consistency_nlg(z, pre)
        if self.lambdas[1]:
            out["diversity"] = diversity(z.reshape(z.shape[0], -1)) if self.task == "nlu" else diversity_nlg(z)
        if self.lambdas[2]:
            out["svd"] = svd_term(z, self.k)
        return out

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._seen is None:
            return
        args, kwargs, z = self._seen
        self._seen = None
        terms = self.terms(pl_module, z.float(), args, kwargs)
        weights = dict(zip(("consistency", "diversity", "svd"), self.lambdas))
        reg = sum(weights[n] * t for n, t in terms.items())
        self.last = {n: float(t.detach()) for n, t in terms.items()}
        for n, v in self.last.items():
            pl_module.log(f"ba_lora_{n}", v)
        if not isinstance(reg, torch.Tensor) or not reg.requires_grad:
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        reg = (scaler.scale(reg) if scaler is not None else reg) / trainer.accumulate_grad_batches
        reg.backward(retain_graph=True)  # the task loss's backward follows and adds its gradient
