"""The few-shot class-incremental (FSCIL) session protocol: ``python -m visadapt fscil -c tasks/fscil_coact.yaml``.

For every method in ``methods`` (CoACT and its baselines, :mod:`visadapt.methods.coact`), the runner trains the base
session, then each incremental session, and after each one evaluates on the test images of *all classes seen so far*,
with the classes not seen yet masked out of the prediction. Per session it reports overall, base-class and
novel-class accuracy and their harmonic mean; per run the average accuracy over sessions, the performance drop
(first minus last) and the base-class forgetting (see :mod:`visadapt.metrics.fscil`).

Output, under ``out_dir`` or ``runs/fscil/<task>/version_N/``::

    config.yaml            the resolved configuration
    split.json             the session split (dataset, seed, classes and image indices of every session)
    <method>/session_K.safetensors   what the method changed in session K (adapters, classifier, unfrozen
                                     encoder weights, EMA teacher) + the torch RNG state
    <method>/session_K.json          that session's metrics, training log and Python/NumPy RNG states
    results.json / results.csv / results.md   per-session tables per method and the comparison
    accuracy.png           accuracy per session (overall, base, novel) for every method
    log.txt                the progress messages

**Resuming.** A session's JSON file is written last (atomically), so it marks the session as finished. Rerunning
the same command (``resume: true``, the default) continues the newest unfinished run with the same configuration:
each method is rebuilt, the saved states of its finished sessions are loaded in order, and training continues with
the next session. Every session is seeded from ``(seed, session)`` alone (global torch/NumPy/Python RNGs and the
data-order generator), so a resumed run gives bit-identical results to an uninterrupted one. Test features are
computed class by class in fixed batches, so caching them between sessions does not change a single bit either.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import json
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torchvision import transforms as T

from visadapt.backbones.base import Preprocess
from visadapt.data.sessions import SessionSplit, build_session_split
from visadapt.methods.coact import (
    METHODS,
    CoACT,
    EncoderSpec,
    FrozenClassMean,
    FSCILMethod,
    NaiveLoRAFinetune,
    SessionData,
    build_encoder,
)
from visadapt.metrics.fscil import (
    comparison_table_markdown,
    masked_predictions,
    session_accuracy,
    session_table_markdown,
    summarize_sessions,
)

PROG = "python -m visadapt fscil"
NOT_HASHED = {"out_dir", "runs_root", "resume", "show_progress", "num_threads"}
"""Settings that do not change results and therefore do not prevent resuming a run."""


# ---------------------------------------------------------------------------------------------------------------
# Data settings and transforms
# ---------------------------------------------------------------------------------------------------------------
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
    """Folder with CEC's ``session_1.txt`` ... index files; when given, the split is read from them."""
    split_file: str | None = None
    """A split JSON written by an earlier run (``split.json``); when given, it is used as is."""
    image_size: int | None = None
    """Input resolution (``None``: the encoder's)."""
    augment: Literal["coact", "light", "none"] = "coact"
    """Training augmentation: ``coact`` (RandomResizedCrop, flip, colour jitter p=0.8, greyscale p=0.2 — the CoACT
    recipe), ``light`` (RandomResizedCrop scale 0.6-1 and flip, for small greyscale images) or ``none``."""


class MultiView:
    """Apply a random transform ``n`` times: the sample's ``image`` becomes a list of ``n`` views."""

    def __init__(self, transform: Callable, n: int) -> None:
        self.transform, self.n = transform, n

    def __call__(self, image: Any) -> list[torch.Tensor]:
        return [self.transform(image) for _ in range(self.n)]


def build_transforms(pre: Preprocess, image_size: int | None, augment: str) -> tuple[Callable, Callable]:
    """``(train, eval)`` transforms at ``image_size`` with the encoder's normalisation."""
    size = image_size or pre.image_size
    interp = T.InterpolationMode.BICUBIC if pre.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    norm = [T.ToTensor(), T.Normalize(pre.mean, pre.std)]
    evaluation = T.Compose([T.Resize(size, interpolation=interp), T.CenterCrop(size), *norm])
    if augment == "none":
        return evaluation, evaluation
    if augment == "light":
        return T.Compose([T.RandomResizedCrop(size, scale=(0.6, 1.0), interpolation=interp),
                          T.RandomHorizontalFlip(), *norm]), evaluation
    if augment == "coact":
        return T.Compose([T.RandomResizedCrop(size, interpolation=interp), T.RandomHorizontalFlip(),
                          T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
                          *norm]), evaluation
    raise ValueError(f"augment must be coact, light or none, got {augment!r}")


