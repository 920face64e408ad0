"""Rows a user brings to a trained model: what to predict (``psfw predict
--input``) and a test split of its own (``psfw eval --input``), read from numpy files
and checked against the job's data before anything is computed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from psfw.base.errors import UsageError
from psfw.compute.labels import encode
from psfw.compute.user_data import check_dataset
from psfw.jobs.job import Job

__all__ = ["read_rows", "with_test_split"]


def read_rows(path: str | Path) -> np.ndarray:
    """The rows to predict from a file: a ``.npy`` array, or the ``x`` (else
    ``x_test``) array of an ``.npz`` file; UsageError in one line otherwise."""
    path = _file(path, "a .npy file, or an .npz file with an array x")
    if path.suffix == ".npy":
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise UsageError(f"--input {path} cannot be read as an .npy file: {err}") from None
    arrays = _npz(path)
    for key in ("x", "x_test"):
        if key in arrays:
            return arrays[key]
    raise UsageError(f"--input {path} holds {sorted(arrays)}, but no array x (or x_test) to predict")


def with_test_split(job: Job, path: str | Path) -> Job:
    """``job`` with the test split of the ``.npz`` file ``path`` (``x_test`` and
    ``y_test``, or ``x`` and ``y``: no training arrays needed) in place of its own;
    UsageError in one line when the file's rows or labels do not fit the job."""
    path = _file(path, "an .npz file with x_test and y_test (or x and y)")
    arrays = _npz(path)
    for x_name, y_name in (("x_test", "y_test"), ("x", "y")):
        if x_name in arrays and y_name in arrays:
            try:
                y = _as_trained(job, arrays[y_name], y_name, f"--input {path}")
                data = job.data._replace(x_test=arrays[x_name], y_test=y)
                check_dataset(data, f"--input {path}")
            except ValueError as err:
                raise UsageError(str(err).replace("x_test", x_name).replace("y_test", y_name)) from None
            return dataclasses.replace(job, data=data)
    raise UsageError(f"--input {path} holds {sorted(arrays)}: give x_test and y_test (or x and y) to evaluate on")


def _as_trained(job: Job, y: np.ndarray, name: str, where: str) -> np.ndarray:
    """Labels as the user writes them, in the form the job trained on: class
    indices, or targets standardized by the training split."""
    if job.data.labels is not None:
        return encode(y, np.asarray(job.data.labels), name, where)
    if job.data.target_scale is not None and y.dtype.kind in "biuf":
        mean, std = job.data.target_scale
        return ((y - mean) / std).astype(job.data.y_train.dtype)
    return y


def _file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--input {path}: no such file (give {what})")
    if path.suffix not in (".npy", ".npz") or (path.suffix == ".npy" and what.startswith("an .npz")):
        raise UsageError(f"--input {path}: give {what}")
    return path


def _npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return {name: arrays[name] for name in arrays.files}
    except (OSError, ValueError, EOFError) as err:
        raise UsageError(f"--input {path} cannot be read as an .npz file: {err}") from None
