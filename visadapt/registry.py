"""One small generic registry, used for adapters, backbones, datasets and training companions.

A registry maps a lowercase name to an object (a class or a builder function) plus a one-line description that
``python -m visadapt list ...`` prints. Registration is a decorator placed next to the thing it registers, so
adding a variant touches one file.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of objects of one kind.

    Args:
        kind: What the registry holds, used in messages ("adapter", "dataset", ...).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, help: str | None = None) -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name``; warns when a name is overwritten.

        The description defaults to the first line of the object's docstring.
        """
        key = name.lower()

        def decorator(obj: T) -> T:
            if key in self._items and self._items[key] is not obj:
                warnings.warn(f"{self.kind} {key!r} is registered twice; the later one wins", stacklevel=2)
            self._items[key] = obj
            lines = (getattr(obj, "__doc__", None) or "").strip().splitlines()
            self._help[key] = (help or (lines[0] if lines else "")).replace("``", "")
            return obj

        return decorator

    def get(self, name: str) -> T:
        """The object registered under ``name``; a ``KeyError`` lists the available names."""
        key = name.lower()
        if key not in self._items:
            raise KeyError(f"Unknown {self.kind} {name!r}; available: {', '.join(self.names()) or '(none)'}")
        return self._items[key]

    def names(self) -> list[str]:
        return sorted(self._items)

    def describe(self) -> dict[str, str]:
        """Name -> one-line description, sorted by name."""
        return {k: self._help[k] for k in self.names()}

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