# ---------------------------------------------------------------------------------------------------------------
# Seeds and files
# ---------------------------------------------------------------------------------------------------------------
def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed that depends only on ``seed`` and ``keys`` (e.g. the session number)."""
    parts = [int(seed)] + [k if isinstance(k, int) else int(hashlib.sha256(k.encode()).hexdigest()[:8], 16)
                           for k in keys]
    return int(np.random.SeedSequence(parts).generate_state(1, dtype=np.uint64)[0]) >> 1


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA); return a torch generator for the data order."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _write_atomic(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    return x


def method_hparams(method: FSCILMethod) -> dict[str, Any]:
    """The init arguments of ``method`` (read back from the attributes of the same names)."""
    names = [p for p in inspect.signature(type(method).__init__).parameters if p != "self"]
    return {n: getattr(method, n) for n in names if hasattr(method, n)}


# ---------------------------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------------------------
class FSCILRunner:
    """Runs the session protocol for several methods on one split, with per-session checkpoints and resuming.

    Args:
        task: Run name (output folder ``runs_root/<task>/version_N``).
        data: Dataset, split and transforms.
        encoder: The pretrained encoder every method starts from.
        methods: Method name -> configured (not yet set up) method, run in this order.
        seed: Seed of the split and of every session.
        out_dir: Write here instead of a versioned folder.
        runs_root: Root of the versioned output folders.
        resume: Continue the newest unfinished run with the same configuration instead of starting a new one.
        device: ``cpu``, ``cuda`` or ``auto``.
        show_progress: Progress bars and per-epoch messages.
        config_text: The resolved configuration as YAML, written to ``config.yaml``.
    """

    def __init__(self, task: str, data: SessionDataConfig, encoder: EncoderSpec, methods: dict[str, FSCILMethod],
                 seed: int = 0, out_dir: str | None = None, runs_root: str = "runs/fscil", resume: bool = True,
                 device: str = "cpu", show_progress: bool = True, config_text: str | None = None) -> None:
        if not methods:
            raise ValueError("no method to run")
        self.task, self.data, self.encoder_spec, self.methods = task, data, encoder, methods
        self.seed, self.resume, self.show_progress = seed, resume, show_progress
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.config_text = config_text
        self.fingerprint = self._fingerprint()
        self.out = Path(out_dir) if out_dir else self._version_dir(Path(runs_root) / task)
        self._log_file = None

    # -- bookkeeping ----------------------------------------------------------------------------------------
    def _fingerprint(self) -> str:
        spec = {"task": self.task, "seed": self.seed, "data": asdict(self.data), "encoder": asdict(self.encoder_spec),
                "methods": {n: [type(m).__name__, method_hparams(m)] for n, m in self.methods.items()},
                "device": self.device.type}
        return hashlib.sha256(json.dumps(_jsonable(spec), sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _version_dir(self, root: Path) -> Path:
        versions = sorted((int(m.group(1)), p) for p in root.glob("version_*")
                          if (m := re.fullmatch(r"version_(\d+)", p.name)) and p.is_dir())
        if self.resume and versions:
            for _, path in reversed(versions):
                state = self._read_run_json(path)
                if state and state.get("fingerprint") == self.fingerprint and state.get("status") != "complete":
                    return path
        return root / f"version_{versions[-1][0] + 1 if versions else 0}"

    @staticmethod
    def _read_run_json(path: Path) -> dict | None:
        try:
            return json.loads((path / "run.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def _write_run_json(self, status: str, **extra: Any) -> None:
        info = {"task": self.task, "fingerprint": self.fingerprint, "status": status, **extra}
        _write_atomic(self.out / "run.json", json.dumps(info, indent=1))

    def log(self, message: str) -> None:
        if self._log_file is not None:
            self._log_file.write(message + "\n")
            self._log_file.flush()
        if self.show_progress:
            from tqdm import tqdm

            tqdm.write(message)

    # -- data -----------------------------------------------------------------------------------------------
    def _datasets(self) -> tuple[Any, Any]:
        import visadapt.data  # noqa: F401  (registers every dataset)
        from visadapt.data import create_dataset

        kwargs = dict(self.data.dataset_kwargs or {})
        if self.data.root is not None:
            kwargs["root"] = self.data.root
        train = create_dataset(self.data.dataset, split="train", **kwargs)
        test = create_dataset(self.data.dataset, split="test", **kwargs)
        return train, test

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
                                        class_order=d.class_order, index_dir=d.index_dir)
        split.save(path)
        return split

    # -- evaluation -----------------------------------------------------------------------------------------
    def _evaluate(self, method: FSCILMethod, split: SessionSplit, session: int, test: Any, eval_tf: Callable,
                  test_by_class: dict[int, list[int]], cache: dict[int, tuple[int, torch.Tensor]]) -> dict[str, Any]:
        seen = split.seen_classes(session)
        feats, labels = [], []
        for c in range(seen):
            if not test_by_class[c]:  # a class without test images (a partial dataset) adds nothing
                continue
            hit = cache.get(c)
            if hit is None or hit[0] != method.encoder_version:
                idx = test_by_class[c]
                chunks = []
                for start in range(0, len(idx), method.eval_batch_size):
                    images = torch.stack([eval_tf(test.load(i)) for i in idx[start:start + method.eval_batch_size]])
                    chunks.append(method.encode(images).cpu())
                hit = (method.encoder_version, torch.cat(chunks))
                cache[c] = hit
            feats.append(hit[1])
            labels += [c] * len(hit[1])
        logits = method.classify(torch.cat(feats)).cpu()
        preds = masked_predictions(logits, seen)
        res = session_accuracy(preds, torch.tensor(labels), split.num_base_classes)
        return {"session": session, "num_classes": seen, **res}

    # -- one method -----------------------------------------------------------------------------------------
    def _finished_sessions(self, mdir: Path, num_sessions: int) -> int:
        k = 0
        while k < num_sessions and (mdir / f"session_{k}.json").is_file() and \
                (mdir / f"session_{k}.safetensors").is_file():
            k += 1
        return k

    def _run_method(self, name: str, method: FSCILMethod, split: SessionSplit, train: Any, test: Any,
                    after_session: Callable[[str, int], None] | None) -> list[dict[str, Any]]:
        from safetensors.torch import load_file, save_file
        from tqdm import tqdm

        mdir = self.out / name
        mdir.mkdir(parents=True, exist_ok=True)
        seed_everything(derive_seed(self.seed, "setup", name))
        encoder = build_encoder(self.encoder_spec)
        train_tf, eval_tf = build_transforms(encoder.preprocess, self.data.image_size, self.data.augment)
        method.setup(encoder, split.num_classes, self.device, lora_target=self.encoder_spec.lora_target)
        label_map = split.label_map()
        names_in_order = [train.classnames[c] for c in split.class_order]
        test_by_class: dict[int, list[int]] = {c: [] for c in range(split.num_classes)}
        for i in split.test_indices(test.labels, split.num_sessions - 1):
            test_by_class[label_map[int(test.labels[i])]].append(i)
        cache: dict[int, tuple[int, torch.Tensor]] = {}

        done = self._finished_sessions(mdir, split.num_sessions)
        results: list[dict[str, Any]] = []
        for k in range(done):  # resume: replay the saved states in order
            state = load_file(str(mdir / f"session_{k}.safetensors"))
            rng = state.pop("__rng_torch__", None)
            method.load_session_state(k, state)
            record = json.loads((mdir / f"session_{k}.json").read_text())
            results.append(record["metrics"])
            if k == done - 1 and rng is not None:
                torch.set_rng_state(rng)
                random.setstate(tuple(_tuples(record["rng"]["python"])))
                np.random.set_state(tuple(record["rng"]["numpy"]))
        if done:
            self.log(f"{name}: resuming after session {done - 1} (states loaded from {mdir})")

        bar = tqdm(total=split.num_sessions, initial=done, desc=name, unit="session", disable=not self.show_progress,
                   leave=True)
        for k in range(done, split.num_sessions):
            start = time.perf_counter()
            generator = seed_everything(derive_seed(self.seed, k))
            view = MultiView(train_tf, getattr(method, "num_views", 1))
            sess_train = train.subset(split.train[k], label_map, names_in_order)
            sess_train.transform = view
            sess_proto = train.subset(split.train[k], label_map, names_in_order)
            sess_proto.transform = eval_tf
            new = [label_map[c] for c in split.session_classes[k]]
            data = SessionData(session=k, train=sess_train, prototypes=sess_proto, new_classes=new,
                               seen_classes=split.seen_classes(k), base_classes=split.num_base_classes,
                               generator=generator, progress=self.log, device=self.device)
            train_log = method.train_session(data)
            method.end_session(k)
            train_s = time.perf_counter() - start
            metrics = self._evaluate(method, split, k, test, eval_tf, test_by_class, cache)
            metrics["train_seconds"] = round(train_s, 3)
            metrics["eval_seconds"] = round(time.perf_counter() - start - train_s, 3)
            state = method.session_state()
            state["__rng_torch__"] = torch.get_rng_state()
            save_file(state, str(mdir / f"session_{k}.safetensors.tmp"))
            os.replace(mdir / f"session_{k}.safetensors.tmp", mdir / f"session_{k}.safetensors")
            record = {"method": name, "session": k, "metrics": metrics, "train_log": _jsonable(train_log),
                      "saved_tensors": sorted(k_ for k_ in state if k_ != "__rng_torch__"),
                      "rng": {"python": _jsonable(random.getstate()), "numpy": _jsonable(np.random.get_state())}}
            _write_atomic(mdir / f"session_{k}.json", json.dumps(record, indent=1))
            results.append(metrics)
            hm = "-" if metrics["hm"] is None else f"{100 * metrics['hm']:.2f}"
            novel = "-" if metrics["novel_acc"] is None else f"{100 * metrics['novel_acc']:.2f}"
            self.log(f"{name} session {k}: {metrics['num_classes']} classes, acc {100 * metrics['acc']:.2f}, base "
                     f"{100 * metrics['base_acc']:.2f}, novel {novel}, HM {hm} ({metrics['train_seconds']:.1f} s "
                     f"train, {metrics['eval_seconds']:.1f} s eval)")
            bar.update(1)
            if after_session is not None:
                after_session(name, k)
        bar.close()
        return results

    # -- everything -----------------------------------------------------------------------------------------
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
        if self.config_text is not None:
            _write_atomic(self.out / "config.yaml", self.config_text)
        self._write_run_json("running")
        start = time.perf_counter()
        try:
            with open(self.out / "log.txt", "a") as self._log_file:
                train, test = self._datasets()
                split = self._split(train, test)
                self.log(f"fscil: {split.describe()}; output in {self.out}")
                results: dict[str, list[dict[str, Any]]] = {}
                for name, method in self.methods.items():
                    results[name] = self._run_method(name, method, split, train, test, after_session)
                report = self._write_reports(results, split, time.perf_counter() - start)
                self._write_run_json("complete", seconds=round(time.perf_counter() - start, 1))
        finally:
            self._log_file = None
        return report

    def _write_reports(self, results: dict[str, list[dict[str, Any]]], split: SessionSplit,
                       seconds: float) -> dict[str, Any]:
        summaries = {n: summarize_sessions(r) for n, r in results.items()}
        tables = {n: session_table_markdown(r, title=n) for n, r in results.items()}
        comparison = comparison_table_markdown(results)
        md = [f"# FSCIL: {self.task}", "", f"{split.describe()}", ""]
        for t in tables.values():
            md += [t, ""]
        md += ["### comparison (%)", "", comparison, ""]
        _write_atomic(self.out / "results.md", "\n".join(md))
        with open(self.out / "results.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["method", "session", "num_classes", "acc", "base_acc", "novel_acc", "hm", "n", "n_base",
                        "n_novel"])
            for n, rows in results.items():
                for r in rows:
                    w.writerow([n, r["session"], r["num_classes"], r["acc"], r["base_acc"], r["novel_acc"], r["hm"],
                                r["n"], r["n_base"], r["n_novel"]])
        plot = self._plot(results)
        report = {"task": self.task, "out_dir": str(self.out), "seed": self.seed, "split": split.describe(),
                  "methods": {n: {"sessions": results[n], "summary": summaries[n]} for n in results},
                  "tables": tables, "comparison": comparison, "plot": str(plot), "seconds": round(seconds, 1)}
        _write_atomic(self.out / "results.json", json.dumps(_jsonable(report), indent=1))
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
        path = self.out / "accuracy.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _tuples(x: Any) -> Any:
    """JSON lists back to the nested tuples ``random.setstate`` expects."""
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------
_DEFAULT_DATA = SessionDataConfig()
_DEFAULT_ENCODER = EncoderSpec()


def run_fscil(task: str = "fscil", data: SessionDataConfig = _DEFAULT_DATA, encoder: EncoderSpec = _DEFAULT_ENCODER,
              methods: list[str] | None = None, seed: int = 0, out_dir: str | None = None,
              runs_root: str = "runs/fscil", resume: bool = True, device: str = "cpu",
              num_threads: int | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Few-shot class-incremental learning: a base session, then N-way K-shot sessions; after each, every method is
    evaluated on all classes seen so far (unseen classes masked). Writes JSON, CSV, Markdown and a plot, and resumes
    an interrupted run from its last finished session.

    Args:
        task: Run name; output goes to ``runs_root/<task>/version_N/``.
        data: Dataset, session split and transforms.
        encoder: The pretrained image encoder all methods start from.
        methods: Methods to run, in order: ``coact``, ``frozen_class_mean``, ``naive_lora_finetune``; each is
            configured in the group of the same name.
        seed: Seed of the split and of every session (each session is seeded from (seed, session)).
        out_dir: Write here instead of a new ``version_N`` folder (an unfinished run there is resumed).
        runs_root: Root of the versioned output folders.
        resume: Continue the newest unfinished run with the same configuration.
        device: ``cpu``, ``cuda`` or ``auto``.
        num_threads: ``torch.set_num_threads`` (``None``: torch's default).
        show_progress: Progress bars and per-epoch messages.
    """
    raise NotImplementedError("called through fscil_main, which builds the methods")  # signature for the parser


