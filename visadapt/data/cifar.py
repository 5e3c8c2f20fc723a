"""CIFAR-100 and CIFAR-10 from the "python version" pickle batches, read with a restricted unpickler.

The official archives (``cifar-100-python.tar.gz``, ``cifar-10-python.tar.gz``) hold Python pickles. A pickle can
run arbitrary code when loaded (any importable callable can be named in it), so a plain ``pickle.load`` on a file
the user points at is unsafe. :func:`safe_load_pickle` only resolves the handful of globals that the CIFAR files (and
NumPy array pickles in general) need: NumPy's array and dtype reconstruction helpers and ``_codecs.encode`` (which
Python 3 uses for bytes in protocol-2 pickles). Any other global, such as ``os.system`` or ``builtins.eval``, raises
:class:`UnsafePickleError` before anything is called.

Expected layout (``root`` may also be the inner folder itself)::

    <root>/cifar-100-python/{train, test, meta}
    <root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from visadapt.data._registry import register_dataset
from visadapt.data.base import ArrayImageDataset


class UnsafePickleError(pickle.UnpicklingError):
    """Raised when a pickle names a global that is not on the allow-list."""


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The NumPy callables/classes an ndarray pickle may reference, under their NumPy 1.x and 2.x module paths."""
    try:
        from numpy._core import multiarray, numeric  # NumPy >= 2
    except ImportError:  # pragma: no cover - NumPy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {}
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{mod}.multiarray", "scalar")] = multiarray.scalar
        if hasattr(numeric, "_frombuffer"):
            allowed[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    for name in ("UInt8DType", "Int64DType", "Int32DType", "Float32DType", "Float64DType", "BytesDType", "StrDType"):
        if hasattr(np, "dtypes") and hasattr(np.dtypes, name):
            allowed[("numpy.dtypes", name)] = getattr(np.dtypes, name)
    import codecs

    allowed[("_codecs", "encode")] = codecs.encode
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only allow-listed globals (NumPy arrays, plain containers, str/bytes/numbers)."""

    def __init__(self, file: Any, *, encoding: str = "latin1", source: str = "<pickle>") -> None:
        super().__init__(file, encoding=encoding)
        self._allowed = _numpy_globals()
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        obj = self._allowed.get((module, name))
        if obj is None:
            raise UnsafePickleError(f"refusing to load {self._source}: it references the global "
                                    f"{module}.{name}, which is not allowed (only NumPy array data is)")
        return obj


def safe_load_pickle(path: str | Path | bytes, encoding: str = "latin1") -> Any:
    """Load a pickle holding only builtins containers and NumPy arrays; refuse anything else.

    ``encoding="latin1"`` decodes the Python-2 ``str`` objects of the CIFAR files (the array bytes included, as
    ``torchvision`` does); dictionary keys therefore come back as ``str``.
    """
    if isinstance(path, bytes):
        return RestrictedUnpickler(io.BytesIO(path), encoding=encoding, source="<bytes>").load()
    path = Path(path)
    with open(path, "rb") as f:
        return RestrictedUnpickler(f, encoding=encoding, source=str(path)).load()


def _key(entry: dict, *names: str) -> Any:
    for n in names:
        for k in (n, n.encode()):
            if k in entry:
                return entry[k]
    raise KeyError(f"none of the keys {names} in the batch (found {sorted(map(str, entry))})")


def _to_images(data: np.ndarray) -> np.ndarray:
    """CIFAR rows (N, 3072) in channel-major order -> (N, 32, 32, 3) uint8."""
    data = np.asarray(data, dtype=np.uint8)
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()


def _find_folder(root: str | Path | None, inner: str, files: list[str], layout: str) -> Path:
    if root is None:
        raise FileNotFoundError(f"no root given for {inner}; expected the layout {layout}")
    root = Path(root).expanduser()
    for cand in (root / inner, root):
        if all((cand / f).is_file() for f in files):
            return cand
    missing = [f for f in files if not (root / inner / f).is_file()]
    raise FileNotFoundError(f"{inner} not found under {root} (missing {', '.join(missing)}); expected the layout "
                            f"{layout} — extract the official 'python version' archive there")


CIFAR100_LAYOUT = "<root>/cifar-100-python/{train,test,meta} (from cifar-100-python.tar.gz)"
CIFAR10_LAYOUT = "<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} (from cifar-10-python.tar.gz)"


@register_dataset("cifar100")
def cifar100(root: str | None = None, split: str = "train", transform: Callable | None = None,
             label_type: str = "fine", on_bad_image: str = "raise") -> ArrayImageDataset:
    """CIFAR-100 (50,000 train / 10,000 test, 32x32 RGB) from the official python pickles, loaded safely.

    Labels are the ``fine_labels`` (100 classes, the FSCIL class order) or ``coarse_labels`` (20 superclasses).

    Args:
        root: Folder containing ``cifar-100-python/`` (or that folder itself).
        split: ``train`` or ``test``.
        transform: Applied to the PIL image.
        label_type: ``fine`` or ``coarse``.
        on_bad_image: Unused (arrays cannot be corrupt per image); accepted for a uniform signature.
    """
    if split not in ("train", "test"):
        raise ValueError(f"cifar100 split must be 'train' or 'test', got {split!r}")
    if label_type not in ("fine", "coarse"):
        raise ValueError(f"label_type must be 'fine' or 'coarse', got {label_type!r}")
    folder = _find_folder(root, "cifar-100-python", ["train", "test", "meta"], CIFAR100_LAYOUT)
    entry = safe_load_pickle(folder / split)
    meta = safe_load_pickle(folder / "meta")
    labels = [int(y) for y in _key(entry, f"{label_type}_labels")]
    names = [str(n) for n in _key(meta, f"{label_type}_label_names")]
    images = _to_images(_key(entry, "data"))
    if len(images) != len(labels):
        raise ValueError(f"{folder / split}: {len(images)} images but {len(labels)} labels")
    return ArrayImageDataset(images, labels, names, name=f"cifar100/{split}", transform=transform)


@register_dataset("cifar10")
def cifar10(root: str | None = None, split: str = "train", transform: Callable | None = None,
            on_bad_image: str = "raise") -> ArrayImageDataset:
    """CIFAR-10 (50,000 train / 10,000 test, 32x32 RGB) from the official python pickles, loaded safely.

    Args:
        root: Folder containing ``cifar-10-batches-py/`` (or that folder itself).
        split: ``train`` or ``test``.
        transform: Applied to the PIL image.
        on_bad_image: Unused; accepted for a uniform signature.
    """
    if split not in ("train", "test"):
        raise ValueError(f"cifar10 split must be 'train' or 'test', got {split!r}")
    batches = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    folder = _find_folder(root, "cifar-10-batches-py", batches + ["batches.meta"], CIFAR10_LAYOUT)
    data, labels = [], []
    for b in batches:
        entry = safe_load_pickle(folder / b)
        data.append(_to_images(_key(entry, "data")))
        labels.extend(int(y) for y in _key(entry, "labels"))
    names = [str(n) for n in _key(safe_load_pickle(folder / "batches.meta"), "label_names")]
    return ArrayImageDataset(np.concatenate(data), labels, names, name=f"cifar10/{split}", transform=transform)


__all__ = ["RestrictedUnpickler", "UnsafePickleError", "cifar10", "cifar100", "safe_load_pickle"]
