"""LoRA-Pro (Wang et al., "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?", ICLR'25; official code
mrflogs/LoRA-Pro): replace LoRA's gradients ``(g_A, g_B)`` by the pair whose *equivalent gradient*
``s B g_A + s g_B A`` (the change of ``W`` one LoRA step makes) is the Frobenius-closest to the full fine-tuning
gradient ``g``, choosing among the optimal pairs the one closest to ``(g_A, g_B)``.

With the raw LoRA gradients ``g_A = s B^T g`` and ``g_B = s g A^T`` (so ``g`` itself is never needed):

* ``g_A* = (1/s^2) (B^T B)^-1 g_A + X A``
* ``g_B* = (1/s^2) [I - B (B^T B)^-1 B^T] g_B (A A^T)^-1 - B X``
* ``X`` (r x r) solves the Sylvester equation ``B^T B X + X A A^T = -(1/s^2) (B^T B)^-1 g_A A^T`` (solved by the
  eigendecompositions of the two symmetric matrices, in float32 or better, as the official code).

Inverses are damped as ``pinv(M + 1e-8 I)``; while ``B = 0`` (the first step) ``(B^T B)^-1`` is taken as 0, as the
official code skips it.

**Moments.** The official implementation runs Adam on the ``out x in`` equivalent gradient, with full-size
``exp_avg`` / ``exp_avg_sq`` per adapted layer (2 m n floats: the memory advantage over full fine-tuning is lost for the
optimiser state), maps the Adam direction back through the same projection and steps with SGD. The issue asks for
LoRA-Pro *without* full-size moment buffers, so here the adjusted ``(g_A*, g_B*)`` are handed to the method's own
optimiser (AdamW by default) whose state is LoRA-sized (``r (m + n)`` per moment). The difference: Adam's
per-element normalisation acts on the factors, not on ``W``'s elements, so a step is the optimal *gradient*
direction, preconditioned in factor space. ``full_adam: true`` gives the official variant instead: the callback keeps
full-size Adam moments of the equivalent gradient ``g~ = s B g_A* + s g_B* A`` (bias-corrected, betas 0.9/0.999,
eps 1e-8), maps the Adam direction ``G`` back to ``(s B^T G, s G A^T)``, adjusts that pair with the same closed form,
and requires the method's optimiser to be plain SGD (no momentum, no weight decay), so that nothing moves twice.

A Lightning callback: the adjustment runs in ``on_before_optimizer_step`` (after backward and gradient accumulation,
before clipping and the step), so every method and optimiser gets it without code of its own. Only plain LoRA pairs
(``s B A`` with ``A``, ``B`` trained) are adjusted; anything else (RandLoRA's random bases, LoRA-SB's core, ...) is
refused, since the projection is defined for that factorisation.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor

from visadapt.adapters import OPTIMISERS
from visadapt.errors import UserError
from visadapt.methods.companions.lora_ga import plain_lora_parts


def solve_sylvester(p: Tensor, q: Tensor, c: Tensor) -> Tensor:
    """``X`` with ``P X + X Q = C`` for symmetric positive semi-definite ``P`` (r x r) and ``Q`` (r x r).

    In the eigenbases ``P = U diag(a) U^T``, ``Q = V diag(b) V^T`` the equation is elementwise:
    ``X~_ij (a_i + b_j) = C~_ij``; a zero denominator (both singular in the same pair) gives 0.
    """
    a, u = torch.linalg.eigh(p)
    b, v = torch.linalg.eigh(q)
    denom = a[:, None] + b[None, :]
    ct = u.t() @ c @ v
    xt = torch.where(denom.abs() > 0, ct / torch.where(denom.abs() > 0, denom, torch.ones_like(denom)),
                     torch.zeros_like(ct))
    return u @ xt @ v.t()


def lora_pro_gradients(a: Tensor, b: Tensor, grad_a: Tensor, grad_b: Tensor, scale: float,
                       damping: float = 1e-8) -> tuple[Tensor, Tensor]:
    """LoRA-Pro's adjusted ``(g_A*, g_B*)`` for ``A`` (r x in), ``B`` (out x r) and their raw gradients.

    Computed in float32 (float64 inputs stay float64); returned in the gradients' dtype.
    """
    dtype = torch.float64 if grad_a.dtype == torch.float64 else torch.float32
    a, b, ga, gb = (t.detach().to(dtype) for t in (a, b, grad_a, grad_b))
    r = a.shape[0]
    eye = torch.eye(r, dtype=dtype, device=a.device)
    btb, aat = b.t() @ b, a @ a.t()
    inv_btb = torch.zeros_like(btb) if not torch.any(b) else torch.linalg.pinv(btb + damping * eye)
    inv_aat = torch.linalg.pinv(aat + damping * eye)
    s2 = 1.0 / scale**2
    x = solve_sylvester(btb, aat, -s2 * inv_btb @ ga @ a.t())
    new_a = s2 * inv_btb @ ga + x @ a
    new_b = s2 * (gb - b @ (inv_btb @ (b.t() @ gb))) @ inv_aat - b @ x
    return new_a.to(grad_a.dtype), new_b.to(grad_b.dtype)


def equivalent_gradient(a: Tensor, b: Tensor, grad_a: Tensor, grad_b: Tensor, scale: float) -> Tensor:
    """``s B g_A + s g_B A``: the first-order change of ``W`` that a LoRA step along ``(g_A, g_B)`` makes."""
    return scale * (b @ grad_a + grad_b @ a)


@OPTIMISERS.register("lora_pro")
class LoraPro(pl.Callback):
    """LoRA-Pro: LoRA gradients replaced by the optimal approximation of the full gradient (Sylvester closed form).

    Args:
        damping: ``lambda`` of the damped inverses ``pinv(M + lambda I)`` (official: 1e-8).
        full_adam: The official variant: full-size Adam moments of the equivalent gradient in the callback, the
            method's optimiser plain SGD. ``False`` (default): the adjusted gradients go to the method's optimiser.
        betas: Adam's betas of ``full_adam``.
        eps: Adam's epsilon of ``full_adam``.
        adapter: Adapter name; ``None`` = the model's only adapter (plain LoRA pairs only).
    """

    def __init__(self, damping: float = 1e-8, full_adam: bool = False, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, adapter: str | None = None) -> None:
        if not damping >= 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        self.damping, self.full_adam, self.betas, self.eps, self.adapter = damping, full_adam, tuple(betas), eps, adapter
        self._parts = None
        self._moments: dict[str, dict[str, Tensor]] = {}  # full_adam: block key -> {"step", "exp_avg", "exp_avg_sq"}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._parts = plain_lora_parts(pl_module, self.adapter, "LoRA-Pro",
                                       "adjusts the gradients of the two factors of a LoRA update s*B*A")
        if self.full_adam:
            for optimizer in trainer.optimizers:
                plain_sgd = type(optimizer) is torch.optim.SGD and all(
                    g.get("momentum", 0) == 0 and g.get("weight_decay", 0) == 0 for g in optimizer.param_groups)
                if not plain_sgd:
                    raise UserError(
                        "LoRA-Pro with full_adam: true runs Adam itself, so the method's optimiser must be plain SGD "
                        f"(momentum 0, weight_decay 0), got {type(optimizer).__name__}; set model.init_args.optimizer "
                        "to class_path: torch.optim.SGD with init_args {lr: ...}")

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        for part in self._parts or []:
            core = part.core
            if core.lora_A.grad is None or core.lora_B.grad is None:
                continue
            ga, gb = lora_pro_gradients(core.lora_A, core.lora_B, core.lora_A.grad, core.lora_B.grad, core.scale,
                                        self.damping)
            if self.full_adam:
                ga, gb = self._adam_direction(part.key, core, ga, gb)
            core.lora_A.grad.copy_(ga)
            core.lora_B.grad.copy_(gb)

    def _adam_direction(self, key: str, core, ga: Tensor, gb: Tensor) -> tuple[Tensor, Tensor]:
        """The official step: Adam on the full equivalent gradient, mapped back and adjusted again."""
        a, b, s = core.lora_A.detach().float(), core.lora_B.detach().float(), core.scale
        g_eq = equivalent_gradient(a, b, ga.float(), gb.float(), s)
        state = self._moments.setdefault(key, {"step": torch.zeros(()), "exp_avg": torch.zeros_like(g_eq),
                                               "exp_avg_sq": torch.zeros_like(g_eq)})
        beta1, beta2 = self.betas
        state["step"] += 1
        state["exp_avg"].mul_(beta1).add_(g_eq, alpha=1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(g_eq, g_eq, value=1 - beta2)
        step = float(state["step"])
        m_hat = state["exp_avg"] / (1 - beta1**step)
        v_hat = state["exp_avg_sq"] / (1 - beta2**step)
        direction = m_hat / (v_hat.sqrt() + self.eps)
        return lora_pro_gradients(a, b, s * b.t() @ direction, s * direction @ a.t(), s, self.damping)

    def state_dict(self) -> dict:
        return {"moments": self._moments} if self.full_adam else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self._moments = state_dict.get("moments") or {}
