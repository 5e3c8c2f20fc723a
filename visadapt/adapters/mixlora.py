"""MixLoRA (Li et al., "MixLoRA: Enhancing LLM fine-tuning with LoRA-based mixture of experts", arXiv 2404.15159;
TUDB-Labs/MixLoRA): ``E`` LoRA experts per adapted matrix, a top-``k`` router, and a load-balance loss.

**Not mergeable.** Every token picks its own experts, so the update depends on the input: there is no weight to
merge, no low-rank form and no PEFT LoRA equivalent. :func:`~visadapt.adapters.merge_adapters` and
:func:`~visadapt.adapters.export_peft` refuse with a message saying so; the adapter is saved and loaded in
visadapt's own format (:func:`~visadapt.adapters.save_adapter`), which round-trips exactly. Inference costs ``k``
extra LoRA passes per adapted matrix.

Per token ``x`` of an adapted matrix ``W``:

* router logits ``l = W_g x`` (``mix_router``, ``E x in``, init ``N(0, 0.02^2)``: the official
  ``router_init_range``), optional multiplicative input jitter during training (``jitter_noise``, Mixtral's rule);
* ``p = softmax(l)`` in float32, the top-``k`` experts with their probabilities renormalised to sum to one;
* ``y = W x + sum_{e in top-k} w_e * s * B_e A_e drop(x)`` (``lora_A``: ``E x r x in``, kaiming per expert;
  ``lora_B``: ``E x out x r``, zero: the model is unchanged at injection).

Load balance (the ``mixlora`` companion in ``REGULARISERS``): Switch/Mixtral style,
``coef * E * sum_e f_e P_e`` with ``f_e`` the fraction of (token, slot) assignments that went to expert ``e`` (per
top-k slot, as the official code's one-hot over ``[tokens, k, E]``) and ``P_e`` the mean router probability,
over the tokens of the last training forward of each adapted matrix, summed over matrices.

**Difference from the paper (documented reading).** The paper routes once per FFN block and makes each expert a
whole FFN (``fc2_e(act(fc1_e(h)))``, the mixture taken after ``fc2``), with plain LoRA on attention. visadapt's
adapters act on single matrices through the shared target contract, which reaches every family (BERT's FFN halves
live in two different modules, EfficientNet's pointwise convs have a depthwise conv between them), so here each
adapted matrix is its own mixture with its own router (the "MoE-LoRA per linear layer" form). On an FFN's two
matrices this mixes before the nonlinearity instead of after it. Defaults follow the official configuration:
``E = 8``, ``k = 2``, ``r = 8``, ``alpha = 16``, dropout 0.05, ``aux_loss_coef = 0.001`` (its README examples use
0.01). ``mixlora-dynamic`` (top-p) and ``mixlora-switch`` (capacity, z-loss) are not implemented.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visadapt.adapters._registry import REGULARISERS, register_adapter
from visadapt.adapters.base import ADAPTER_CONTAINER, Adapter, lora_scale
from visadapt.adapters.lora import LoRAConfig

NOT_MERGEABLE = (
    "MixLoRA routes every token to its own top-k experts, so its update depends on the input: it has no weight to "
    "merge and no low-rank (PEFT LoRA) form. Keep it unmerged and save it with save_adapter (visadapt's format)"
)


@dataclass
class MixLoRAConfig(LoRAConfig):
    """MixLoRA: E LoRA experts per adapted matrix, a top-k router and a load-balance loss (not mergeable)."""

    alpha: float = 16.0
    """Scale numerator of every expert (official: r = 8, alpha = 16)."""
    dropout: float = 0.05
    """Dropout on each expert's input (official 0.05)."""
    num_experts: int = 8
    """Number ``E`` of LoRA experts per adapted matrix."""
    top_k: int = 2
    """Experts each token is routed to."""
    router_init_range: float = 0.02
    """Standard deviation of the router's normal init."""
    jitter_noise: float = 0.0
    """Training only: multiply the router's input by ``U(1 - j, 1 + j)`` (0: off, the official default)."""
    aux_loss_coef: float = 0.001
    """Weight of the load-balance loss (official config default; its README examples use 0.01)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank_pattern or self.alpha_pattern:
            raise ValueError("MixLoRA does not support rank_pattern / alpha_pattern")
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"num_experts must be an integer >= 1, got {self.num_experts!r}")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be an integer in [1, num_experts={self.num_experts}], got {self.top_k!r}")
        if self.router_init_range < 0 or not 0 <= self.jitter_noise < 1 or self.aux_loss_coef < 0:
            raise ValueError("router_init_range and aux_loss_coef must be >= 0 and jitter_noise in [0, 1)")


def route(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(probabilities, top-k weights renormalised, top-k expert indices)`` from router logits ``(tokens, E)``."""
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    weights, experts = probs.topk(top_k, dim=-1)
    return probs, weights / weights.sum(-1, keepdim=True), experts


