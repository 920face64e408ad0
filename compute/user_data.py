"""A user's own data set: an ``.npz`` file, a folder of ``.npy`` files (read a row
at a time, never held whole) or a Python file whose ``load(**options)`` returns the
arrays.

Each gives the arrays ``x_train`` and ``y_train`` and optionally ``x_test`` and
``y_test`` (else a fixed ``test_fraction`` of the training rows is held out). Every
problem is a ``ValueError`` whose one-line message names the file and the array, and
is found before anything trains (``check_dataset``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from psfw.compute.datasets import Dataset, Rows, split
from psfw.compute.labels import MAP, encode, label_values, standardize
from psfw.compute.npy_file import NpyFile
from psfw.compute.user_files import import_user_file

NAMES = ("x_train", "y_train", "x_test", "y_test")
_CHECK_CHUNK = 1 << 22  # values read at a time when checking a set read from files


Classes = int | list | None  # a classifier's number of classes, or its label values in class order


def load_path(path: Path, classes: Classes, test_fraction: float, seed: int, **labels: Any) -> Dataset:
    """The data set in ``path``: an ``.npz`` file (read into memory) or a folder of
    ``NAME.npy`` files (``NpyFile``: only the rows a worker asks for are read);
    ``labels``: ``from_arrays``' label settings."""
    if not path.exists():
        raise ValueError(f"{path} does not exist: give an .npz file or a folder of .npy files")
    if path.is_dir():
        arrays = _npy_folder(path)
    else:
        arrays = _npz(path)
    return from_arrays(arrays, str(path), classes, test_fraction, seed, **labels)


def _npz(path: Path) -> dict[str, Any]:
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path} is not an .npz file numpy can read ({err}): give an .npz file or a folder") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(
            f"{path} is a single .npy file: give an .npz file of the arrays, or a folder of x_train.npy, "
            "y_train.npy and optionally x_test.npy, y_test.npy"
        )
    with archive:
        try:
            return {name: archive[name] for name in archive.files}
        except ValueError as err:
            if "allow_pickle" in str(err):
                raise ValueError(
                    f"{path} holds object arrays, which psfw never unpickles: store numeric arrays"
                ) from None
            raise ValueError(f"{path} holds an array numpy cannot read: {err}") from None


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


def load_module(
    path: Path, options: dict[str, Any], classes: Classes, test_fraction: float, seed: int, **labels: Any
) -> Dataset:
    """The data set that ``load(**options)`` of the Python file ``path`` returns: a
    dict (or any mapping) of the arrays named as in an ``.npz`` file."""
    if not path.is_file():
        raise ValueError(f"{path} does not exist: give a Python file that defines load()")
    module = import_user_file(path, "data")
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
    return from_arrays(dict(arrays), f"load() of {path}", classes, test_fraction, seed, **labels)


