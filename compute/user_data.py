"""A user's own data set: an ``.npz`` file, a folder of ``.npy`` files (read a row
at a time, never held whole) or a Python file whose ``load(**options)`` returns the
arrays.

Each gives the arrays ``x_train`` and ``y_train`` and optionally ``x_test`` and
``y_test`` (else a fixed ``test_fraction`` of the training rows is held out). Every
problem is a ``ValueError`` whose one-line message names the file and the array, and
is found before anything trains (``check_dataset``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np

from psfw.compute.datasets import Dataset, split

NAMES = ("x_train", "y_train", "x_test", "y_test")
_CHECK_CHUNK = 1 << 22  # label values read at a time when checking a memory-mapped set


class NpyFile:
    """The rows of an ``.npy`` file, read when asked for: ``f[rows]`` reads just
    those rows from the file (``os.preadv`` into the result; contiguous rows in one
    read). Nothing is mapped into the process: a memory-mapped file would count in
    its resident memory every page it touched, and the kernel maps whole large
    folios (up to 2 MB) of a file's page cache for each row read at random."""

    def __init__(self, path: Path):
        self.path = path
        with path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                header = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                header = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"{path} is an .npy file of format {version}: save it with numpy.save")
            self.shape, fortran, self.dtype = header
            self.offset = f.tell()
        if fortran and len(self.shape) > 1:
            raise ValueError(f"{path} is stored in Fortran order: save it in C order (np.ascontiguousarray)")
        if self.dtype.hasobject:
            raise ValueError(f"{path} holds objects, which psfw never unpickles: store numeric arrays")
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        size = path.stat().st_size
        if size < self.offset + self.row_bytes * len(self):
            raise ValueError(f"{path} is shorter than its header says ({list(self.shape)} {self.dtype}): save it again")
        self._fd = os.open(path, os.O_RDONLY)

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 0

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, rows: Any) -> np.ndarray:
        if isinstance(rows, slice):
            start, stop, step = rows.indices(len(self))
            if step == 1:
                return self._read(start, max(0, stop - start))
            rows = np.arange(start, stop, step)
        index = np.asarray(rows)
        if index.ndim == 0:
            return self._read(int(index) % len(self), 1)[0]
        index = np.where(index < 0, index + len(self), index).astype(np.int64)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"rows out of range for {self.path} ({len(self)} rows)")
        out = np.empty((len(index), *self.shape[1:]), self.dtype)
        raw = out.reshape(len(index), -1).view(np.uint8)
        for i, row in enumerate(index.tolist()):
            self._fill(raw[i], row)
        return out

    def _read(self, start: int, count: int) -> np.ndarray:
        out = np.empty((count, *self.shape[1:]), self.dtype)
        if count:
            self._fill(out.reshape(-1).view(np.uint8), start)
        return out

    def _fill(self, buffer: np.ndarray, row: int) -> None:
        if os.preadv(self._fd, [buffer], self.offset + row * self.row_bytes) != buffer.nbytes:
            raise OSError(f"{self.path} ended before row {row}: was it cut short while training?")

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self[:], dtype=dtype)


def load_path(path: Path, classes: int | None, test_fraction: float, seed: int) -> Dataset:
    """The data set in ``path``: an ``.npz`` file (read into memory) or a folder of
    ``NAME.npy`` files (``NpyFile``: only the rows a worker asks for are read)."""
    if not path.exists():
        raise ValueError(f"{path} does not exist: give an .npz file or a folder of .npy files")
    if path.is_dir():
        arrays = _npy_folder(path)
    else:
        arrays = _npz(path)
    return from_arrays(arrays, str(path), classes, test_fraction, seed)


def _npz(path: Path) -> dict[str, Any]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except ValueError as err:
        if "pickle" in str(err):
            raise ValueError(f"{path} holds object arrays, which psfw never unpickles: store numeric arrays") from None
        raise ValueError(f"{path} is not an .npz file numpy can read: {err}") from None
    except (OSError, EOFError) as err:
        raise ValueError(f"{path} is not an .npz file numpy can read: {err}") from None


def _npy_folder(path: Path) -> dict[str, Any]:
    arrays = {}
    for name in NAMES:
        file = path / f"{name}.npy"
        if not file.exists():
            continue
        try:
            arrays[name] = NpyFile(file)
        except (OSError, ValueError) as err:
            raise ValueError(f"{file} is not an .npy file numpy can read: {err}") from None
    if not arrays:
        found = sorted(p.name for p in path.iterdir())[:5]
        raise ValueError(
            f"{path} holds no x_train.npy or y_train.npy (it holds {', '.join(found) or 'nothing'}): "
            "save the arrays as x_train.npy, y_train.npy and optionally x_test.npy, y_test.npy"
        )
    return arrays


