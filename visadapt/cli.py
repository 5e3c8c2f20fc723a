"""``python -m visadapt``: LightningCLI (fit / validate / test / predict) plus ``list``, ``fscil`` and ``sweep``.

Models and datamodules are chosen in subclass mode (``model: {class_path: ClipFewShot, init_args: ...}``). The
optimiser is injected into the module (``model.init_args.optimizer``) and sees only trainable parameters. Runs are
written under ``runs/<task>/version_N/`` by the CSV logger each task names. Config errors are reported by
jsonargparse with the offending key; ``JSONARGPARSE_DEBUG=1`` adds the full traceback. Other user errors (paths,
files, values, targets) print one line naming the file or setting and exit with code 2; ``VISADAPT_DEBUG=1`` shows
the traceback (:mod:`visadapt.errors`).
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from jsonargparse import set_parsing_settings
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningCLI
from lightning.pytorch.loggers import CSVLogger

import visadapt.data  # noqa: F401  (dataset registration)
import visadapt.methods  # noqa: F401  (short class_path names)
from visadapt.adapters import AdapterConfig
from visadapt.errors import CorruptFileError, UnsafeCheckpointError, UserError, report_user_errors
from visadapt.methods.base import AdapterModule, quiet_eval_mode_notice, read_checkpoint

PROG = "python -m visadapt"
TASKS_DIR = Path(__file__).resolve().parent.parent / "tasks"

EXTRA_COMMANDS = """extra commands:
  list {adapters,datasets,backbones,tasks,all}   what is registered / shipped
  fscil -c tasks/fscil_coact.yaml                the few-shot class-incremental session protocol
  track -c tasks/tracking_lorat.yaml --ckpt_path <last.ckpt> [--tracker lorat|untrained|ncc]
                                                 run a tracker over sequences; SUC/P/AO, plots, FPS
  sweep tasks/clip_fewshot.yaml --shots [1,4,16] --seeds [1,2]
                                                 a task over shots x seeds (x datasets) -> paper table
  generate -c tasks/t2i_decor.yaml --prompt '["a photo of sks sneaker"]' --alpha '[0, 1]'
                                                 text-to-image grid with the task's LoRA and DECOR
  t2i_sweep -c tasks/t2i_decor.yaml [--fit true]  DECOR alpha sweep: CLIP-T / CLIP-I table + Pareto plot
"""

# Adapter configs are dataclasses with subclasses (LoRAConfig, BlockLoRAConfig, ...) chosen by class_path.
set_parsing_settings(subclasses_enabled=[AdapterConfig])


FAULT_ENV = "VISADAPT_FAULT_KILL_IN_CKPT_WRITE"
"""Testing hook: ``N`` kills the process (SIGKILL) half-way through writing its N-th checkpoint file."""

TEMP_MARK = ".tmp-"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint next to its target (``<name>.tmp-<pid>``) and renames it into place.

    A kill during the write leaves the previous checkpoint intact and, at worst, a temporary file that the next run
    in the same folder removes (:func:`remove_stale_temp_files`). Lightning's own writer stages the file in the
    system temporary folder and moves it, which leaves orphans there and is not atomic across filesystems.
    """

    def __init__(self) -> None:
        super().__init__()
        self._writes = 0

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}{TEMP_MARK}{os.getpid()}")
        self._writes += 1
        kill_at = os.environ.get(FAULT_ENV)
        try:
            with open(tmp, "wb") as f:
                if kill_at and int(kill_at) == self._writes:
                    import io

                    buf = io.BytesIO()
                    torch.save(checkpoint, buf)
                    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                    os.kill(os.getpid(), signal.SIGKILL)
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temporary checkpoint files a killed run left in ``folder``; returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [f for f in folder.iterdir() if TEMP_MARK in f.name and f.is_file()]
    for f in stale:
        f.unlink(missing_ok=True)
    return stale


def _csv_metrics_file(trainer) -> Path | None:
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            return Path(logger.experiment.metrics_file_path)
    return None


def _count_rows(path: Path | None) -> int | None:
    if path is None:
        return None
    if not path.is_file():
        return 0
    import csv

    with path.open(newline="") as f:
        return max(0, sum(1 for _ in csv.reader(f)) - 1)


