"""Labels as users have them.

A classifier trains on class indices 0..classes-1, but users' labels are names
("setosa"), 1-based ids or sparse codes: ``label_values`` says which values there
are (the config's list, or those of the training split), ``encode`` turns labels
into indices and ``decode`` answers in the user's values again. A regression's
targets may be standardized by the training split (``standardize``), and its
predictions brought back to the user's units (``unstandardize``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

MAP = "map"  # data.labels: the classes are the values of the training split's labels


def label_values(y_train: Any, classes: list | None, labels: str | None, where: str) -> np.ndarray:
    """The class values, in class order: ``classes`` as given, or (``labels =
    "map"``) the sorted distinct values of ``y_train``."""
    if classes is not None:
        values = np.asarray(classes)
        if len(np.unique(values)) != len(values):
            raise ValueError(f"{where}: data.classes names a value twice ({list(classes)}): name each class once")
        return values
    values = np.unique(np.asarray(y_train[:]).reshape(-1))
    if len(values) < 2:
        raise ValueError(f"{where}: y_train holds one label value only ({values.tolist()}): a classifier needs two")
    return values


def encode(y: Any, values: np.ndarray, name: str, where: str) -> np.ndarray:
    """The class index of each label of ``y`` (int32, the shape of ``y``);
    ValueError naming the first label that is no class."""
    y = np.asarray(y[:])
    if (y.dtype.kind in "US") != (values.dtype.kind in "US"):
        raise ValueError(
            f"{where}: {name} holds {y.dtype} labels but the classes are {values.dtype} ({values[:4].tolist()}...): "
            "give the classes as the labels are written"
        )
    order = np.argsort(values, kind="stable")
    ranked = values[order]
    where_in = np.searchsorted(ranked, y).clip(0, len(ranked) - 1)
    known = ranked[where_in] == y
    if not known.all():
        first = y.reshape(-1)[np.argmin(known.reshape(-1))]
        raise ValueError(
            f"{where}: {name} holds the label {first.item()!r}, which is none of the classes "
            f"({', '.join(map(str, values[:6].tolist()))}{', ...' if len(values) > 6 else ''}): add it to "
            "data.classes, or fix the labels"
        )
    return order[where_in].astype(np.int32)


def decode(indices: np.ndarray, values: tuple | list | None) -> np.ndarray:
    """Class indices as the user's label values (the indices themselves without
    a mapping)."""
    return indices if values is None else np.asarray(values)[indices]


def standardize(y_train: Any, y_test: Any, where: str) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Both splits' targets less the training split's mean, over its deviation,
    and ``(mean, deviation)``."""
    train, test = np.asarray(y_train[:], np.float64), np.asarray(y_test[:], np.float64)
    mean, std = float(train.mean()), float(train.std())
    if not std > 0:
        raise ValueError(f"{where}: y_train holds one value only ({mean}): there is nothing to standardize")
    dtype = np.asarray(y_train[:1]).dtype if np.asarray(y_train[:1]).dtype.kind == "f" else np.float32
    return ((train - mean) / std).astype(dtype), ((test - mean) / std).astype(dtype), (mean, std)


def unstandardize(predictions: np.ndarray, scale: tuple[float, float] | None) -> np.ndarray:
    """Standardized predictions in the targets' own units."""
    if scale is None:
        return predictions
    mean, std = scale
    return (predictions.astype(np.float64) * std + mean).astype(predictions.dtype)
