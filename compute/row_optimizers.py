"""Row-wise optimizers of embedding tables: the update of the rows a step touched.

Each is lazy: a row that a step does not touch keeps its value and its state, as
TensorFlow's sparse apply, ``torch.optim.SparseAdam`` and LazyAdam do. SGD and
Adagrad leave an untouched row alone anyway (its gradient is zero), so for them a
table trained row by row equals the same table trained as a dense parameter with
optax's ``sgd`` and ``adagrad``, to float rounding. Adam's moments are updated only
for touched rows; its bias correction counts each row's own updates (``per_row``,
the default: a row first seen late starts as gently as one seen at once) or the
table's updates (``global``, TensorFlow's LazyAdam).

All of it is numpy: the rows of one update are a few thousand at most, and the
shard applies them under its update lock right after the dense parameters.
"""

from __future__ import annotations

from typing import Any

import numpy as np

State = dict[str, np.ndarray]  # per row: name -> [rows, width] (width 1: one value per row)


class RowOptimizer:
    """One table's optimizer, from a checked spec (``check_table_optimizer``)."""

    def __init__(self, spec: dict[str, Any]):
        self.spec, self.name = spec, spec["name"]
        self.lr = np.float32(spec["learning_rate"])

    def state_widths(self, dim: int) -> dict[str, int]:
        """The state kept per row: name -> values per row."""
        if self.name == "adagrad":
            return {"accumulator": dim}
        if self.name == "adam":
            return {"m": dim, "v": dim, "count": 1}
        return {}

    def state_fill(self, name: str) -> float:
        """The first value of a piece of a row's state."""
        return self.spec.get("initial_accumulator_value", 0.0) if name == "accumulator" else 0.0

    def initial_state(self, count: int, dim: int) -> State:
        return {
            name: np.full((count, width), self.state_fill(name), np.float32)
            for name, width in self.state_widths(dim).items()
        }

    def apply(self, rows: np.ndarray, state: State, grads: np.ndarray, updates: int) -> tuple[np.ndarray, State]:
        """New values and state of ``rows`` for the mean gradient ``grads`` (all
        ``[U, dim]`` float32). ``updates``: the table's updates before this one (the
        step of ``global`` bias correction). Nothing is written in place."""
        lr = self.lr
        if self.name == "sgd":
            return rows - lr * grads, {}
        if self.name == "adagrad":
            accumulator = state["accumulator"] + grads * grads
            eps = np.float32(self.spec["eps"])
            # as optax's scale_by_rss: g / sqrt(sum of squares + eps), 0 where the sum is 0
            scale = np.where(accumulator > 0, 1 / np.sqrt(accumulator + eps), np.float32(0))
            return rows - lr * (grads * scale), {"accumulator": accumulator}
        b1, b2, eps = (np.float32(self.spec[k]) for k in ("b1", "b2", "eps"))
        m = b1 * state["m"] + (1 - b1) * grads
        v = b2 * state["v"] + (1 - b2) * grads * grads
        count = state["count"] + 1
        t = count if self.spec["bias_correction"] == "per_row" else np.float32(updates + 1)
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        return rows - lr * m_hat / (np.sqrt(v_hat) + eps), {"m": m, "v": v, "count": count}
