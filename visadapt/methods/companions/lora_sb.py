"""The LoRA-SB initialiser (RaghavSinghal10/lora-sb, ``find_and_initialize_grad``): set the ``lora_sb`` adapter's
fixed ``B``, ``A`` and trainable core ``R`` from an approximation of the first full fine-tuning step.

Per adapted matrix (or fused-qkv slice), with the full-weight gradient ``G`` accumulated over ``batches`` training
batches:

1. the simulated first Adam step ``dW1 = -lr * sign(G)`` (Adam's first update is ``lr * sign(g)`` up to its epsilon);
   ``lr`` is the first optimiser step's learning rate, read from the optimiser at ``on_train_start`` (with a linear
   warm-up that is the official ``lr / (warmup_ratio * total_steps)``), or given;
2. its truncated SVD ``dW1 ~ U_r S_r V_r^T`` (``svd_lowrank``, 10 iterations, seed 42, as the official code;
   ``svd = "exact"`` uses a full SVD);
3. ``B = U_r``, ``A = V_r^T``, ``R = S_r / s`` (``s`` the adapter's scale, 1 in the official code), so that
   ``s B R A`` is the rank-``r`` approximation of ``dW1``. No base offset: the model starts one simulated step away
   from ``W``, by design.

Only ``R`` trains (plain AdamW in the official code: the method's own optimiser). The fixed ``A`` and ``B`` are
persistent buffers of the adapter (saved in adapter files) and are also kept in this callback's checkpoint state, since
visadapt's checkpoints hold only trained tensors: a resumed ``fit`` gets them back from there. Needs the ``lora_sb``
adapter (:class:`visadapt.adapters.LoRASBConfig`) and refuses any other; refuses a zero gradient (zero-initialised
head) with the fix.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor

from visadapt.adapters import INITIALISERS, LoRASB, variant_name
from visadapt.errors import UserError
from visadapt.methods.companions.lora_ga import (
    adapter_parts,
    average_over_processes,
    estimate_full_gradients,
    forked_rng,
    refuse_zero_gradients,
    resolve_adapter,
    training_batches,
    training_loss,
)

log = logging.getLogger(__name__)


def lora_sb_factors(grad: Tensor, r: int, lr: float, lora_scale: float = 1.0, svd: str = "lowrank",
                    niter: int = 10, seed: int = 42) -> tuple[Tensor, Tensor, Tensor]:
    """``(A, R, B)`` (float32; ``(r, in)``, ``(r, r)``, ``(out, r)``) with ``s B R A`` the rank-``r`` approximation of
    ``-lr sign(grad)``; ``B`` and ``A^T`` have orthonormal columns and ``R`` is diagonal."""
    delta = -lr * torch.sign(grad.float())
    if svd == "exact":
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        v = vh.t()
    elif svd == "lowrank":
        with torch.random.fork_rng(devices=[delta.device] if delta.device.type == "cuda" else []):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(delta, q=r, niter=niter)
    else:
        raise ValueError(f"svd must be 'lowrank' or 'exact', got {svd!r}")
    return v[:, :r].t().contiguous(), torch.diag(s[:r]) / lora_scale, u[:, :r].contiguous()


@INITIALISERS.register("lora_sb")
class LoraSB(pl.Callback):
    """LoRA-SB: fixed B, A and the r×r core R from the truncated SVD of the simulated first Adam step -lr·sign(G).

    Args:
        batches: Training batches the full-weight gradient is accumulated over (official: 50 samples; 2 batches of
            32 here by default).
        lr: Learning rate of the simulated first step; ``None`` reads the optimiser's first-step rate.
        svd: ``lowrank`` (official: ``svd_lowrank``, 10 iterations, seed 42) or ``exact``.
        seed: Seed of the randomised SVD.
        adapter: Adapter name; ``None`` = the model's only adapter (it must be a ``lora_sb`` adapter).
    """

    def __init__(self, batches: int = 2, lr: float | None = None, svd: Literal["lowrank", "exact"] = "lowrank",
                 seed: int = 42, adapter: str | None = None) -> None:
        if batches < 1:
            raise ValueError(f"batches must be >= 1, got {batches}")
        if lr is not None and not lr > 0:
            raise ValueError(f"lr must be > 0 (or null), got {lr}")
        self.batches, self.lr, self.svd, self.seed, self.adapter = batches, lr, svd, seed, adapter
        self._init: dict[str, dict[str, Tensor]] | None = None  # block key -> {"A", "B"}
        self._restored = False

    def _parts(self, module: pl.LightningModule):
        name = resolve_adapter(module, self.adapter, "LoRA-SB")
        parts = adapter_parts(module, name)
        bad = [p for p in parts if not isinstance(p.core, LoRASB)]
        if bad:
            raise UserError(
                f"LoRA-SB initialises the lora_sb adapter (B R A with only the r x r core R trained); the "
                f"{variant_name(bad[0].layer.configs[name])!r} adapter on {bad[0].key} is not one. Set "
                "model.init_args.adapter to class_path: visadapt.adapters.LoRASBConfig (configs/companions/lora_sb.yaml)")
        return parts

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        parts = self._parts(pl_module)
        if self._restored:  # a resumed fit: R comes from the checkpoint, the fixed bases from our state
            with torch.no_grad():
                for part in parts:
                    part.core.lora_A.copy_(self._init[part.key]["A"])
                    part.core.lora_B.copy_(self._init[part.key]["B"])
            self._restored = False
            return
        if trainer.global_step > 0:  # resumed from a checkpoint written without this companion
            log.warning("visadapt: LoRA-SB skipped: the fit resumes at step > 0 from a checkpoint without its state")
            return
        lr = self.lr
        if lr is None:
            if not trainer.optimizers:
                raise UserError("LoRA-SB: no optimiser to read the first step's learning rate from; set lr")
            lr = float(trainer.optimizers[0].param_groups[0]["lr"])
        if not lr > 0:
            raise UserError(f"LoRA-SB: the first step's learning rate is {lr} (a warm-up from 0?); set lr explicitly")
        with forked_rng(pl_module):
            grads = estimate_full_gradients(
                pl_module, parts, training_batches(trainer, pl_module, self.batches),
                lambda batch, i: training_loss(pl_module, batch, i, "LoRA-SB"))
        grads = average_over_processes(trainer, grads)
        refuse_zero_gradients(grads, "LoRA-SB")
        self._init = {}
        for part in parts:
            core = part.core
            a, r_core, b = lora_sb_factors(grads[part.key], core.r, lr, core.scale, self.svd, seed=self.seed)
            with torch.no_grad():
                core.lora_A.copy_(a)
                core.lora_B.copy_(b)
                core.lora_R.copy_(r_core)
            self._init[part.key] = {"A": core.lora_A.detach().cpu().clone(), "B": core.lora_B.detach().cpu().clone()}
        if trainer.is_global_zero:
            log.info(f"visadapt: LoRA-SB initialised {len(parts)} adapter blocks from {self.batches} batches "
                     f"(first-step lr {lr:g}, {self.svd} SVD)")

    def state_dict(self) -> dict[str, Any]:
        return {"init": self._init}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._init = state_dict.get("init")
        self._restored = self._init is not None