def load_module(path: Path, options: dict[str, Any], classes: int | None, test_fraction: float, seed: int) -> Dataset:
    """The data set that ``load(**options)`` of the Python file ``path`` returns: a
    dict (or any mapping) of the arrays named as in an ``.npz`` file."""
    if not path.is_file():
        raise ValueError(f"{path} does not exist: give a Python file that defines load()")
    spec = importlib.util.spec_from_file_location(f"psfw_user_data_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # the user's file: say what broke, in one line
        raise ValueError(f"importing {path} failed: {type(err).__name__}: {err}") from None
    if not callable(getattr(module, "load", None)):
        raise ValueError(f"{path} defines no load() function: define load(**options) that returns the arrays")
    try:
        arrays = module.load(**options)
    except Exception as err:
        raise ValueError(f"load(**{options}) of {path} failed: {type(err).__name__}: {err}") from None
    if not hasattr(arrays, "keys") or not hasattr(arrays, "__getitem__"):
        raise ValueError(
            f"load() of {path} returned {type(arrays).__name__}: return a dict with the arrays x_train, y_train "
            "and optionally x_test, y_test"
        )
    return from_arrays(dict(arrays), f"load() of {path}", classes, test_fraction, seed)


def from_arrays(arrays: dict[str, Any], where: str, classes: int | None, test_fraction: float, seed: int) -> Dataset:
    """A data set from named arrays (``where`` says whose, in errors)."""
    unknown = sorted(set(arrays) - set(NAMES))
    missing = [n for n in ("x_train", "y_train") if n not in arrays]
    if missing:
        held = ", ".join(sorted(arrays)) or "nothing"
        raise ValueError(
            f"{where} has no array {missing[0]} (it holds {held}): name the arrays x_train, y_train "
            "and optionally x_test, y_test"
        )
    if unknown:
        raise ValueError(f"{where} holds arrays psfw does not read ({', '.join(unknown)}): use only {', '.join(NAMES)}")
    if ("x_test" in arrays) != ("y_test" in arrays):
        given, absent = ("x_test", "y_test") if "x_test" in arrays else ("y_test", "x_test")
        raise ValueError(f"{where} has {given} but no {absent}: give both, or neither to hold out test_fraction")
    for name, array in arrays.items():
        if not isinstance(array, np.ndarray | NpyFile):
            raise ValueError(f"{where}: {name} is a {type(array).__name__}, not a numpy array: return numpy arrays")
        if array.dtype.kind not in "biuf" or array.ndim == 0:
            raise ValueError(
                f"{where}: {name} is a {array.dtype} array of shape {list(array.shape)}: "
                "give numbers (bool, int, uint or float), one row per example"
            )
    if "x_test" in arrays:
        data = Dataset(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], classes)
    else:
        _same_rows(arrays["x_train"], arrays["y_train"], "x_train", "y_train", where)
        data = Dataset(*split(arrays["x_train"], arrays["y_train"], test_fraction, seed), classes)
    check_dataset(data, where)
    return data


def _same_rows(x: Any, y: Any, x_name: str, y_name: str, where: str) -> None:
    if len(x) != len(y):
        raise ValueError(f"{where}: {x_name} has {len(x)} rows but {y_name} {len(y)}: give one label row per input row")


def check_dataset(data: Dataset, where: str) -> None:
    """The checks every data set passes before training: rows of inputs and labels
    agree, the test split has the training split's shapes and dtypes, and labels of a
    classification set are integers in range."""
    _same_rows(data.x_train, data.y_train, "x_train", "y_train", where)
    _same_rows(data.x_test, data.y_test, "x_test", "y_test", where)
    for part in ("train", "test"):
        if len(getattr(data, f"x_{part}")) == 0:
            raise ValueError(f"{where}: the {part} split has no rows")
    for kind in ("x", "y"):
        train, test = getattr(data, f"{kind}_train"), getattr(data, f"{kind}_test")
        if train.shape[1:] != test.shape[1:] or train.dtype != test.dtype:
            raise ValueError(
                f"{where}: {kind}_test is {test.dtype}{list(test.shape[1:])} per row but {kind}_train "
                f"{train.dtype}{list(train.shape[1:])}: give both splits the same form"
            )
    if data.classes is None:
        return
    if data.y_train.dtype.kind not in "iu":
        raise ValueError(
            f"{where}: classes = {data.classes} needs integer class labels, but y_train is {data.y_train.dtype}: "
            "store the labels as integers, or drop data.classes to train on them as targets"
        )
    for name in ("y_train", "y_test"):
        low, high = _label_range(getattr(data, name))
        if low < 0 or high >= data.classes:
            raise ValueError(
                f"{where}: {name} holds labels from {low} to {high}, out of range for classes = {data.classes} "
                f"(labels are 0..{data.classes - 1}): raise data.classes or fix the labels"
            )


def _label_range(labels: Any) -> tuple[int, int]:
    """The smallest and largest label, read a chunk at a time (the labels of a folder
    of ``.npy`` files are never all in memory at once)."""
    low, high = None, None
    flat = labels.reshape(-1) if isinstance(labels, np.ndarray) else None
    if flat is None:  # rows read from a file: a chunk of rows at a time
        step = max(1, _CHECK_CHUNK // max(1, int(np.prod(labels.shape[1:]))))
        chunks = (np.asarray(labels[i : i + step]) for i in range(0, len(labels), step))
    else:
        chunks = (np.asarray(flat[i : i + _CHECK_CHUNK]) for i in range(0, flat.size, _CHECK_CHUNK))
    for chunk in chunks:
        if chunk.size:
            lo, hi = int(chunk.min()), int(chunk.max())
            low = lo if low is None else min(low, lo)
            high = hi if high is None else max(high, hi)
    return (0, 0) if low is None else (low, high)