def build_parser():
    """The jsonargparse parser of ``python -m visadapt fscil``."""
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(prog=PROG, description=(run_fscil.__doc__ or "").split("\n\n")[0],
                            exit_on_error=True)
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="A YAML configuration file.")
    parser.add_function_arguments(run_fscil, as_group=False)
    parser.set_defaults({"methods": ["coact", "frozen_class_mean", "naive_lora_finetune"]})
    for key, cls in METHODS.items():
        parser.add_class_arguments(cls, key, help=(cls.__doc__ or "").split("\n\n")[0])
    return parser


def fscil_main(args: list[str] | None = None,
               after_session: Callable[[str, int], None] | None = None) -> dict[str, Any]:
    """``python -m visadapt fscil [-c task.yaml] [--key value ...]``; returns the results dictionary.

    ``after_session(method, session)`` is called after every finished session (tests inject interruptions with it).
    """
    import sys

    parser = build_parser()
    cfg = parser.parse_args(sys.argv[1:] if args is None else args)
    config_text = parser.dump(cfg)
    init = parser.instantiate(cfg)
    names = list(init.methods)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; available: {', '.join(METHODS)}")
    if init.num_threads:
        torch.set_num_threads(int(init.num_threads))
    methods = {n: init[n] for n in names}
    runner = FSCILRunner(task=init.task, data=init.data, encoder=init.encoder, methods=methods, seed=init.seed,
                         out_dir=init.out_dir, runs_root=init.runs_root, resume=init.resume, device=init.device,
                         show_progress=init.show_progress, config_text=config_text)
    start = time.perf_counter()
    report = runner.run(after_session)
    for name in names:
        print("\n" + report["tables"][name])
    print("\n### comparison (%)\n\n" + report["comparison"])
    print(f"\nfscil: {len(names)} method(s) in {time.perf_counter() - start:.1f} s; results in {runner.out} "
          f"(results.md, results.csv, results.json, accuracy.png)")
    return report


__all__ = [
    "CoACT", "FSCILRunner", "FrozenClassMean", "MultiView", "NaiveLoRAFinetune", "SessionDataConfig",
    "build_parser", "build_transforms", "derive_seed", "fscil_main", "run_fscil", "seed_everything",
]
