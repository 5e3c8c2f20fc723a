"""The registry of FSCIL methods (``python -m visadapt fscil --methods [...]`` picks from it)."""

from __future__ import annotations

from collections.abc import Callable

from visadapt.registry import Registry

FSCIL_METHODS: Registry = Registry("fscil method")
"""Name -> FSCIL LightningModule class."""


def register_fscil_method(name: str) -> Callable[[type], type]:
    """Register an FSCIL method class under ``name`` (also its config group in the ``fscil`` command)."""

    def decorator(cls: type) -> type:
        cls.registered_name = name
        return FSCIL_METHODS.register(name)(cls)

    return decorator


__all__ = ["FSCIL_METHODS", "register_fscil_method"]
