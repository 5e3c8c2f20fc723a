"""Training-time companions of the adapter layers (issue 16): initialisers, optimisers, regularisers, schedules and
layer selection, each one file, registered in its kind (``INITIALISERS``, ``OPTIMISERS``, ``REGULARISERS``,
``SCHEDULES`` of :mod:`visadapt.adapters`) and chosen in config.

Companions that hook into training are Lightning callbacks (``trainer.callbacks`` in a fragment under
``configs/companions/``), so any method (CLIP few-shot, FSCIL, tracking, ...) uses them without code of its own;
pure tensor math stays in plain functions that the tests check against a direct reference computation.

Every module of this package is imported here, so importing :mod:`visadapt.methods` fills the registries.
"""

from __future__ import annotations

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
