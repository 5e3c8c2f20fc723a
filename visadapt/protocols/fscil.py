"""The few-shot class-incremental (FSCIL) session protocol: ``python -m visadapt fscil -c tasks/fscil_coact.yaml``.

For every method in ``methods`` (LightningModules from :data:`visadapt.methods.fscil.FSCIL_METHODS`), the runner
goes through the base session and each incremental session. A session is the method's ``start_session`` (class-mean
rows, which parameters train), one ``Trainer.fit`` over the session's images (built from the ``trainer`` section,
so ``--trainer configs/trainer/gpu.yaml`` / ``ddp.yaml`` / ``ddp_cpu.yaml`` apply), and an evaluation on the test
images of *all classes seen so far*, with the classes not seen yet masked out of the prediction. Per session it
reports overall, base-class and novel-class accuracy and their harmonic mean; per run the average accuracy, the
performance drop (first minus last) and the base-class forgetting (see :mod:`visadapt.metrics.fscil`).

Output, under ``out_dir`` or ``runs_root/<task>/version_N/``::

    config.yaml            the resolved configuration
    split.json             the session split (dataset, seed, classes and image indices of every session)
    <method>/session_K.safetensors   what the method changed in session K (adapter, classifier, unfrozen
                                     encoder weights, EMA teacher)
    <method>/session_K.json          that session's metrics and training log (written last: the commit mark)
    <method>/checkpoints/session_K/last.ckpt   Lightning's checkpoint of the session in progress (every epoch)
    <method>/logs/session_K/metrics.csv        Lightning's CSV log of the session's training steps
    results.json / results.csv / results.md   per-session tables per method and the comparison
    sessions.png           accuracy per session (overall, base, novel) for every method
    report.json / report.md / accuracy.png   the run summary through visadapt.report
    log.txt                the progress messages

**Resuming.** A session's JSON file is written last (atomically), so it marks the session as finished. Rerunning
the same command (``resume: true``, the default) continues the newest unfinished run with the same configuration:
each method is rebuilt, the saved states of its finished sessions are loaded in order, and training continues with
the next session; a session interrupted during training continues from its ``last.ckpt`` (end of the last finished
epoch). Every session and every epoch are seeded from ``(seed, session[, epoch])`` alone, so a resumed CPU run gives
bit-identical results to an uninterrupted one. A corrupt session file is recomputed (with a one-line message naming
it); a corrupt ``run.json`` is an error naming it.

**Several processes (DDP).** Every process runs the protocol; training is data-parallel through Lightning's
strategy, and each process computes the class means and the evaluation on the whole set (the same numbers on every
rank); only rank 0 writes files.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only

from visadapt.data.base import BadImageError
from visadapt.data.sessions import SessionDataModule, SessionSplit, build_session_split, derive_seed
from visadapt.data.transforms import build_transform
from visadapt.methods.fscil import FSCIL_METHODS, FSCILModel, FSCILModule, SessionInfo
from visadapt.metrics.fscil import (
    comparison_table_markdown,
    masked_predictions,
    session_accuracy,
    session_table_markdown,
    summarize_sessions,
)

PROG = "python -m visadapt fscil"
NOT_HASHED = ("config", "out_dir", "runs_root", "resume", "show_progress", "num_threads")
"""Settings that do not change results and therefore do not prevent resuming a run."""
TRAINER_NOT_CONFIGURABLE = {"logger", "callbacks", "max_epochs", "min_epochs", "max_steps", "min_steps",
                            "default_root_dir"}
"""Trainer arguments the runner sets per session (not in the ``trainer`` section)."""
TRAINER_SET_BY_RUNNER = TRAINER_NOT_CONFIGURABLE | {"enable_checkpointing", "enable_progress_bar",
                                                    "enable_model_summary", "num_sanity_val_steps"}
"""Trainer arguments the runner overrides (a shared fragment such as ``debug_cpu.yaml`` may still set them)."""

log = logging.getLogger(__name__)


@dataclass
class SessionDataConfig:
    """The dataset, its session split and the image transforms."""

    dataset: str = "fashion_mnist"
    """Registered dataset name (``python -m visadapt list datasets``): fashion_mnist, cifar100, mini_imagenet,
    cub200, ..."""
    root: str | None = None
    """Dataset folder (``None``: the dataset's default)."""
    dataset_kwargs: dict[str, Any] | None = None
    """Extra keyword arguments of the dataset builder."""
    base_classes: int | None = None
    """Classes in the base session (``None``: the dataset's registered FSCIL setting)."""
    way: int | None = None
    """New classes per incremental session (``None``: registered setting)."""
    shot: int | None = None
    """Training images per new class (``None``: registered setting)."""
    sessions: int | None = None
    """Number of incremental sessions (``None``: registered setting, or as many as the classes allow)."""
    base_shot: int | None = None
    """Training images per base class (``None``: all of them, the standard FSCIL base session)."""
    test_per_class: int | None = None
    """Evaluate on at most this many test images per class, drawn with the seed (``None``: all)."""
    class_order: Literal["natural", "shuffled"] = "natural"
    """Order in which classes enter: label order (CEC/CoACT) or a seeded permutation."""
    index_dir: str | None = None
    """Folder with CEC's ``session_1.txt`` ... index files (a relative path is looked up under ``root`` first);
    when given, the split is read from them. CEC's benchmarks (cifar100, mini_imagenet, cub200) need them unless
    ``split_rule`` is ``generated``."""
    split_rule: Literal["auto", "generated"] = "auto"
    """``auto``: index files when ``index_dir`` is given, else the generated rule (an error for CEC's benchmarks);
    ``generated``: the documented rule (CEC's class blocks, seeded shots), an explicit opt-in for CEC's benchmarks."""
    split_file: str | None = None
    """A split JSON written by an earlier run (``split.json``); when given, it is used as is."""
    image_size: int | None = None
    """Input resolution (``None``: the encoder's)."""
    augment: Literal["coact", "coop", "light", "none"] = "coact"
    """Training augmentation (:func:`visadapt.data.transforms.build_transform`): ``coact`` (RandomResizedCrop,
    flip, colour jitter p=0.8, greyscale p=0.2 — the CoACT recipe), ``light`` (RandomResizedCrop scale 0.5-1 and
    flip, for small greyscale images), ``coop`` or ``none``."""
    on_bad_image: Literal["raise", "skip"] = "raise"
    """An unreadable image stops the run naming the file (``raise``), or is left out of the training sessions and
    the evaluation (``skip``; counted in the report with the first paths)."""


def _write_atomic(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item) and getattr(x, "ndim", 1) == 0:
        return x.item()
    return x


class _TqdmHandler(logging.Handler):
    """Log records through ``tqdm.write``, so that progress bars and messages never interleave."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record))
        except Exception:  # noqa: BLE001  (logging must never raise)
            self.handleError(record)


# ---------------------------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------------------------
class FSCILRunner:
    """Runs the session protocol for several methods on one split, with per-session checkpoints and resuming.

    Args:
        task: Run name (output folder ``runs_root/<task>/version_N``).
        data: Dataset, split and transforms.
        model: The pretrained encoder, adapter and classifier form every method starts from.
        methods: Method name -> configured (not yet built) FSCIL module, run in this order.
        trainer: Keyword arguments of each session's ``Trainer`` (accelerator, devices, strategy, precision, ...).
        seed: Seed of the split, of every method's initialisation and of every session and epoch.
        out_dir: Write here instead of a versioned folder.
        runs_root: Root of the versioned output folders.
        resume: Continue the newest unfinished run with the same configuration instead of starting a new one.
        show_progress: Progress bars and per-epoch messages on the console.
        config: The resolved configuration (written to ``config.yaml``; its hash identifies the run).
        callbacks: Extra Lightning callbacks of every session's Trainer.
    """

    def __init__(self, task: str, data: SessionDataConfig, model: FSCILModel, methods: dict[str, FSCILModule],
                 trainer: dict[str, Any] | None = None, seed: int = 0, out_dir: str | None = None,
                 runs_root: str = "runs/fscil", resume: bool = True, show_progress: bool = True,
                 config: dict[str, Any] | None = None, callbacks: list[Callback] | None = None) -> None:
        if not methods:
            raise ValueError("no method to run")
        self.task, self.data, self.model, self.methods = task, data, model, methods
        self.trainer_kwargs = {k: v for k, v in (trainer or {}).items() if k not in TRAINER_SET_BY_RUNNER}
        self.seed, self.resume, self.show_progress = seed, resume, show_progress
        self.config = config if config is not None else {"task": task, "seed": seed, "data": repr(data),
                                                          "model": repr(model), "methods": list(methods),
                                                          "trainer": repr(self.trainer_kwargs)}
        self.callbacks = list(callbacks or [])
        self.rank = int(rank_zero_only.rank or 0)
        self.fingerprint = self._fingerprint()
        self.out = Path(out_dir) if out_dir else self._version_dir(Path(runs_root) / task)
        self.skipped: dict[str, str] = {}

    # -- bookkeeping ----------------------------------------------------------------------------------------
    def _fingerprint(self) -> str:
        spec = {k: v for k, v in self.config.items() if k not in NOT_HASHED}
        return hashlib.sha256(json.dumps(_jsonable(spec), sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _version_dir(self, root: Path) -> Path:
        versions = sorted((int(p.name.split("_", 1)[1]), p) for p in root.glob("version_*")
                          if p.is_dir() and p.name.split("_", 1)[1].isdigit())
        if self.resume and versions:
            for _, path in reversed(versions):
                state = self._read_run_json(path)
                if state and state.get("fingerprint") == self.fingerprint and state.get("status") != "complete":
                    return path
        return root / f"version_{versions[-1][0] + 1 if versions else 0}"

    @staticmethod
    def _read_run_json(path: Path) -> dict | None:
        file = path / "run.json"
        if not file.is_file():
            return None
        try:
            state = json.loads(file.read_text())
            if not isinstance(state, dict):
                raise TypeError("not a JSON object")
            return state
        except (ValueError, TypeError, OSError) as e:
            raise RuntimeError(f"{file} is corrupt ({e}); delete it (the run's finished sessions stay) and rerun, "
                               "or choose another out_dir") from None

    def _write_run_json(self, status: str, **extra: Any) -> None:
        if self.rank == 0:
            info = {"task": self.task, "fingerprint": self.fingerprint, "status": status, **extra}
            _write_atomic(self.out / "run.json", json.dumps(info, indent=1))

    # -- data -----------------------------------------------------------------------------------------------
    def _datasets(self) -> tuple[Any, Any]:
        import visadapt.data  # noqa: F401  (registers every dataset)
        from visadapt.data import create_dataset

        kwargs = dict(self.data.dataset_kwargs or {})
        if self.data.root is not None:
            kwargs["root"] = self.data.root
        if self.data.on_bad_image != "raise":
            kwargs["on_bad_image"] = self.data.on_bad_image
        return create_dataset(self.data.dataset, split="train", **kwargs), \
            create_dataset(self.data.dataset, split="test", **kwargs)

    def _index_dir(self) -> str | None:
        d = self.data.index_dir
        if d is None or Path(d).is_absolute() or self.data.root is None:
            return d
        under_root = Path(self.data.root) / d
        return str(under_root) if under_root.is_dir() or not Path(d).is_dir() else d

    def _split(self, train: Any, test: Any) -> SessionSplit:
        path = self.out / "split.json"
        if path.is_file():  # a resumed run keeps the split it started with
            return SessionSplit.load(path)
        if self.data.split_file:
            split = SessionSplit.load(self.data.split_file)
        else:
            d = self.data
            split = build_session_split(d.dataset, train, self.seed, base_classes=d.base_classes, way=d.way,
                                        shot=d.shot, sessions=d.sessions, base_shot=d.base_shot,
                                        test_labels=test.labels, test_per_class=d.test_per_class,
                                        class_order=d.class_order, index_dir=self._index_dir(),
                                        split_rule=d.split_rule)
        if self.rank == 0:
            split.save(path)
        return split

    def _load(self, ds: Any, i: int) -> Any | None:
        """Image ``i`` of ``ds``, or ``None`` when it is unreadable and ``on_bad_image`` is ``skip``."""
        try:
            return ds.load(i)
        except BadImageError as e:
            if self.data.on_bad_image != "skip":
                raise
            key = str(ds.describe(i))
            if key not in self.skipped:
                self.skipped[key] = str(e)
                log.warning(f"fscil: skipping unreadable image {key} ({e})")
            return None

    def _unreadable_train(self, train: Any, split: SessionSplit) -> set[int]:
        """Training indices that cannot be read (only checked under ``on_bad_image: skip``)."""
        if self.data.on_bad_image != "skip":
            return set()
        return {i for idx in split.train for i in idx if self._load(train, i) is None}

    # -- evaluation -----------------------------------------------------------------------------------------
    def _evaluate(self, method: FSCILModule, split: SessionSplit, session: int, test: Any, eval_tf: Callable,
                  test_by_class: dict[int, list[int]], cache: dict[int, tuple[int, torch.Tensor]]) -> dict[str, Any]:
        seen = split.seen_classes(session)
        feats, labels = [], []
        for c in range(seen):
            hit = cache.get(c)
            if hit is None or hit[0] != method.encoder_version:
                images = [im for i in test_by_class[c] if (im := self._load(test, i)) is not None]
                chunks = [method.encode(torch.stack([eval_tf(im) for im in images[s:s + method.eval_batch_size]]))
                          .cpu() for s in range(0, len(images), method.eval_batch_size)]
                hit = (method.encoder_version, torch.cat(chunks) if chunks else torch.zeros(0))
                cache[c] = hit
            if len(hit[1]):  # a class without (readable) test images adds nothing
                feats.append(hit[1])
                labels += [c] * len(hit[1])
        logits = method.classify(torch.cat(feats)).cpu()
        preds = masked_predictions(logits, seen)
        res = session_accuracy(preds, torch.tensor(labels), split.num_base_classes)
        return {"session": session, "num_classes": seen, **res}

    # -- one method -----------------------------------------------------------------------------------------
    def _finished_sessions(self, mdir: Path, num_sessions: int) -> list[tuple[dict[str, torch.Tensor], dict]]:
        """States and records of the finished sessions, in order; a corrupt one ends the list (it is redone)."""
        from safetensors.torch import load_file

        out = []
        for k in range(num_sessions):
            js, st = mdir / f"session_{k}.json", mdir / f"session_{k}.safetensors"
            if not js.is_file():
                break
            bad = None
            try:
                record = json.loads(js.read_text())
                if not isinstance(record, dict) or "metrics" not in record:
                    raise ValueError("no metrics in it")
            except (ValueError, OSError) as e:
                bad = (js, e)
            else:
                try:
                    state = load_file(str(st))
                except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
                    bad = (st, e)
            if bad is not None:
                log.warning(f"fscil: {bad[0]} is corrupt ({type(bad[1]).__name__}: {bad[1]}); recomputing session "
                            f"{k} and the sessions after it")
                break
            out.append((state, record))
        return out

    def _trainer(self, mdir: Path, session: int, epochs: int) -> Trainer:
        kwargs = dict(self.trainer_kwargs)
        kwargs.setdefault("log_every_n_steps", 1)
        checkpoint = ModelCheckpoint(dirpath=mdir / "checkpoints" / f"session_{session}", filename="last",
                                     save_top_k=1, monitor=None, save_on_train_epoch_end=True,
                                     enable_version_counter=False)
        return Trainer(**kwargs, max_epochs=epochs, default_root_dir=str(mdir),
                       logger=CSVLogger(save_dir=str(mdir), name="logs", version=f"session_{session}"),
                       callbacks=[checkpoint, *self.callbacks], enable_progress_bar=self.show_progress,
                       enable_model_summary=False, num_sanity_val_steps=0)

    def _resume_checkpoint(self, mdir: Path, session: int) -> str | None:
        path = mdir / "checkpoints" / f"session_{session}" / "last.ckpt"
        if not path.is_file():
            return None
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  (a truncated file raises several kinds of errors)
            log.warning(f"fscil: {path} is unreadable ({type(e).__name__}); session {session} restarts from its "
                        "beginning")
            if self.rank == 0:
                path.unlink()
            return None
        return str(path)

    def _run_method(self, name: str, method: FSCILModule, split: SessionSplit, train: Any, test: Any,
                    after_session: Callable[[str, int], None] | None) -> list[dict[str, Any]]:
        from safetensors.torch import save_file

        mdir = self.out / name
        mdir.mkdir(parents=True, exist_ok=True)
        seed_everything(derive_seed(self.seed, "setup", name), verbose=False)
        method.build(self.model, split.num_classes)
        pre = method.preprocess if self.data.image_size is None else replace(method.preprocess,
                                                                             image_size=self.data.image_size)
        train_tf = build_transform(pre, train=True, augment=self.data.augment)
        eval_tf = build_transform(pre, train=False)
        bad_train = self._unreadable_train(train, split)
        dm = SessionDataModule(train, split, train_tf, eval_tf, seed=self.seed, batch_size=method.batch_size,
                               eval_batch_size=method.eval_batch_size, num_views=method.num_views,
                               exclude=bad_train)
        label_map = split.label_map()
        test_by_class: dict[int, list[int]] = {c: [] for c in range(split.num_classes)}
        for i in split.test_indices(test.labels, split.num_sessions - 1):
            test_by_class[label_map[int(test.labels[i])]].append(i)
        cache: dict[int, tuple[int, torch.Tensor]] = {}

        finished = self._finished_sessions(mdir, split.num_sessions)
        results: list[dict[str, Any]] = []
        for k, (state, record) in enumerate(finished):  # resume: replay the saved states in order
            method.load_session_state(k, state)
            results.append(record["metrics"])
        if finished:
            log.info(f"{name}: resuming after session {len(finished) - 1} (states loaded from {mdir})")

        for k in range(len(finished), split.num_sessions):
            start = time.perf_counter()
            seed_everything(derive_seed(self.seed, "session", k), verbose=False)
            dm.set_session(k)
            new = [label_map[c] for c in split.session_classes[k]]
            info = SessionInfo(session=k, new_classes=new, seen_classes=split.seen_classes(k),
                               base_classes=split.num_base_classes, seed=self.seed)
            epochs = method.session_epochs(k)
            trainer = self._trainer(mdir, k, max(epochs, 1))
            device = trainer.strategy.root_device
            method.to(device)
            method.start_session(info, dm.prototype_dataloader())
            world = 1
            if epochs > 0:
                ckpt = self._resume_checkpoint(mdir, k)
                if ckpt:
                    log.info(f"{name}: session {k} continues from {ckpt}")
                trainer.fit(method, datamodule=dm, ckpt_path=ckpt, weights_only=True)
                world = trainer.world_size
                method.to(device)
            method.finish_session()
            method.end_session(k)
            train_s = time.perf_counter() - start
            metrics = self._evaluate(method, split, k, test, eval_tf, test_by_class, cache)
            metrics["train_seconds"] = round(train_s, 3)
            metrics["eval_seconds"] = round(time.perf_counter() - start - train_s, 3)
            if self.rank == 0:
                state = method.session_state()
                save_file(state, str(mdir / f"session_{k}.safetensors.tmp"))
                os.replace(mdir / f"session_{k}.safetensors.tmp", mdir / f"session_{k}.safetensors")
                record = {"method": name, "session": k, "metrics": metrics, "world_size": world,
                          "train_log": _jsonable(method.train_log), "saved_tensors": sorted(state)}
                _write_atomic(mdir / f"session_{k}.json", json.dumps(record, indent=1))
                shutil.rmtree(mdir / "checkpoints" / f"session_{k}", ignore_errors=True)
                if (mdir / "checkpoints").is_dir() and not any((mdir / "checkpoints").iterdir()):
                    (mdir / "checkpoints").rmdir()
            results.append(metrics)
            hm = "-" if metrics["hm"] is None else f"{100 * metrics['hm']:.2f}"
            novel = "-" if metrics["novel_acc"] is None else f"{100 * metrics['novel_acc']:.2f}"
            log.info(f"{name} session {k}: {metrics['num_classes']} classes, acc {100 * metrics['acc']:.2f}, base "
                     f"{100 * metrics['base_acc']:.2f}, novel {novel}, HM {hm} ({metrics['train_seconds']:.1f} s "
                     f"train, {metrics['eval_seconds']:.1f} s eval)")
            if after_session is not None:
                after_session(name, k)
        return results

    # -- everything -----------------------------------------------------------------------------------------
    def _attach_logging(self) -> list[tuple[logging.Logger, logging.Handler]]:
        attached = []
        pkg = logging.getLogger("visadapt")
        pkg.setLevel(logging.INFO)
        fmt = logging.Formatter("%(message)s")
        if self.rank == 0:
            handlers: list[logging.Handler] = [logging.FileHandler(self.out / "log.txt")]
            if self.show_progress:
                handlers.append(_TqdmHandler())
            for h in handlers:
                h.setFormatter(fmt)
                pkg.addHandler(h)
                attached.append((pkg, h))
        return attached

    def run(self, after_session: Callable[[str, int], None] | None = None) -> dict[str, Any]:
        """Run (or resume) every method; write and return the results.

        ``after_session(method_name, session)`` is called after each finished session (tests use it to simulate
        an interruption).
        """
        self.out.mkdir(parents=True, exist_ok=True)
        previous = self._read_run_json(self.out)
        if previous and previous.get("fingerprint") != self.fingerprint:
            raise RuntimeError(f"{self.out} holds a run with a different configuration (fingerprint "
                               f"{previous.get('fingerprint')} != {self.fingerprint}); choose another out_dir")
        if self.rank == 0:
            _write_atomic(self.out / "config.yaml", yaml.safe_dump(_jsonable(self.config), sort_keys=False))
        self._write_run_json("running")
        start = time.perf_counter()
        attached = self._attach_logging()
        quiet = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
        levels = [q.level for q in quiet]
        for q in quiet:  # Lightning's per-Trainer notices (GPU available, ...) would repeat for every session
            q.setLevel(logging.WARNING)
        try:
            with warnings.catch_warnings():
                # AdapterModule.train keeps the frozen encoder in eval mode on purpose: Lightning's notice, once
                # per session, would bury the progress messages
                warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
                report = self._run_all(after_session, start)
        finally:
            for q, level in zip(quiet, levels):
                q.setLevel(level)
            for logger, handler in attached:
                logger.removeHandler(handler)
                handler.close()
        return report

    def _run_all(self, after_session: Callable[[str, int], None] | None, start: float) -> dict[str, Any]:
        """Read the data, split it, run every method, write the reports."""
        train, test = self._datasets()
        for ds in (train, test):  # files a reader already left out under on_bad_image: skip
            for entry in getattr(ds, "skipped", []):
                self.skipped.setdefault(str(entry).split(": ", 1)[0], str(entry))
        split = self._split(train, test)
        log.info(f"fscil: {split.describe()}; output in {self.out}")
        results: dict[str, list[dict[str, Any]]] = {}
        for name, method in self.methods.items():
            results[name] = self._run_method(name, method, split, train, test, after_session)
        report = self._write_reports(results, split, time.perf_counter() - start)
        self._write_run_json("complete", seconds=round(time.perf_counter() - start, 1))
        return report

    def _write_reports(self, results: dict[str, list[dict[str, Any]]], split: SessionSplit,
                       seconds: float) -> dict[str, Any]:
        summaries = {n: summarize_sessions(r) for n, r in results.items()}
        tables = {n: session_table_markdown(r, title=n) for n, r in results.items()}
        comparison = comparison_table_markdown(results)
        skipped = {"count": len(self.skipped), "first": list(self.skipped)[:5]}
        report = {"task": self.task, "out_dir": str(self.out), "seed": self.seed, "split": split.describe(),
                  "methods": {n: {"sessions": results[n], "summary": summaries[n]} for n in results},
                  "tables": tables, "comparison": comparison, "skipped_images": skipped,
                  "plot": str(self.out / "sessions.png"), "seconds": round(seconds, 1)}
        if self.skipped:
            log.warning(f"fscil: {len(self.skipped)} unreadable image(s) left out, e.g. {skipped['first']}")
        if self.rank != 0:
            return report
        md = [f"# FSCIL: {self.task}", "", f"{split.describe()}", ""]
        for t in tables.values():
            md += [t, ""]
        md += ["### comparison (%)", "", comparison, ""]
        if self.skipped:
            md += [f"Unreadable images left out: {len(self.skipped)} (first: {', '.join(skipped['first'])})", ""]
        _write_atomic(self.out / "results.md", "\n".join(md))
        with open(self.out / "results.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["method", "session", "num_classes", "acc", "base_acc", "novel_acc", "hm", "n", "n_base",
                        "n_novel"])
            for n, rows in results.items():
                for r in rows:
                    w.writerow([n, r["session"], r["num_classes"], r["acc"], r["base_acc"], r["novel_acc"], r["hm"],
                                r["n"], r["n_base"], r["n_novel"]])
        self._plot(results)
        _write_atomic(self.out / "results.json", json.dumps(_jsonable(report), indent=1))
        from visadapt.report import write_report

        pct = (lambda x: None if x is None else round(100.0 * x, 2))
        summary = {key: {n: pct(s[key]) for n, s in summaries.items() if s[key] is not None}
                   for key in ("first_acc", "last_acc", "avg_acc", "last_hm")}
        write_report(self.out, {**summary, "split": split.describe(), "skipped_images": len(self.skipped),
                                "seconds": round(seconds, 1)}, title=f"FSCIL {self.task} (accuracy in %, per method)")
        return report

    def _plot(self, results: dict[str, list[dict[str, Any]]]) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=True)
        for name, rows in results.items():
            x = [r["session"] for r in rows]
            for ax, key in zip(axes, ("acc", "base_acc", "novel_acc")):
                pts = [(s, 100 * r[key]) for s, r in zip(x, rows) if r[key] is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=name)
        for ax, title in zip(axes, ("all seen classes", "base classes", "novel classes")):
            ax.set(xlabel="session", title=title)
            ax.grid(alpha=0.3)
            ax.set_xticks(range(max(len(r) for r in results.values())))
        axes[0].set_ylabel("top-1 accuracy (%)")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"FSCIL {self.task}")
        fig.tight_layout()
        path = self.out / "sessions.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------
def _instantiate(value: Any) -> Any:
    """A ``{class_path, init_args}`` Trainer value (a strategy, a plugin) as an object; anything else unchanged."""
    if isinstance(value, dict) and "class_path" in value:
        import importlib

        module, _, name = value["class_path"].rpartition(".")
        kwargs = {k: v for k, v in (value.get("init_args") or {}).items() if v is not None}
        return getattr(importlib.import_module(module), name)(**kwargs)
    return value


def run_fscil(task: str = "fscil", seed_everything: int = 0, methods: list[str] | None = None,
              out_dir: str | None = None, runs_root: str = "runs/fscil", resume: bool = True,
              num_threads: int | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Few-shot class-incremental learning: a base session, then N-way K-shot sessions, each one Trainer.fit per
    method; after each, every method is evaluated on all classes seen so far (unseen classes masked). Writes JSON,
    CSV, Markdown and plots, and resumes an interrupted run (from its last finished session, or inside a session
    from Lightning's last.ckpt).

    Args:
        task: Run name; output goes to ``runs_root/<task>/version_N/``.
        seed_everything: Seed of the split, of every method's initialisation and of every session and epoch.
        methods: Methods to run, in order (registered: ``coact``, ``frozen_class_mean``, ``naive_lora_finetune``);
            each is configured in the group of the same name.
        out_dir: Write here instead of a new ``version_N`` folder (an unfinished run there is resumed).
        runs_root: Root of the versioned output folders.
        resume: Continue the newest unfinished run with the same configuration.
        num_threads: ``torch.set_num_threads`` (``None``: torch's default).
        show_progress: Progress bars and per-epoch messages on the console.
    """
    raise NotImplementedError("called through fscil_main, which builds the methods")  # signature for the parser


def build_parser():
    """The jsonargparse parser of ``python -m visadapt fscil``: top-level settings, ``trainer``, ``model``,
    ``data`` and one group per registered method."""
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    from visadapt.adapters import AdapterConfig

    set_parsing_settings(docstring_parse_attribute_docstrings=True, subclasses_enabled=[AdapterConfig])
    parser = ArgumentParser(prog=PROG, description=(run_fscil.__doc__ or "").split("\n\n")[0], exit_on_error=True)
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="A YAML configuration file.")
    parser.add_function_arguments(run_fscil, as_group=False)
    parser.set_defaults({"methods": ["coact", "frozen_class_mean", "naive_lora_finetune"]})
    parser.add_class_arguments(Trainer, "trainer", fail_untyped=False, instantiate=False, sub_configs=True,
                               skip=TRAINER_NOT_CONFIGURABLE)
    parser.set_defaults({"trainer.log_every_n_steps": 1, "trainer.devices": 1})
    parser.add_class_arguments(FSCILModel, "model", sub_configs=True, help="The encoder, adapter and classifier form.")
    parser.add_class_arguments(SessionDataConfig, "data", sub_configs=True, help="Dataset, split and transforms.")
    for key in FSCIL_METHODS.names():
        cls = FSCIL_METHODS.get(key)
        parser.add_class_arguments(cls, key, sub_configs=True, help=(cls.__doc__ or "").split("\n\n")[0])
    return parser