def load_balance_loss(probs: Tensor, experts: Tensor, num_experts: int) -> Tensor:
    """``E * sum_{slot, e} f_{slot, e} P_e``: ``f`` the fraction of tokens whose top-k slot went to ``e``, ``P`` the
    mean router probability (Switch / Mixtral / official MixLoRA)."""
    f = F.one_hot(experts, num_experts).float().mean(0)  # (k, E)
    return num_experts * (f * probs.mean(0)).sum()


@register_adapter("mixlora")
class MixLoRA(Adapter):
    """MixLoRA: E LoRA experts + top-k router per adapted matrix, load-balance loss; input-dependent, NOT mergeable."""

    config_class = MixLoRAConfig
    lowrank_forward = False

    def __init__(self, weight: Tensor, config: MixLoRAConfig, **context) -> None:
        super().__init__(weight, config, **context)
        kw = {"dtype": weight.dtype, "device": weight.device}
        e, r = config.num_experts, config.r
        self.r, self.num_experts, self.top_k = r, e, config.top_k
        self.jitter = config.jitter_noise
        self.scale = lora_scale(config.alpha, r, config.rslora)
        a = torch.empty(e, r, self.in_features)
        for i in range(e):  # each expert as a PEFT LoRA: kaiming-uniform(a=sqrt(5)) per (r, in) matrix
            nn.init.kaiming_uniform_(a[i], a=math.sqrt(5))
        self.lora_A = nn.Parameter(a.to(**kw))
        self.lora_B = nn.Parameter(torch.zeros(e, self.out_features, r, **kw))
        self.mix_router = nn.Parameter((torch.randn(e, self.in_features) * config.router_init_range).to(**kw))
        if config.dropout > 0:
            self.dropout = nn.Dropout(config.dropout)
        self.aux_loss: Tensor | None = None
        """Load-balance loss of the last forward in training mode with gradients on (read by the regulariser)."""

    def factors(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(NOT_MERGEABLE)

    def delta_weight(self) -> Tensor:
        raise NotImplementedError(NOT_MERGEABLE)

    def router_logits(self, x2d: Tensor) -> Tensor:
        if self.training and self.jitter > 0:
            x2d = x2d * torch.empty_like(x2d).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        return F.linear(x2d, self.mix_router.to(x2d.dtype))

    def forward(self, x2d: Tensor) -> Tensor:
        """The mixture's contribution ``(tokens, out_features)`` for the rows ``x2d`` of the layer's input."""
        probs, weights, experts = route(self.router_logits(x2d), self.top_k)
        if self.training and torch.is_grad_enabled():
            self.aux_loss = load_balance_loss(probs, experts, self.num_experts)
        out = x2d.new_zeros(x2d.shape[0], self.out_features)
        weights = weights.to(x2d.dtype)
        for e in range(self.num_experts):
            token, slot = torch.where(experts == e)
            if token.numel() == 0:
                continue
            h = F.linear(self.dropout(x2d[token]), self.lora_A[e].to(x2d.dtype))
            y = F.linear(h, self.lora_B[e].to(x2d.dtype)) * (weights[token, slot, None] * self.scale)
            out = out.index_add(0, token, y)
        return out

    def extra_repr(self) -> str:
        return f"r={self.r}, experts={self.num_experts}, top_k={self.top_k}, " + super().extra_repr()


@REGULARISERS.register("mixlora")
def mixlora_balance_loss(model: nn.Module) -> Tensor | None:
    """MixLoRA's load-balance loss: aux_loss_coef × E·Σ f_e·P_e of each adapted matrix's last training forward, summed.

    Each value is used once (it is cleared when read), so a matrix that did not run since the last call adds nothing.
    """
    total = None
    for name, module in model.named_modules():
        if isinstance(module, MixLoRA) and module.aux_loss is not None and f".{ADAPTER_CONTAINER}." in f".{name}.":
            term = module.aux_loss * module.config.aux_loss_coef  # type: ignore[attr-defined]
            module.aux_loss = None
            total = term if total is None else total + term
    return total
