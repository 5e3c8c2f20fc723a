"""The adapter registries: variants, and the training-time companions that later variants plug in.

``ADAPTERS`` maps a variant name to its layer class (a subclass of :class:`~visadapt.adapters.base.Adapter`
whose ``config_class`` names its config dataclass). The four companion registries start empty and are
filled by the files that define the companions, so a new variant never edits core code:

* ``INITIALISERS``: data-driven inits that need a batch (LoRA-GA, LoRA-SB, NLoRA);
* ``OPTIMISERS``: optimisers over adapter parameters (LoRA-Pro, ALLoRA);
* ``REGULARISERS``: extra loss terms (BA-LoRA, GLAD, KaSA);
* ``SCHEDULES``: training-time schedules, typically Lightning callbacks (LISA, LaMDA freezing, SoRA pruning).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from visadapt.registry import Registry

ADAPTERS: Registry = Registry("adapter")
INITIALISERS: Registry = Registry("initialiser")
OPTIMISERS: Registry = Registry("optimiser")
REGULARISERS: Registry = Registry("regulariser")
SCHEDULES: Registry = Registry("schedule")

# config dataclass -> registered variant name, filled by ``register_adapter``
_VARIANT_OF_CONFIG: dict[type, str] = {}


def register_adapter(name: str, help: str | None = None) -> Callable[[Any], Any]:
    """Register an adapter layer class under ``name``; its ``config_class`` is bound to the same name.

    The one-line description shown by ``python -m visadapt list adapters`` is the first docstring line
    of the layer class unless ``help`` is given.
    """
    register = ADAPTERS.register(name, help)

    def decorator(cls: Any) -> Any:
        config_class = getattr(cls, "config_class", None)
        if config_class is None:
            raise TypeError(f"adapter class {cls.__name__} must set the class attribute `config_class`")
        _VARIANT_OF_CONFIG[config_class] = name.lower()
        return register(cls)

    return decorator


def variant_name(config: Any) -> str:
    """The registered variant name of a config instance (its most derived registered class)."""
    for klass in type(config).__mro__:
        if klass in _VARIANT_OF_CONFIG:
            return _VARIANT_OF_CONFIG[klass]
    raise KeyError(
        f"{type(config).__name__} is not the config of a registered adapter; available: {', '.join(ADAPTERS.names())}"
    )


def adapter_class(config: Any) -> Any:
    """The layer class registered for a config instance."""
    return ADAPTERS.get(variant_name(config))
