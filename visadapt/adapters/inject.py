"""Model-level operations: inject adapters, find them, switch, merge, freeze, and move their state.

Every function takes the model (any ``nn.Module``) and works on the :class:`~visadapt.adapters.base.AdapterLayer`
wrappers inside it, so a model needs no wrapper class of its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from visadapt.adapters._registry import adapter_class, variant_name
from visadapt.adapters.base import ADAPTER_CONTAINER, AdapterConfig, AdapterLayer
from visadapt.adapters.targets import format_name, match_rules, parse_target, slice_bounds, supported_kind

_MARK = f".{ADAPTER_CONTAINER}."
_MAX_LISTED = 60


@dataclass
class InjectionReport:
    """What :func:`inject` did."""

    name: str
    variant: str
    matched: list[str]
    """Names of the adapted modules, in model order."""
    slices: dict[str, tuple[str, ...] | None] = field(default_factory=dict)
    """Module name -> adapted fused-qkv slices (``None``: the whole layer)."""
    adapter_parameters: int = 0
    trainable: int = 0
    total: int = 0

    def __str__(self) -> str:
        names = [format_name(m, self.slices.get(m)) for m in self.matched]
        shown = ", ".join(names[:6]) + (f", ... (+{len(names) - 6} more)" if len(names) > 6 else "")
        pct = 100.0 * self.trainable / max(self.total, 1)
        return (
            f"visadapt: {self.variant} adapter {self.name!r} on {len(self.matched)} modules: {shown}\n"
            f"visadapt: adapter parameters {self.adapter_parameters:,}; "
            f"trainable {self.trainable:,} / {self.total:,} ({pct:.3f}%)"
        )


def is_adapter_param(param_name: str) -> bool:
    """True for the state-dict / parameter names of adapter tensors (they contain ``.adapters.``)."""
    return _MARK in f".{param_name}"


def _adapter_name_of(param_name: str) -> str:
    return f".{param_name}".split(_MARK, 1)[1].split(".", 1)[0]


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    """``(module name, wrapper)`` for every adapted layer, in model order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters present in the model, in order of first appearance."""
    names: dict[str, None] = {}
    for _, layer in adapter_layers(model):
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name.isidentifier() or hasattr(nn.ModuleDict, name):
        raise ValueError(f"adapter name must be a Python identifier that is not a ModuleDict attribute, got {name!r}")


def _candidates(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """Modules a target may match (skipping the insides of wrappers), and the names of the supported ones."""
    modules, supported, inside = [], [], None
    for n, m in model.named_modules():
        if not n or (inside is not None and n.startswith(inside)):
            continue
        inside = f"{n}." if isinstance(m, AdapterLayer) else inside
        modules.append((n, m))
        if isinstance(m, AdapterLayer) or supported_kind(m):
            supported.append(n)
    return modules, supported


def _listing(names: list[str]) -> str:
    more = f"\n  ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return "\n  " + "\n  ".join(names[:_MAX_LISTED]) + more if names else " (none)"


def inject(model: nn.Module, config: AdapterConfig, name: str = "default", verbose: bool = True) -> InjectionReport:
    """Add adapter ``name`` described by ``config`` to every module its target matches.

    Matched ``nn.Linear`` / 1x1 ``nn.Conv2d`` modules are wrapped in an :class:`AdapterLayer` (modules wrapped
    earlier gain one more adapter). Afterwards every parameter of the model except those of the new adapter is
    frozen, and the new adapter is the only active one (:func:`set_active_adapter` combines adapters).

    Raises:
        ValueError: nothing matches (the message lists the candidate module names), a matched module is not a
            supported layer, ``name`` already exists in the model, or a slice suffix does not fit a layer.
    """
    _check_name(name)
    if name in adapter_names(model):
        raise ValueError(f"adapter {name!r} is already injected in this model; choose another name")
    rules = parse_target(config.target)
    modules, supported = _candidates(model)
    plan: dict[str, tuple[str, ...] | None] = {}
    unsupported = []
    for module_name, module in modules:
        rule = match_rules(rules, module_name)
        if rule is None:
            continue
        if isinstance(module, AdapterLayer) or supported_kind(module):
            plan[module_name] = rule.slices
        else:
            unsupported.append(f"{module_name} ({type(module).__name__})")
    if unsupported:
        raise ValueError(
            f"target {config.target!r} matches modules that are not nn.Linear or 1x1 nn.Conv2d:{_listing(unsupported)}"
            "\nNarrow the regular expression (it is matched in full against module names)."
        )
    if not plan:
        raise ValueError(
            f"target {config.target!r} matches no module (the regular expression must match the whole module "
            f"name). Candidate nn.Linear / 1x1 nn.Conv2d modules:{_listing(supported)}"
        )
    _inject_modules(model, config, name, plan)
    set_active_adapter(model, name)
    report = _report(model, config, name, plan)
    if verbose:
        print(report)
    return report


def _inject_modules(model: nn.Module, config: AdapterConfig, name: str, plan: Mapping) -> None:
    """Wrap (if needed) and add adapter ``name`` to each module of ``plan`` (module name -> slices); freeze."""
    cls = adapter_class(config)
    for module_name, slices in plan.items():
        module = model.get_submodule(module_name)
        if not isinstance(module, AdapterLayer):
            kind = supported_kind(module)
            if kind is None:
                raise ValueError(f"{module_name} is a {type(module).__name__}, not nn.Linear or 1x1 nn.Conv2d")
            module = AdapterLayer(module, kind).train(module.training)  # an eval model stays in eval mode
            parent_name, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module)
        if module.merged:
            raise RuntimeError(f"{module_name} has merged adapters; call unmerge_adapters(model) before injecting")
        bounds = None if slices is None else slice_bounds(module.base_weight.shape[0], slices, module_name)
        try:
            module.add_adapter(name, cls, config.for_module(module_name), bounds)
        except ValueError as err:
            raise ValueError(f"{format_name(module_name, slices)}: {err}") from None
        module.adapters[name].train(module.training)  # new dropout follows the layer's train/eval mode
    for param_name, param in model.named_parameters():
        param.requires_grad_(is_adapter_param(param_name) and _adapter_name_of(param_name) == name)


def _report(model: nn.Module, config: AdapterConfig, name: str, plan: Mapping) -> InjectionReport:
    trainable, total = count_parameters(model)
    added = sum(layer.num_parameters(name) for _, layer in adapter_layers(model) if name in layer.adapters)
    return InjectionReport(name, variant_name(config), list(plan), dict(plan), added, trainable, total)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts of the model (adapters included in the total)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# --- switching ------------------------------------------------------------------------------------------------


def set_active_adapter(model: nn.Module, name: str | Mapping[str, float]) -> None:
    """Make ``name`` the only active adapter, or activate a weighted combination ``{name: weight, ...}``.

    The forward then computes ``base(x) + sum_i weight_i * delta_i(x)``. Trainability is not changed.
    """
    weights = {name: 1.0} if isinstance(name, str) else {str(k): float(v) for k, v in dict(name).items()}
    known = adapter_names(model)
    unknown = [n for n in weights if n not in known]
    if unknown:
        raise KeyError(f"unknown adapter(s) {unknown}; this model has {known or '(none)'}")
    for module_name, layer in adapter_layers(model):
        active = {n: w for n, w in weights.items() if n in layer.adapters}
        if layer.merged and active != layer.merged:
            raise RuntimeError(f"{module_name} has merged adapters; call unmerge_adapters(model) first")
        layer.active = active


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    """Turn every adapter layer on or off (off: the model computes its base outputs)."""
    for module_name, layer in adapter_layers(model):
        if layer.merged and not enabled:
            raise RuntimeError(f"{module_name} has merged adapters; call unmerge_adapters(model) before disabling")
        layer.enabled = bool(enabled)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Context manager: inside it the model computes its base outputs; the previous state comes back after."""
    previous = [(layer, layer.enabled) for _, layer in adapter_layers(model)]
    set_adapters_enabled(model, False)
    try:
        yield
    finally:
        for layer, enabled in previous:
            layer.enabled = enabled


