"""``torch.compile`` for any method: a callback that compiles the model's repeated blocks in place.

Use it with the trainer fragment (any task, CPU or GPU)::

    python -m visadapt fit -c tasks/clip_fewshot.yaml -c configs/speed/compile.yaml
    python -m visadapt fit -c tasks/clip_fewshot.yaml -c configs/speed/compile.yaml --trainer configs/trainer/bf16.yaml

Why blocks and not the whole module: methods call their models through their own entry points
(``encode_image``, ``encode_text``, a tracker's joint forward), not through one ``forward``, so compiling the
LightningModule would leave most of the work eager. The transformer blocks / CNN stages are always called as modules,
and ``nn.Module.compile`` compiles a module's ``__call__`` in place: parameters, state dicts, checkpoints, adapter
merging and ``disable_adapters`` are untouched. Identical blocks share one compiled graph (parameters are graph
inputs), so a 12-block ViT compiles once. Adapter layers compile without graph breaks
(``tests/speed/test_compile_graph_breaks.py`` counts them).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import lightning.pytorch as pl
from torch import nn

from visadapt.adapters import adapter_layers

log = logging.getLogger(__name__)

_CONTAINERS = (nn.ModuleList, nn.Sequential)


def compile_targets(model: nn.Module, pattern: str | None = None) -> list[str]:
    """Names of the modules :class:`CompileModel` compiles.

    With ``pattern`` (a regular expression matched in full against module names): the matching modules, outermost
    only. Without: the children of the outermost ``nn.ModuleList`` / ``nn.Sequential`` containers of two or more
    modules that hold an adapter layer (every such container when the model has no adapter): the transformer blocks
    of a ViT or text tower, the stages of a CNN.
    """
    modules = dict(model.named_modules())
    if pattern is not None:
        rule = re.compile(pattern)
        chosen = [n for n in modules if n and rule.fullmatch(n)]
        if not chosen:
            raise ValueError(f"compile pattern {pattern!r} matches no module of {type(model).__name__}")
    else:
        adapted = [n for n, _ in adapter_layers(model)]
        chosen = []
        for name, module in modules.items():
            if not isinstance(module, _CONTAINERS) or len(module) < 2 or module is model:
                continue
            if adapted and not any(a.startswith(f"{name}.") for a in adapted):
                continue
            chosen += [f"{name}.{child}" if name else child for child, _ in module.named_children()]
    outermost: list[str] = []
    for name in sorted(chosen, key=lambda n: n.count(".")):  # a compiled module's insides are compiled with it
        if not any(name.startswith(f"{o}.") for o in outermost):
            outermost.append(name)
    return [n for n in modules if n in set(outermost)]  # model order


class CompileModel(pl.Callback):
    """Compile the method's blocks with ``torch.compile`` before training, validation or testing starts.

    Args:
        modules: Regular expression of module names to compile (matched in full, outermost matches only); ``None``
            picks the repeated blocks that hold adapters (see :func:`compile_targets`).
        backend: ``torch.compile`` backend: ``inductor`` (generated kernels: the speed-up), ``aot_eager`` (traces
            forward and backward, runs them eagerly: a quick check that everything traces) or ``eager``.
        mode: ``torch.compile`` mode (``default``, ``reduce-overhead``, ``max-autotune``); ``None`` = default.
        dynamic: Passed to ``torch.compile``; ``None`` lets it decide (it turns dynamic after a shape changes,
            e.g. at the last, smaller batch).
        fullgraph: Fail on any graph break inside a compiled block instead of falling back to eager there.
    """

    def __init__(self, modules: str | None = None, backend: str = "inductor", mode: str | None = None,
                 dynamic: bool | None = None, fullgraph: bool = False) -> None:
        self.pattern, self.backend, self.mode, self.dynamic, self.fullgraph = modules, backend, mode, dynamic, fullgraph
        self.compiled: list[str] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.compiled:
            return  # fit then test: compiled once
        names = compile_targets(pl_module, self.pattern)
        if not names:
            log.warning("CompileModel: %s has no block to compile (no ModuleList/Sequential holding adapters); "
                        "pass modules: <regex>", type(pl_module).__name__)
            return
        kwargs: dict[str, Any] = {"backend": self.backend, "dynamic": self.dynamic, "fullgraph": self.fullgraph}
        if self.mode is not None:
            kwargs["mode"] = self.mode
        for name in names:
            pl_module.get_submodule(name).compile(**kwargs)
        self.compiled = names
        log.info("CompileModel: compiled %d module(s) with %s: %s%s", len(names), self.backend,
                 ", ".join(names[:4]), " ..." if len(names) > 4 else "")
        report = getattr(pl_module, "report", None)
        if isinstance(report, dict):
            report["compiled"] = {"backend": self.backend, "mode": self.mode, "modules": len(names)}

