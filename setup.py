"""Build hook (the project metadata is in pyproject.toml): ship ``tasks/`` and ``configs/`` inside the wheel.

The YAML files are copied to ``visadapt/assets/{tasks,configs}`` in the build folder, so the repository keeps one
copy of each and an installed wheel still finds them (:mod:`visadapt.resources`). An editable install reads the
checkout's folders directly and copies nothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = ("tasks", "configs")  # keep in step with visadapt.resources.SHIPPED


class BuildPyWithAssets(build_py):
    """``build_py`` that also copies the shipped YAML folders into ``<build_lib>/visadapt/assets/``."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for kind in SHIPPED:
            source = ROOT / kind
            if not source.is_dir():
                raise FileNotFoundError(f"{source} is missing: the wheel must ship it (is it in MANIFEST.in?)")
            for path in sorted(source.rglob("*.yaml")):
                target = Path(self.build_lib) / "visadapt" / "assets" / kind / path.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)


setup(cmdclass={"build_py": BuildPyWithAssets})
