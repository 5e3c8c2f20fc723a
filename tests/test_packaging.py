"""What a wheel ships: the task YAMLs and config fragments (identical to the repository's), the trained t2i base
model, the runtime dependencies.

The wheel is built from a copy of the sources in a temporary folder (``pip wheel --no-deps --no-build-isolation``,
offline), then ``python -m visadapt list tasks`` runs from the unpacked wheel in a folder that is not a checkout.
"""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "visadapt", "tasks", "configs"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "assets"))
        else:
            shutil.copy2(path, src / name)
    # the checkout's visadapt/assets is left out above (stale copies of tasks/ and configs/ must not leak in); the
    # trained t2i base that lives there is shipped as a package file, so copy it back
    shutil.copytree(ROOT / "visadapt" / "assets" / "t2i_base", src / "visadapt" / "assets" / "t2i_base")
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(out), str(src)], capture_output=True, text=True, check=False,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = out.glob("visadapt-*.whl")
    return path


@pytest.mark.slow
def test_wheel_ships_tasks_and_configs_identical_to_the_repository(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for kind in ("tasks", "configs"):
            expected = sorted(p.relative_to(ROOT / kind).as_posix() for p in (ROOT / kind).rglob("*.yaml"))
            shipped = sorted(n.split(f"visadapt/assets/{kind}/", 1)[1] for n in names
                             if n.startswith(f"visadapt/assets/{kind}/"))
            assert shipped == expected and expected, kind
            for rel in expected:
                assert zf.read(f"visadapt/assets/{kind}/{rel}") == (ROOT / kind / rel).read_bytes(), rel
        assert "visadapt/py.typed" in names and "visadapt/resources.py" in names
        for rel in ("t2i_base.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"):
            path = ROOT / "visadapt" / "assets" / "t2i_base" / rel
            assert zf.read(f"visadapt/assets/t2i_base/{rel}") == path.read_bytes(), rel  # the shipped base model


@pytest.mark.slow
def test_wheel_metadata_keeps_peft_out_of_the_runtime_dependencies(wheel):
    with zipfile.ZipFile(wheel) as zf:
        meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.message_from_bytes(zf.read(meta_name))
    requires = meta.get_all("Requires-Dist")
    runtime = [r for r in requires if "extra ==" not in r]
    dev = [r for r in requires if 'extra == "dev"' in r]
    assert not any(r.lower().startswith("peft") for r in runtime), runtime
    assert any(r.lower().startswith("peft") for r in dev), dev
    assert any(r.startswith("torch") for r in runtime)


@pytest.mark.slow
def test_list_tasks_runs_from_the_unpacked_wheel(wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    elsewhere = tmp_path / "elsewhere"  # not a checkout: no tasks/ folder next to the package
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = "import visadapt, visadapt.resources as r; print(visadapt.__file__); print(r.shipped_dir('tasks'))"
    where = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=elsewhere, env=env,
                           check=True, timeout=600).stdout.split()
    assert where == [str(site / "visadapt" / "__init__.py"), str(site / "visadapt" / "assets" / "tasks")]
    proc = subprocess.run([sys.executable, "-m", "visadapt", "list", "tasks"], capture_output=True, text=True,
                          cwd=elsewhere, env=env, check=False, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for task in (ROOT / "tasks").glob("*.yaml"):
        assert f"  {task.stem} " in out, task.stem
    assert f"(in {site / 'visadapt' / 'assets' / 'tasks'}/)" in out
    # the run line of each task points at the wheel's copy, not at a tasks/ folder that is not there
    assert f"run: python -m visadapt fit -c {site / 'visadapt' / 'assets' / 'tasks' / 'clip_fewshot.yaml'}" in out


def test_checkout_reads_the_repository_folders():
    from visadapt.resources import shipped_dir, task_files

    assert shipped_dir("tasks") == ROOT / "tasks" and shipped_dir("configs") == ROOT / "configs"
    assert [p.name for p in task_files()] == sorted(p.name for p in (ROOT / "tasks").glob("*.yaml"))
    with pytest.raises(ValueError, match="kind must be one of"):
        shipped_dir("weights")