def fscil_main(args: list[str] | None = None, after_session: Callable[[str, int], None] | None = None,
               callbacks: list[Callback] | None = None) -> dict[str, Any]:
    """``python -m visadapt fscil [-c task.yaml] [--key value ...]``; returns the results dictionary.

    ``after_session(method, session)`` is called after every finished session and ``callbacks`` join every
    session's Trainer (tests inject interruptions with them).
    """
    import sys

    parser = build_parser()
    cfg = parser.parse_args(sys.argv[1:] if args is None else args)
    config = yaml.safe_load(parser.dump(cfg, skip_none=False))
    init = parser.instantiate_classes(cfg)
    names = list(init.methods)
    unknown = [n for n in names if n not in FSCIL_METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; available: {', '.join(FSCIL_METHODS.names())}")
    if init.num_threads:
        torch.set_num_threads(int(init.num_threads))
    config = {k: v for k, v in config.items() if k in {"task", "seed_everything", "methods", "trainer", "model", "data",
                                                        *NOT_HASHED} or k in names}
    trainer = {k: _instantiate(v) for k, v in (cfg.trainer.as_dict() if cfg.get("trainer") else {}).items()
               if v is not None and not k.startswith("__")}  # __path__: the file given with --trainer FILE
    runner = FSCILRunner(task=init.task, data=init.data, model=init.model, methods={n: init[n] for n in names},
                         trainer=trainer, seed=init.seed_everything, out_dir=init.out_dir, runs_root=init.runs_root,
                         resume=init.resume, show_progress=init.show_progress, config=config, callbacks=callbacks)
    start = time.perf_counter()
    report = runner.run(after_session)
    if runner.rank == 0:  # the command's output
        for name in names:
            print("\n" + report["tables"][name])
        print("\n### comparison (%)\n\n" + report["comparison"])
        print(f"\nfscil: {len(names)} method(s) in {time.perf_counter() - start:.1f} s; results in {runner.out} "
              f"(results.md, results.csv, results.json, sessions.png, report.md)")
    return report


__all__ = ["FSCILRunner", "SessionDataConfig", "build_parser", "fscil_main", "run_fscil"]
