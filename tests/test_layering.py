"""Imports point one way: adapters <- backbones <- data <- methods <- protocols <- cli (DESIGN.md, "Layers").

The rule, per layer, is the set of visadapt layers a module of that layer may import:

* ``core`` (the modules at the package root but ``cli.py`` and ``__main__.py``: ``registry.py``, ``report.py``,
  ``errors.py``, ...): shared helpers that every layer may use; they import no layer;
* ``adapters``: core only (pure PyTorch, no Lightning);
* ``metrics``: core only (pure functions, no Lightning);
* ``backbones``: adapters; ``data``: adapters, backbones;
* ``methods``: adapters, backbones, data, metrics; ``protocols``: the same plus methods;
* ``cli`` (``cli.py``, ``__main__.py``, the ``demo`` scripts): anything.

Two checks enforce it. The static one reads every file's imports with ``ast`` (module level and inside functions,
so lazy imports count too) and is parametrised per file. The runtime one imports the layers bottom-up in one fresh
interpreter and, after each layer, asserts that no module of a layer it may not import was loaded (equivalent to
a fresh interpreter per layer, because everything already loaded at that point belongs to layers it may import);
``metrics``, which sits beside the chain, gets its own interpreter. Further checks: no import cycle between
modules, methods and protocols build no models themselves (no timm / transformers / open_clip / diffusers / peft
import: backbones come from the registry), no ``pytorch_lightning`` anywhere, and importing visadapt installs no
global warning filter.

A violation that another change is fixing is listed in ``KNOWN_OPEN`` and its check is ``xfail(strict=True)``:
when the fix lands the check passes, the strict xfail fails, and the entry must be removed.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "visadapt"

CLI_MODULES = {"visadapt.cli", "visadapt.__main__"}
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "adapters": set(),
    "metrics": set(),
    "backbones": {"adapters"},
    "data": {"adapters", "backbones"},
    "methods": {"adapters", "backbones", "data", "metrics"},
    "protocols": {"adapters", "backbones", "data", "metrics", "methods"},
    "cli": {"adapters", "backbones", "data", "metrics", "methods", "protocols"},
}
"""Layer -> the other layers its modules may import (``core`` is allowed everywhere)."""
CHAIN = ["core", "adapters", "backbones", "data", "methods", "protocols"]
"""The runtime check imports the layers in this order; ``metrics`` is checked in its own interpreter."""
MODEL_LIBRARIES = ("timm", "transformers", "open_clip", "diffusers", "peft")
NO_MODEL_BUILDING = ("methods", "protocols")
NO_LIGHTNING = ("core", "adapters", "metrics")

KNOWN_OPEN: dict[tuple[str, str], str] = {}
"""(check, file) -> why it is still open. Remove an entry when its strict xfail starts to pass."""


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """The layer of a visadapt module: its sub-package, ``cli``, or ``core`` for the other root modules.

    A sub-package that is not a layer is an error: give it a place in ``ALLOWED`` (and in DESIGN.md).
    """
    if module in CLI_MODULES or module == "visadapt.demo" or module.startswith("visadapt.demo."):
        return "cli"  # the demo scripts are entry points like cli.py
    parts = module.split(".")
    if len(parts) == 1 or (len(parts) == 2 and (PACKAGE / f"{parts[1]}.py").is_file()):
        return "core"
    if parts[1] in ALLOWED:
        return parts[1]
    raise AssertionError(f"visadapt/{parts[1]}/ is in no layer: add it to ALLOWED in {__file__}")


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _imports(module: str, path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` for every import in the file, at any depth; ``from pkg import sub`` names ``pkg.sub``.

    Relative imports are resolved; ``importlib.import_module("...")`` with a literal name counts as an import.
    """
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                pkg = pkg[:len(pkg) - node.level + 1]
                base = ".".join(pkg + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append((node.lineno, sub if sub in MODULES else base))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            out.append((node.lineno, node.args[0].value))
    return out


def _internal(name: str) -> str | None:
    """The visadapt module an import refers to (the nearest enclosing module that exists), or ``None``."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _params(check: str, layers: tuple[str, ...] | None = None) -> list:
    params = []
    for module, path in MODULES.items():
        if layers is not None and layer_of(module) not in layers:
            continue
        rel = _rel(path)
        marks = []
        if (check, rel) in KNOWN_OPEN:
            marks = [pytest.mark.xfail(strict=True, reason=KNOWN_OPEN[(check, rel)])]
        params.append(pytest.param(module, path, id=rel, marks=marks))
    return params


# ---------------------------------------------------------------------------------------------------------------
# Static checks (every import in every file, lazy ones included)
# ---------------------------------------------------------------------------------------------------------------
def test_known_open_entries_name_existing_files():
    """A ``KNOWN_OPEN`` entry whose file is gone (fixed by moving or deleting it) must be removed."""
    checks = {"layers", "model_building", "lightning"}
    stale = [(check, rel) for check, rel in KNOWN_OPEN if check not in checks or not (ROOT / rel).is_file()]
    assert not stale, f"remove these KNOWN_OPEN entries: {stale}"


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)
    assert {"adapters", "backbones", "data", "metrics", "methods", "protocols", "cli"} <= {
        layer_of(m) for m in MODULES}


@pytest.mark.parametrize(("module", "path"), _params("layers"))
def test_static_imports_follow_the_layers(module, path):
    layer = layer_of(module)
    bad = []
    for line, name in _imports(module, path):
        target = _internal(name) if name.startswith("visadapt") else None
        if target is None:
            continue
        other = layer_of(target)
        if other not in (layer, "core") and other not in ALLOWED[layer]:
            bad.append(f"{_rel(path)}:{line} imports {name} (layer {other}); {layer} may import "
                       f"{sorted(ALLOWED[layer] | {'core'})}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(("module", "path"), _params("model_building", NO_MODEL_BUILDING))
def test_methods_and_protocols_build_no_models(module, path):
    """Models come from ``visadapt.backbones`` (the registry); methods and protocols never import a model library."""
    bad = [f"{_rel(path)}:{line} imports {name}" for line, name in _imports(module, path)
           if name.split(".")[0] in MODEL_LIBRARIES]
    assert not bad, "\n".join(bad) + "\nbuild models in visadapt/backbones/ and get them with build_backbone()"


@pytest.mark.parametrize(("module", "path"), _params("lightning"))
def test_no_pytorch_lightning_and_no_lightning_in_the_lower_layers(module, path):
    """``lightning.pytorch`` only (never ``pytorch_lightning``), and nothing of Lightning in core, adapters, metrics."""
    bad = [f"{_rel(path)}:{line} imports {name}" for line, name in _imports(module, path)
           if name.split(".")[0] == "pytorch_lightning"
           or (name.split(".")[0] == "lightning" and layer_of(module) in NO_LIGHTNING)]
    assert not bad, "\n".join(bad)


def test_no_import_cycles_between_modules():
    """No two modules import each other, directly or through others (lazy imports included).

    A package ``__init__`` importing its own submodules, and a submodule importing its own package, are not edges.
    """
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for _, name in _imports(module, path):
            target = _internal(name) if name.startswith("visadapt") else None
            if target and target != module and not module.startswith(target + ".") \
                    and not target.startswith(module + "."):
                edges[module].add(target)
    # Tarjan's strongly connected components, iteratively
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    for start in MODULES:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        cycles.append(sorted(component))
    assert not cycles, f"import cycles: {cycles}"


def test_static_checker_sees_lazy_and_relative_imports(tmp_path):
    """The checker itself: a lazy import inside a function and a relative import are both found."""
    path = PACKAGE / "backbones" / "devise.py"  # a real module name, with synthetic source
    source = tmp_path / "devise.py"
    source.write_text("from .effnet import MEAN\n\ndef f():\n    from visadapt.data.fewshot import sample_per_class\n"
                      "    import importlib\n    importlib.import_module('visadapt.cli')\n")
    found = _imports(module_name(path), source)
    assert found == [(1, "visadapt.backbones.effnet"), (4, "visadapt.data.fewshot"), (5, "importlib"),
                     (6, "visadapt.cli")]
    assert [layer_of(_internal(n)) for _, n in found if n.startswith("visadapt")] == ["backbones", "data", "cli"]


# ---------------------------------------------------------------------------------------------------------------
# Runtime checks (what importing a layer really loads)
# ---------------------------------------------------------------------------------------------------------------
_RUNTIME = r"""
import importlib, json, sys, warnings
from pathlib import Path
stages, forbidden, third_party, package = json.loads(sys.argv[1])
calls = []  # (file, line, filter entry) of every filterwarnings / simplefilter call


def recording(fn):
    def wrapper(*args, **kwargs):
        fn(*args, **kwargs)
        frame = sys._getframe(1)
        calls.append((frame.f_code.co_filename, frame.f_lineno, warnings.filters[-1 if kwargs.get("append") else 0]))
    return wrapper


warnings.filterwarnings = recording(warnings.filterwarnings)
warnings.simplefilter = recording(warnings.simplefilter)
result = {}
for layer, modules in stages:
    new = {}
    for module in modules:
        before = set(sys.modules)
        importlib.import_module(module)
        for m in sorted(set(sys.modules) - before):
            new.setdefault(m, module)
    loaded = sorted(sys.modules)
    result[layer] = {
        "layers": [[m, new.get(m, "(already loaded)")] for m in loaded
                   if m.startswith("visadapt.") and m.split(".")[1] in forbidden.get(layer, [])],
        "third_party": [[m, new.get(m, "(already loaded)")] for m in loaded
                        if m.split(".")[0] in third_party.get(layer, [])],
    }
# a filter that a visadapt file installed and that is still active is global state set by importing visadapt
result["warning_filters"] = [f"{f}:{line}" for f, line, entry in calls
                             if str(Path(f).resolve()).startswith(package) and any(e is entry for e in warnings.filters)]
print("RESULT" + json.dumps(result))
"""


def _layer_modules(layer: str) -> list[str]:
    return sorted(m for m in MODULES if layer_of(m) == layer and m != "visadapt.__main__")


def _run_stages(layers: list[str]) -> dict:
    """Import ``layers`` in order in a fresh interpreter; per layer, the forbidden modules loaded and by whom.

    Also returns ``warning_filters``: the warning filters visadapt files installed that are still active at the end.
    """
    packages = {"adapters", "backbones", "data", "metrics", "methods", "protocols"}
    stages = [(layer, _layer_modules(layer)) for layer in layers]
    forbidden = {layer: sorted(packages - ALLOWED[layer] - {layer}) for layer in layers}
    third_party = {layer: ["lightning", "pytorch_lightning"] for layer in NO_LIGHTNING}
    proc = subprocess.run(
        [sys.executable, "-c", _RUNTIME, json.dumps([stages, forbidden, third_party, str(PACKAGE.resolve())])],
        capture_output=True, text=True, cwd=ROOT, check=False, timeout=600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")), None)
    assert proc.returncode == 0 and line, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(line[len("RESULT"):])


@pytest.fixture(scope="module")
def chain_result() -> dict:
    return _run_stages([*CHAIN, "cli"])  # cli last: nothing is forbidden to it, but its import counts for filters


@pytest.fixture(scope="module")
def metrics_result() -> dict:
    return _run_stages(["metrics"])


@pytest.mark.parametrize("layer", [*CHAIN, "metrics"])
def test_runtime_import_loads_no_forbidden_layer(layer, request):
    result = request.getfixturevalue("metrics_result" if layer == "metrics" else "chain_result")[layer]
    assert not result["layers"], (
        f"importing the {layer} layer loaded modules of layers it may not import (module, imported while "
        f"importing): {result['layers']}")
    assert not result["third_party"], f"importing the {layer} layer loaded Lightning: {result['third_party']}"


def test_runtime_check_catches_a_violation():
    """The runtime harness itself: a module of a higher layer imported as if it were adapters is reported."""
    probe = subprocess.run(
        [sys.executable, "-c", _RUNTIME, json.dumps([[["adapters", ["visadapt.backbones.effnet"]]],
                                                     {"adapters": ["backbones"]}, {}, str(PACKAGE.resolve())])],
        capture_output=True, text=True, cwd=ROOT, check=True, timeout=600)
    found = json.loads(probe.stdout.split("RESULT", 1)[1])["adapters"]["layers"]
    assert ["visadapt.backbones", "visadapt.backbones.effnet"] in found
    assert ["visadapt.backbones.devise", "visadapt.backbones.effnet"] in found  # via the package __init__


# ---------------------------------------------------------------------------------------------------------------
# Importing installs no global warning filter
# ---------------------------------------------------------------------------------------------------------------
def test_importing_visadapt_installs_no_global_warning_filter(chain_result):
    """Every visadapt module is imported (the runtime chain, cli included) with ``warnings.filterwarnings`` /
    ``simplefilter`` recorded; a filter a visadapt file installed that is still active afterwards is global state
    the library must not set (scope it with ``warnings.catch_warnings()``)."""
    assert chain_result["warning_filters"] == [], (
        f"global warning filters installed at import time: {chain_result['warning_filters']}")


def test_no_module_level_warning_filter_in_the_source():
    """Static companion: no ``filterwarnings`` / ``simplefilter`` call outside a ``with warnings.catch_warnings()``
    block, at module level or in a function (a function that installs a filter changes global state too)."""
    bad = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        scoped: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.With) and any(
                    isinstance(item.context_expr, ast.Call) and getattr(item.context_expr.func, "attr", None)
                    == "catch_warnings" for item in node.items):
                scoped |= {id(n) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
                    "filterwarnings", "simplefilter") and id(node) not in scoped:
                bad.append(f"{_rel(path)}:{node.lineno}")
    assert not bad, f"warning filters outside warnings.catch_warnings(): {bad}"


def test_eval_mode_notice_is_hidden_only_inside_the_cli(monkeypatch):
    """Lightning's "modules in eval mode" notice (noise for visadapt's frozen backbones) is filtered while
    ``cli_main`` runs, and only then: the filter is gone afterwards."""
    import warnings

    import visadapt.cli as cli
    from visadapt.methods.base import EVAL_MODE_NOTICE

    notice = "Found 12 module(s) in eval mode at the start of training. This may lead to unexpected behavior"
    assert ast.literal_eval(repr(EVAL_MODE_NOTICE)) == EVAL_MODE_NOTICE

    def fake_list(argv):
        warnings.warn(notice, UserWarning, stacklevel=1)
        warnings.warn("another warning", UserWarning, stacklevel=1)
        return 0

    monkeypatch.setattr(cli, "_list", fake_list)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.cli_main(["list", "tasks"]) == 0
        warnings.warn(notice, UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["another warning", notice]
