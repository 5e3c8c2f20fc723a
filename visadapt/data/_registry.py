"""The dataset registry: name -> builder ``(root=..., split=..., transform=..., **kwargs) -> Dataset``.

Builders are registered with their keyword arguments checked: an argument the builder does not take is an error
that names the dataset and lists the arguments it accepts (instead of Python's bare ``TypeError``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from visadapt.registry import Registry

DATASETS: Registry = Registry("dataset")


def _accepted(fn: Callable) -> list[str] | None:
    """Keyword arguments of ``fn``; ``None`` when it takes ``**kwargs`` (anything goes)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                 inspect.Parameter.KEYWORD_ONLY)]


def dataset_arguments(name: str) -> list[str] | None:
    """The keyword arguments the builder of dataset ``name`` accepts (``None``: any)."""
    builder = DATASETS.get(name)
    return _accepted(getattr(builder, "__wrapped__", builder))


def register_dataset(name: str, help: str | None = None) -> Callable[[Callable], Callable]:
    """Decorator registering a dataset builder under ``name``; calls through the registry check its arguments."""

    def decorator(fn: Callable) -> Callable:
        accepted = _accepted(fn)

        @functools.wraps(fn)
        def checked(*args: Any, **kwargs: Any) -> Any:
            if accepted is not None:
                unknown = sorted(k for k in kwargs if k not in accepted)
                if unknown:
                    raise ValueError(f"dataset {name!r} does not take {', '.join(unknown)}; it accepts: "
                                     f"{', '.join(accepted)} (check dataset_kwargs)")
            return fn(*args, **kwargs)

        DATASETS.register(name, help)(checked)
        return fn

    return decorator


__all__ = ["DATASETS", "dataset_arguments", "register_dataset"]