def merge_adapters(model: nn.Module) -> None:
    """Merge the active adapters into the base weights (exact; idempotent). Forward then costs the base's."""
    for _, layer in adapter_layers(model):
        if layer.enabled:
            layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    """Undo :func:`merge_adapters` (idempotent)."""
    for _, layer in adapter_layers(model):
        layer.unmerge()


# --- state ------------------------------------------------------------------------------------------------------


def adapter_state_dict(model: nn.Module, name: str | None = None) -> dict[str, Tensor]:
    """Adapter tensors keyed by their model ``state_dict`` keys (all adapters, or only ``name``)."""
    state = {}
    for key, value in model.state_dict().items():
        if is_adapter_param(key) and (name is None or _adapter_name_of(key) == name):
            state[key] = value
    if name is not None and not state:
        raise KeyError(f"adapter {name!r} not found; this model has {adapter_names(model) or '(none)'}")
    return state


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, state: Mapping[str, Tensor], strict: bool = True) -> None:
    """Copy adapter tensors into the model (values are cast to the parameters' dtype and device).

    With ``strict``, keys of the adapters named in ``state`` that ``state`` lacks, and keys the model lacks, raise
    a ``KeyError`` naming the first such key. A wrong shape always raises a ``ValueError`` naming the key.
    """
    names = {_adapter_name_of(k) for k in state if is_adapter_param(k)}
    targets = {k: v for k, v in model.state_dict(keep_vars=True).items() if is_adapter_param(k)}
    expected = {k for k in targets if _adapter_name_of(k) in names}
    if strict:
        unexpected = [k for k in state if k not in targets]
        if unexpected:
            raise KeyError(f"unexpected adapter key {unexpected[0]!r} ({len(unexpected)} unexpected in all)")
        missing = [k for k in targets if k in expected and k not in state]
        if missing:
            raise KeyError(f"missing adapter key {missing[0]!r} ({len(missing)} missing in all)")
    merged = [n for n, layer in adapter_layers(model) if layer.merged]
    if merged:
        raise RuntimeError(f"{merged[0]} has merged adapters; call unmerge_adapters(model) before loading")
    for key, value in state.items():
        if key not in targets:
            continue
        target = targets[key]
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(
                f"shape mismatch for {key}: the file has {tuple(value.shape)}, the model expects {tuple(target.shape)}"
            )
        target.copy_(value)
