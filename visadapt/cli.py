"""``python -m visadapt``: LightningCLI (fit / validate / test / predict) plus ``list``, ``fscil`` and ``sweep``.

Models and datamodules are chosen in subclass mode (``model: {class_path: ClipFewShot, init_args: ...}``). The
optimiser is injected into the module (``model.init_args.optimizer``) and sees only trainable parameters. Runs are
written under ``runs/<task>/version_N/`` by the CSV logger each task names. Config errors are reported by
jsonargparse with the offending key; ``JSONARGPARSE_DEBUG=1`` adds the full traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jsonargparse import set_parsing_settings
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningCLI

import visadapt.data  # noqa: F401  (dataset registration)
import visadapt.methods  # noqa: F401  (short class_path names)
from visadapt.adapters import AdapterConfig
from visadapt.methods.base import AdapterModule

PROG = "python -m visadapt"
TASKS_DIR = Path(__file__).resolve().parent.parent / "tasks"

EXTRA_COMMANDS = """extra commands:
  list {adapters,datasets,backbones,tasks,all}   what is registered / shipped
  fscil -c tasks/fscil_coact.yaml                the few-shot class-incremental session protocol
  sweep tasks/clip_fewshot.yaml --shots [1,4,16] --seeds [1,2]
                                                 a task over shots x seeds (x datasets) -> paper table
"""

# Adapter configs are dataclasses with subclasses (LoRAConfig, BlockLoRAConfig, ...) chosen by class_path.
set_parsing_settings(subclasses_enabled=[AdapterConfig])


class VisAdaptCLI(LightningCLI):
    """LightningCLI with visadapt's defaults: a checkpoint callback that keeps ``last.ckpt`` for resuming, and
    the datamodule's preprocessing linked from the model's backbone."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0,
                             "checkpoint.filename": "epoch{epoch:03d}-step{step:06d}",
                             "checkpoint.auto_insert_metric_name": False})
        parser.link_arguments("model", "data.init_args.preprocess", compute_fn=lambda m: m.preprocess,
                              apply_on="instantiate")


def _list(argv: list[str]) -> int:
    from visadapt.adapters import ADAPTERS, INITIALISERS, OPTIMISERS, REGULARISERS, SCHEDULES
    from visadapt.backbones import BACKBONES
    from visadapt.data import DATASETS

    what = argv[0] if argv else "all"
    kinds = {"adapters": [ADAPTERS, INITIALISERS, OPTIMISERS, REGULARISERS, SCHEDULES], "datasets": [DATASETS],
             "backbones": [BACKBONES]}
    if what not in (*kinds, "tasks", "all"):
        print(f"usage: {PROG} list {{adapters,datasets,backbones,tasks,all}} (got {what!r})", file=sys.stderr)
        return 2
    for kind, regs in kinds.items():
        if what in (kind, "all"):
            for reg in regs:
                print(f"{reg.kind}s:")
                for name, text in reg.describe().items():
                    print(f"  {name:28s} {text}")
                if not len(reg):
                    print("  (none registered yet)")
    if what in ("tasks", "all"):
        print("tasks (run with: python -m visadapt fit -c tasks/<name>.yaml):")
        for f in sorted(TASKS_DIR.glob("*.yaml")):
            first = next((ln[1:].strip() for ln in f.read_text().splitlines() if ln.startswith("#")), "")
            print(f"  {f.stem:28s} {first}")
    return 0


def cli_main(args: ArgsType = None) -> VisAdaptCLI | int | dict | None:
    """Entry point of ``python -m visadapt``; ``args`` replaces ``sys.argv[1:]`` (for tests and notebooks)."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "list":
        return _list(argv[1:])
    if argv and argv[0] == "fscil":
        from visadapt.protocols.fscil import fscil_main

        return fscil_main(argv[1:])
    if argv and argv[0] == "sweep":
        from visadapt.protocols.sweep import sweep_main

        return sweep_main(argv[1:])
    return VisAdaptCLI(
        AdapterModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                     "init_args": {"save_dir": "runs", "name": "default"}}},
        parser_kwargs={"prog": PROG, "description": __doc__.split("\n\n")[0], "epilog": EXTRA_COMMANDS,
                       "formatter_class": _formatter()},
        args=None if args is None else argv,
    )


def _formatter():
    from jsonargparse import DefaultHelpFormatter

    class Formatter(DefaultHelpFormatter):
        """Keeps the epilog's line breaks."""

        def _fill_text(self, text, width, indent):
            return "".join(indent + line for line in text.splitlines(keepends=True))

    return Formatter


__all__ = ["VisAdaptCLI", "cli_main"]
