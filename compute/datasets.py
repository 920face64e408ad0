"""Data sets that ship with the package (nothing is downloaded at run time), and the
:class:`Dataset` every source gives.

A data set is four arrays: inputs and labels of the training and the test split.
They may be numpy arrays, ``.npy`` files read a row at a time
(``psfw.compute.npy_file.NpyFile``) or row views of those (:class:`Rows`): a worker
reads only the rows of its sub-batches (``x_train[rows]``), so a set larger than
memory trains without a copy of it anywhere.
"""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np


class Rows:
    """The rows ``index`` of ``base``, read only when asked for: ``Rows(x, i)[r]`` is
    ``x[i[r]]``. The splits of a set read from files are views, so that splitting it
    copies nothing."""

    def __init__(self, base: Any, index: np.ndarray):
        self.base, self.index = base, np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self.base.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.base.dtype

    @property
    def ndim(self) -> int:
        return self.base.ndim

    def __getitem__(self, rows: Any) -> np.ndarray:
        picked = self.index[rows]
        return self.base[picked] if picked.ndim else self.base[int(picked)]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self[:], dtype=dtype)


class Dataset(NamedTuple):
    x_train: Any  # np.ndarray, NpyFile or Rows: anything indexed by row arrays
    y_train: Any
    x_test: Any
    y_test: Any
    classes: int | None  # classification: labels are 0..classes-1; None: labels are targets
    labels: tuple | None = None  # the user's label value of each class, when they are not 0..classes-1
    target_scale: tuple[float, float] | None = None  # standardized targets: the (mean, deviation) taken out

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def label_shape(self) -> tuple[int, ...]:
        return tuple(self.y_train.shape[1:])


def split(x: Any, y: Any, test_fraction: float, seed: int) -> tuple[Any, Any, Any, Any]:
    """A fixed train/test split of the rows (by ``seed``): ``test_fraction`` of them,
    at least one, for the test. In-memory arrays are indexed; rows read from a file
    are viewed (:class:`Rows`), never copied."""
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = max(1, int(round(len(x) * test_fraction)))
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    if not (type(x) is np.ndarray and type(y) is np.ndarray):  # files: view them
        return Rows(x, train), Rows(y, train), Rows(x, test), Rows(y, test)
    return x[train], y[train], x[test], y[test]


def digits(image: bool = False, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's 8x8 handwritten digits, with a fixed train/test split.

    ``image=True`` gives (N, 8, 8, 1) arrays for convolutional models, else (N, 64).
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    if image:
        x = x.reshape(-1, 8, 8, 1)
    return Dataset(x[train], y[train], x[test], y[test], classes=10)


def diabetes(test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's diabetes regression set: 442 patients, 10 standardized
    features, a disease progression target. The target is standardized with the
    training split's mean and deviation, so a test mean squared error of 1.0 is
    what predicting the mean gives."""
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    x = data.data.astype(np.float32)
    y = data.target.astype(np.float32)
    x_train, y_train, x_test, y_test = split(x, y, test_fraction, seed=0)
    mean, std = y_train.mean(), y_train.std()
    scale = (float(mean), float(std))
    return Dataset(x_train, (y_train - mean) / std, x_test, (y_test - mean) / std, classes=None, target_scale=scale)


def stdlib_files() -> tuple[list[Path], list[Path]]:
    """The training and test files of the ``stdlib_text`` corpus: the top-level
    ``.py`` files of this Python's standard library, sorted by name; a file whose
    name's CRC-32 ends in 0 (in decimal) is a test file."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    test = [f for f in files if zlib.crc32(f.name.encode()) % 10 == 0]
    train = [f for f in files if zlib.crc32(f.name.encode()) % 10 != 0]
    if not train or not test:
        raise ValueError(f"{root} holds no Python source files to read: this Python has no standard library sources")
    return train, test


def _windows(files: list[Path], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive windows of ``seq_len + 1`` bytes: the input is a window's first
    ``seq_len`` bytes, the label the next byte at every position."""
    text = np.frombuffer(b"".join(f.read_bytes() for f in files), dtype=np.uint8)
    rows = (len(text) - 1) // seq_len
    x = text[: rows * seq_len].reshape(rows, seq_len)
    y = text[1 : rows * seq_len + 1].reshape(rows, seq_len)
    return x.astype(np.int32), y.astype(np.int32)


def stdlib_text(seq_len: int = 128) -> Dataset:
    """A byte-level language-modelling corpus every machine has: the source of
    Python's standard library (a few MB, see ``stdlib_files``), cut into windows of
    ``seq_len`` bytes whose labels are the next bytes (256 classes)."""
    train, test = stdlib_files()
    x_train, y_train = _windows(train, seq_len)
    x_test, y_test = _windows(test, seq_len)
    return Dataset(x_train, y_train, x_test, y_test, classes=256)


def synthetic(features: int = 784, classes: int = 10, train: int = 8192, test: int = 1024, seed: int = 0) -> Dataset:
    """Gaussian inputs labelled by a fixed random linear teacher (learnable)."""
    rng = np.random.default_rng(seed)
    teacher = rng.normal(size=(features, classes)).astype(np.float32)
    x = rng.normal(size=(train + test, features)).astype(np.float32)
    y = np.argmax(x @ teacher, axis=1).astype(np.int32)
    return Dataset(x[:train], y[:train], x[train:], y[train:], classes=classes)


SHIPPED = ("digits", "diabetes", "stdlib_text", "synthetic", "clicks")


def load_dataset(name: str, image: bool = False, **options: int) -> Dataset:
    """Load a shipped data set by its config name (one of ``SHIPPED``); ``image``:
    the digits as (N, 8, 8, 1) images."""
    if name == "digits":
        return digits(image=image)
    if name == "synthetic":
        return synthetic(**options)
    if name == "diabetes":
        return diabetes(**options)
    if name == "stdlib_text":
        return stdlib_text(**options)
    if name == "clicks":
        from psfw.compute.clicks import click_log

        return click_log(**options)
    raise ValueError(f"unknown data set {name!r}: use one of {', '.join(SHIPPED)}")
