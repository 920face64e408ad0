"""Data sets that ship with the package: nothing is downloaded at run time."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Dataset(NamedTuple):
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


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


def synthetic(features: int = 784, classes: int = 10, train: int = 8192, test: int = 1024, seed: int = 0) -> Dataset:
    """Gaussian inputs labelled by a fixed random linear teacher (learnable)."""
    rng = np.random.default_rng(seed)
    teacher = rng.normal(size=(features, classes)).astype(np.float32)
    x = rng.normal(size=(train + test, features)).astype(np.float32)
    y = np.argmax(x @ teacher, axis=1).astype(np.int32)
    return Dataset(x[:train], y[:train], x[train:], y[train:], classes=classes)


def load_dataset(name: str, image: bool = False, **options: int) -> Dataset:
    """Load a data set by its config name (``digits`` or ``synthetic``)."""
    if name == "digits":
        return digits(image=image)
    if name == "synthetic":
        data = synthetic(**options)
        if image:
            raise ValueError("the synthetic data set is flat: use the mlp model with it")
        return data
    raise ValueError(f"unknown data set {name!r}: use 'digits' or 'synthetic'")