def _truncate_rows(path: Path, rows: int, step: int | None) -> None:
    """Drop the rows a killed run logged after its checkpoint: keep the first ``rows`` rows (on disk when the
    checkpoint was written) and the later rows of steps before ``step`` (the checkpoint's global step: metrics of
    the checkpointed step are logged just after the write); the resumed run logs ``step`` onwards again."""
    import csv

    with path.open(newline="") as f:
        table = list(csv.reader(f))
    if not table:
        return
    col = table[0].index("step") if "step" in table[0] else None

    def keep(i: int, row: list[str]) -> bool:
        if i < rows:
            return True
        try:
            return step is not None and col is not None and int(float(row[col])) < step
        except (ValueError, IndexError):
            return False

    kept = [table[0]] + [row for i, row in enumerate(table[1:]) if keep(i, row)]
    if len(kept) == len(table):
        return
    table = kept
    rows = len(table) - 1
    tmp = path.with_name(path.name + TEMP_MARK + str(os.getpid()))
    with tmp.open("w", newline="") as f:
        csv.writer(f).writerows(table[: rows + 1])
    os.replace(tmp, path)


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that keeps ``last.ckpt`` resumable at all times.

    * ``last.ckpt`` is written at the end of every epoch (Lightning writes it only when a top-k checkpoint is
      saved, so ``save_top_k: 0`` left nothing until the end of training), and every ``every_n_train_steps``
      optimiser steps for long epochs.
    * Files are written next to the target and renamed (:class:`AtomicCheckpointIO`); temporary files left by a
      killed run are removed when the next run starts in the same folder.
    * The loggers are flushed before each write and the CSV row count is stored, so a resumed run drops the rows
      the killed run logged after its checkpoint and ``metrics.csv`` covers the whole run once.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last_saves = 0
        self._metrics_rows: int | None = None
        self._resume_rows: int | None = None
        self._metrics_step: int | None = None
        self._resume_step: int | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        try:
            io = trainer.strategy.checkpoint_io
        except (AttributeError, NotImplementedError):
            io = None
        if type(io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if stage == "fit" and trainer.is_global_zero and self.dirpath:
            for f in remove_stale_temp_files(self.dirpath):
                print(f"visadapt: removed {f}, a partial checkpoint left by a killed run")

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        for logger in trainer.loggers:
            logger.save()  # the metrics up to this checkpoint reach the disk before it does
        self._metrics_rows = _count_rows(_csv_metrics_file(trainer))
        self._metrics_step = trainer.global_step
        super()._save_checkpoint(trainer, filepath)

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_saves += 1

    def _save_last_at_epoch_end(self, trainer, saves_before: int) -> None:
        if (not self.save_last or self._last_saves != saves_before or trainer.sanity_checking or trainer.fast_dev_run
                or trainer.state.fn != "fit"):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        before = self._last_saves
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_at_epoch_end(trainer, before)

    def on_validation_end(self, trainer, pl_module) -> None:
        before = self._last_saves
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_at_epoch_end(trainer, before)

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        path = _csv_metrics_file(trainer)
        if self._resume_rows is not None and path is not None and path.is_file() and trainer.is_global_zero:
            _truncate_rows(path, self._resume_rows, self._resume_step)
        self._resume_rows = None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "metrics_rows": self._metrics_rows, "metrics_step": self._metrics_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._resume_rows = state_dict.get("metrics_rows")
        self._resume_step = state_dict.get("metrics_step")


_VERSION_DIR = re.compile(r"^version_(\d+)$")


def _flag_given(argv: list[str], key: str) -> bool:
    """Whether ``--key`` (or ``--key=...``) is on the command line."""
    return any(a == f"--{key}" or a.startswith(f"--{key}=") for a in argv)


def _adapter_config_classes() -> dict[str, type]:
    out: dict[str, type] = {}
    todo = list(AdapterConfig.__subclasses__())
    while todo:
        cls = todo.pop()
        out[cls.__name__] = cls
        todo += cls.__subclasses__()
    return out


def _check_adapter_class_names(argv: list[str]) -> None:
    """An unknown adapter ``class_path`` fails with the registered config classes (jsonargparse's own message only
    says that the value does not validate)."""
    import importlib

    import yaml

    values = []
    for i, a in enumerate(argv):
        for key in ("--model.init_args.adapter.class_path", "--model.adapter.class_path", "--model.init_args.adapter",
                    "--model.adapter"):
            if a.startswith(key + "="):
                values.append(a.split("=", 1)[1])
            elif a == key and i + 1 < len(argv):
                values.append(argv[i + 1])
        if a in ("-c", "--config") and i + 1 < len(argv) and Path(argv[i + 1]).is_file():
            try:
                cfg = yaml.safe_load(Path(argv[i + 1]).read_text()) or {}
                adapter = ((cfg.get("model") or {}).get("init_args") or {}).get("adapter")
            except (yaml.YAMLError, AttributeError):
                continue
            values.append(adapter.get("class_path") if isinstance(adapter, dict) else adapter)
    known = _adapter_config_classes()
    for value in list(values):
        if isinstance(value, str) and value.endswith((".yaml", ".yml")) and Path(value).is_file():
            try:  # an adapter fragment file: check the class it names
                frag = yaml.safe_load(Path(value).read_text()) or {}
            except yaml.YAMLError:
                continue  # jsonargparse reports the YAML error with the file name
            values.append(frag.get("class_path") if isinstance(frag, dict) else None)
    for value in values:
        if isinstance(value, str) and value.endswith((".yaml", ".yml")) and Path(value).is_file():
            continue
        if not isinstance(value, str) or value.strip().startswith(("{", "null")) or value in known:
            continue
        module, _, name = value.rpartition(".")
        try:
            ok = bool(module) and isinstance(cls := getattr(importlib.import_module(module), name, None), type) \
                and issubclass(cls, AdapterConfig)
        except ImportError:
            ok = False
        if not ok:
            raise UserError(f"unknown adapter config {value!r}; registered: {', '.join(sorted(known))} "
                            f"(python -m visadapt list adapters)")


class VisAdaptCLI(LightningCLI):
    """LightningCLI with visadapt's defaults.

    * ``checkpoint`` (:class:`RunCheckpoint`): ``last.ckpt`` at every epoch end and every 200 optimiser steps,
      written atomically.
    * ``--ckpt_path`` resumes from the weights, optimiser, loop and random states of a checkpoint, but never reads
      model arguments back from it (Lightning does; that path instantiates whatever ``class_path`` a checkpoint
      names): the run's arguments come from the config (``runs/<task>/version_N/config.yaml`` holds it). A
      checkpoint inside ``<save_dir>/<name>/version_N/checkpoints/`` continues that run folder.
    * The datamodule's preprocessing is linked from the model's backbone.
    """

    def __init__(self, *args: Any, argv: list[str] | None = None, **kwargs: Any) -> None:
        self._argv = list(argv or [])
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0,
                             "checkpoint.every_n_train_steps": 200, "checkpoint.enable_version_counter": False,
                             "checkpoint.filename": "epoch{epoch:03d}-step{step:06d}",
                             "checkpoint.auto_insert_metric_name": False})
        parser.link_arguments("model", "data.init_args.preprocess", compute_fn=lambda m: m.preprocess,
                              apply_on="instantiate")

    def parse_arguments(self, parser, args) -> None:
        _check_adapter_class_names(self._argv)
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Never read model arguments back from a checkpoint (a checkpoint must not decide what gets built)."""

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        if cfg is None:
            return
        self._reset_foreign_dataset_kwargs(cfg)
        ckpt = cfg.get("ckpt_path")
        if ckpt and ckpt not in ("last", "best", "hpc", "registry"):
            read_checkpoint(ckpt)  # a missing, truncated or unsafe file fails here, naming it
            if self.subcommand == "fit":
                self._continue_run_folder(cfg, Path(ckpt))

    def _reset_foreign_dataset_kwargs(self, cfg) -> None:
        """``--data.init_args.dataset=X`` on the command line drops the config file's ``dataset_kwargs`` that X
        does not accept (they belonged to the config's dataset, e.g. Fashion-MNIST's ``invert``), with a note."""
        data = cfg.get("data")
        args = data.get("init_args") if data is not None and hasattr(data, "get") else None
        if args is None or not hasattr(args, "get") or not args.get("dataset_kwargs"):
            return
        if not (_flag_given(self._argv, "data.init_args.dataset") or _flag_given(self._argv, "data.dataset")):
            return
        if _flag_given(self._argv, "data.init_args.dataset_kwargs") or _flag_given(self._argv, "data.dataset_kwargs"):
            return
        from visadapt.data._registry import DATASETS, dataset_arguments

        if args.get("dataset") not in DATASETS:
            return
        accepted = dataset_arguments(args["dataset"])
        kwargs = dict(args["dataset_kwargs"])
        foreign = sorted(k for k in kwargs if accepted is not None and k not in accepted)
        if foreign:
            print(f"visadapt: dataset {args['dataset']!r} set on the command line: dropping the config's "
                  f"dataset_kwargs {foreign} (not arguments of {args['dataset']!r})", file=sys.stderr)
            args["dataset_kwargs"] = {k: v for k, v in kwargs.items() if k not in foreign}

    def _continue_run_folder(self, cfg, ckpt: Path) -> None:
        """Point the logger at the run folder that holds ``ckpt`` so the resumed run continues its files."""
        logger = cfg.get("trainer", {}).get("logger")
        if logger is None or isinstance(logger, (bool, list)) or not hasattr(logger, "get"):
            return
        init = logger.get("init_args")
        if init is None or init.get("version") is not None or init.get("save_dir") is None:
            return
        run_dir = ckpt.resolve().parent.parent
        match = _VERSION_DIR.match(run_dir.name)
        if ckpt.resolve().parent.name != "checkpoints" or not match:
            return
        if run_dir.parent != (Path(init["save_dir"]) / str(init.get("name") or "lightning_logs")).resolve():
            return
        init["version"] = int(match.group(1))
        print(f"visadapt: resuming into {run_dir}", file=sys.stderr)
        metrics = run_dir / "metrics.csv"
        self._kept_metrics = (metrics, metrics.read_bytes()) if metrics.is_file() else None

    def before_fit(self) -> None:
        """Lightning's CSV writer deletes the ``metrics.csv`` of the folder it opens; a resumed run puts back the
        rows of the run it continues (:class:`RunCheckpoint` drops those logged after the checkpoint)."""
        kept = getattr(self, "_kept_metrics", None)
        if kept is None:
            return
        path, text = kept
        header = text.decode().splitlines()[0].split(",") if text.strip() else []
        for logger in self.trainer.loggers:
            if isinstance(logger, CSVLogger):
                writer = logger.experiment  # the writer exists (and has deleted the file) from here on
                if Path(writer.metrics_file_path).resolve() == path.resolve():
                    path.write_bytes(text)
                    writer.metrics_keys = sorted(set(writer.metrics_keys) | set(header))


def _list(argv: list[str]) -> int:
    from visadapt.adapters import ADAPTERS, INITIALISERS, OPTIMISERS, REGULARISERS, SCHEDULES
    from visadapt.backbones import BACKBONES
    from visadapt.data import DATASETS
    from visadapt.methods import companions  # noqa: F401  (registers the training-time companions)

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
        from visadapt.resources import shipped_dir, shown, task_files  # the checkout's tasks/ or the wheel's copy

        print(f"tasks (in {shown(shipped_dir('tasks'))}/):")
        for f in task_files():
            comments = [ln[1:].strip() for ln in f.read_text().splitlines() if ln.startswith("#")]
            # each task names its own command in its header (fit, fscil, ...): show that one, not a guess
            run = next((c[c.index("python -m visadapt"):] for c in comments if "python -m visadapt" in c), "")
            print(f"  {f.stem:28s} {comments[0] if comments else ''}")
            if run:  # the header says tasks/<name>.yaml: point at the file actually found (a wheel ships its copy)
                run = run.split("  ")[0].replace(f"tasks/{f.name}", shown(f))
                print(f"  {'':28s} run: {run}")
    return 0


@quiet_eval_mode_notice()  # a scoped filter: importing visadapt installs none
def cli_main(args: ArgsType = None) -> VisAdaptCLI | int | dict | None:
    """Entry point of ``python -m visadapt``; ``args`` replaces ``sys.argv[1:]`` (for tests and notebooks)."""
    argv = list(sys.argv[1:] if args is None else args)
    if args is None:  # the command line: a user error prints one line (VISADAPT_DEBUG=1 for the traceback)
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        with report_user_errors(PROG, extra_types=(MisconfigurationException,)):
            return _dispatch(argv, None)
    return _dispatch(argv, argv)


def _dispatch(argv: list[str], args: ArgsType) -> VisAdaptCLI | int | dict | None:
    if argv and argv[0] == "list":
        return _list(argv[1:])
    if argv and argv[0] == "fscil":
        from visadapt.protocols.fscil import fscil_main

        return fscil_main(argv[1:])
    if argv and argv[0] == "track":
        from visadapt.protocols.tracking import track_main

        return track_main(argv[1:])
    if argv and argv[0] == "sweep":
        from visadapt.protocols.sweep import sweep_main

        return sweep_main(argv[1:], runner=cli_main)  # the sweep gets its runner (it never imports the CLI)
    if argv and argv[0] == "generate":
        from visadapt.protocols.t2i import generate_main

        return generate_main(argv[1:])
    if argv and argv[0] == "t2i_sweep":
        from visadapt.protocols.t2i import t2i_sweep_main

        return t2i_sweep_main(argv[1:], runner=cli_main)  # fit through the CLI when --fit is given
    return _fit_cli(argv, args)


def _fit_cli(argv: list[str], args: ArgsType) -> VisAdaptCLI:
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
        args=args,
        argv=argv,
    )


def _formatter():
    from jsonargparse import DefaultHelpFormatter

    class Formatter(DefaultHelpFormatter):
        """Keeps the epilog's line breaks."""

        def _fill_text(self, text, width, indent):
            return "".join(indent + line for line in text.splitlines(keepends=True))

    return Formatter


__all__ = ["VisAdaptCLI", "cli_main"]
