"""Which rows go to which step and which worker.

A group's batch for a step is a fixed function of (seed, group, step): each epoch
visits the training rows in its own shuffled order, and a step takes the next
``batch_size`` of them (the incomplete tail of an epoch is dropped). The batch is then
split into one sub-batch per worker, B // W rows each, the remainder to the last.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, TypeVar

import numpy as np

T = TypeVar("T")


def split_sizes(batch_size: int, workers: int) -> list[int]:
    """Rows per worker: ``batch_size // workers`` each, the remainder to the last.

    >>> split_sizes(10, 3)
    [3, 3, 4]
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if batch_size < workers:
        raise ValueError(
            f"batch of {batch_size} rows cannot feed {workers} workers: raise the batch size or use fewer workers"
        )
    base = batch_size // workers
    return [base] * (workers - 1) + [batch_size - base * (workers - 1)]


def split_batch(batch: T, workers: int) -> list[T]:
    """Split an array (or a tuple of arrays sharing the first axis) into sub-batches."""
    arrays = batch if isinstance(batch, tuple) else (batch,)
    sizes = split_sizes(len(arrays[0]), workers)
    bounds = np.cumsum([0, *sizes])
    parts = [tuple(a[lo:hi] for a in arrays) for lo, hi in zip(bounds[:-1], bounds[1:])]
    return parts if isinstance(batch, tuple) else [p[0] for p in parts]


@functools.lru_cache(maxsize=8)
def _epoch_order(rows: int, seed: int, group: int, epoch: int) -> np.ndarray:
    """One epoch's shuffled rows (cached: every worker of every step reads it)."""
    order = np.random.default_rng([seed, group, epoch]).permutation(rows)
    order.flags.writeable = False
    return order


class BatchOrder(NamedTuple):
    """The deterministic order in which one group visits the training rows."""

    rows: int
    batch_size: int
    seed: int
    group: int = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.rows // self.batch_size

    def indices(self, step: int) -> np.ndarray:
        """Row indices of the group's batch at ``step``."""
        epoch, position = divmod(step, self.steps_per_epoch)
        order = _epoch_order(self.rows, self.seed, self.group, epoch)
        start = position * self.batch_size
        return order[start : start + self.batch_size]

    def worker_indices(self, step: int, worker: int, workers: int) -> np.ndarray:
        """Row indices of ``worker``'s sub-batch at ``step``."""
        return split_batch(self.indices(step), workers)[worker]
