"""Files the package ships besides code: the runnable task YAMLs (``tasks/``) and the config fragments (``configs/``).

In a checkout or an editable install they are the repository's own ``tasks/`` and ``configs/`` folders. A wheel
carries copies of the same files under ``visadapt/assets/tasks`` and ``visadapt/assets/configs``: ``setup.py``
copies them at build time, so the repository keeps one copy and ``python -m visadapt list tasks`` works from an
installed wheel too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

PACKAGE_DIR = Path(__file__).resolve().parent
SHIPPED = ("tasks", "configs")
"""Repository folders copied into the wheel under ``visadapt/assets/``."""


def shipped_dir(kind: Literal["tasks", "configs"]) -> Path:
    """The folder of shipped ``tasks`` or ``configs``: the wheel's ``visadapt/assets/<kind>``, else the checkout's.

    Raises:
        FileNotFoundError: Neither exists (an install built without ``setup.py``'s asset copy).
    """
    if kind not in SHIPPED:
        raise ValueError(f"kind must be one of {SHIPPED}, got {kind!r}")
    packaged = PACKAGE_DIR / "assets" / kind
    if packaged.is_dir():
        return packaged
    checkout = PACKAGE_DIR.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / kind).is_dir():
        return checkout / kind
    raise FileNotFoundError(f"no shipped {kind}: neither {packaged} (installed wheel) nor {checkout / kind} "
                            "(checkout) exists; reinstall visadapt from a wheel built by its setup.py")


def task_files() -> list[Path]:
    """The shipped task YAMLs, sorted by name."""
    return sorted(shipped_dir("tasks").glob("*.yaml"))


def shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies inside it (``tasks``), else absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


__all__ = ["SHIPPED", "shipped_dir", "shown", "task_files"]