def from_arrays(
    arrays: dict[str, Any],
    where: str,
    classes: Classes,
    test_fraction: float,
    seed: int,
    labels: str | None = None,
    standardize_y: bool = False,
) -> Dataset:
    """A data set from named arrays (``where`` says whose, in errors). Labels that
    are not 0..classes-1 become class indices when ``classes`` lists their values
    or ``labels`` is ``"map"`` (``psfw.compute.labels``); ``standardize_y`` takes
    the training split's mean and deviation out of a regression's targets."""
    mapped = isinstance(classes, list) or labels == MAP
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
        if mapped and name.startswith("y") and array.dtype.kind == "U" and array.ndim:
            continue  # label names, mapped to classes below
        if array.dtype.kind not in "biuf" or array.ndim == 0:
            hint = ' (text labels: list them in data.classes, or set data.labels = "map")' if name[0] == "y" else ""
            raise ValueError(
                f"{where}: {name} is a {array.dtype} array of shape {list(array.shape)}: "
                f"give numbers (bool, int, uint or float), one row per example{hint}"
            )
        if isinstance(array, np.ndarray) and not array.dtype.isnative:  # JAX takes this machine's byte order
            arrays[name] = array.astype(array.dtype.newbyteorder("="))
    _check_finite(arrays, where)
    count = None if isinstance(classes, list) else classes
    if "x_test" in arrays:
        data = Dataset(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], count)
    else:
        _same_rows(arrays["x_train"], arrays["y_train"], "x_train", "y_train", where)
        data = Dataset(*split(arrays["x_train"], arrays["y_train"], test_fraction, seed), count)
    if mapped:
        values = label_values(data.y_train, classes if isinstance(classes, list) else None, labels, where)
        y_train, y_test = (encode(getattr(data, n), values, n, where) for n in ("y_train", "y_test"))
        data = data._replace(y_train=y_train, y_test=y_test, classes=len(values), labels=tuple(values.tolist()))
    if standardize_y:
        if data.y_train.dtype.kind not in "biuf":
            raise ValueError(f"{where}: data.standardize_y needs numeric targets, but y_train is {data.y_train.dtype}")
        y_train, y_test, scale = standardize(data.y_train, data.y_test, where)
        data = data._replace(y_train=y_train, y_test=y_test, target_scale=scale)
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
    ranges: dict[int, str] = {}  # each array read once: two splits may view one file
    for name in ("y_train", "y_test"):
        labels = getattr(data, name)
        whole = labels.base if isinstance(labels, Rows) else labels
        if id(whole) in ranges:
            continue
        ranges[id(whole)] = name
        low, high = value_range(whole)
        if low < 0 or high >= data.classes:
            which = "the labels of both splits hold" if whole is not labels else f"{name} holds"
            raise ValueError(
                f"{where}: {which} values from {low} to {high}, out of range for classes = {data.classes} "
                f"(labels are 0..{data.classes - 1}): raise data.classes or fix the labels"
            )


def _check_finite(arrays: dict[str, Any], where: str) -> None:
    """ValueError naming the array, its first row and the column where float inputs
    or labels hold a NaN or an infinity (found before step 0, not when a batch reaches
    it). The arrays as the user gave them, before a test split is cut: their rows."""
    for name in NAMES:
        values = arrays.get(name)
        if values is None or values.dtype.kind != "f":
            continue
        found = first_nonfinite(values)
        if found is not None:
            row, column, value = found
            at = f", column {column}" if column else ""
            raise ValueError(
                f"{where}: {name} holds {value} in row {row}{at}: fix or drop the rows that do "
                "(one would make every gradient NaN)"
            )


def first_nonfinite(values: Any) -> tuple[int, str, str] | None:
    """The first row, its column (``3``, ``[2, 5]``, ``""`` for rows of one value) and the value
    (``nan``, ``inf``) where ``values`` is not finite, read a chunk of rows at a time."""
    shape = values.shape[1:]
    step = max(1, _CHECK_CHUNK // max(1, int(np.prod(shape))))
    for start in range(0, len(values), step):
        chunk = np.asarray(values[start : start + step])
        bad = ~np.isfinite(chunk)
        if bad.any():
            flat = int(np.argmax(bad.reshape(len(chunk), -1).any(axis=1)))
            inside = int(np.argmax(bad[flat].reshape(-1))) if shape else 0
            index = np.unravel_index(inside, shape) if shape else ()
            value = chunk[flat][index] if shape else chunk[flat]
            column = "" if not shape else str(int(index[0])) if len(shape) == 1 else str(list(map(int, index)))
            return start + flat, column, str(value)
    return None


def value_range(values: Any) -> tuple[int, int]:
    """The smallest and largest of ``values`` (an array, an ``NpyFile``, ``Rows``),
    read a chunk of rows at a time: a file's values are never all in memory at once."""
    low, high = None, None
    step = max(1, _CHECK_CHUNK // max(1, int(np.prod(values.shape[1:]))))
    for start in range(0, len(values), step):
        chunk = np.asarray(values[start : start + step])
        if chunk.size:
            lo, hi = int(chunk.min()), int(chunk.max())
            low = lo if low is None else min(low, lo)
            high = hi if high is None else max(high, hi)
    return (0, 0) if low is None else (low, high)
