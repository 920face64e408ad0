"""How long a row lives on a shard: admission, expiry and the cap of a table.

A job that runs for weeks on a stream of events sees most ids once: a row for each
would grow without bound and mostly hold noise. So a table may admit an id only at
its ``admit_after``-th step (until then its lookup gives zeros and its gradient is
dropped), remove a row untouched for ``expire_after`` steps (an id that comes back
is new again), and hold at most ``cap`` rows on a shard (past it, the least
recently used go first, ties by id). The clock is the table's update count, which
every shard advances on every group step: the same ids are admitted, expire and go
whatever the number of shards or worker processes, and the counts and last uses
are checkpointed with the rows.

The ids that wait for admission are counted exactly (a count-min sketch would make
admissions depend on which ids share a shard, so on the shard count), in sorted
arrays of 20 bytes an id, forgotten as rows are: untouched for ``expire_after``
steps, and never more than ``cap`` of them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np


class Lifetime(NamedTuple):
    """A table's rules on one shard: admit at the ``admit_after``-th step an id is
    used (1: at once); expire after ``expire_after`` steps untouched (0: never);
    hold at most ``cap`` rows (0: no cap)."""

    admit_after: int = 1
    expire_after: int = 0
    cap: int = 0

    @classmethod
    def of(cls, declared: dict, shards: int) -> Lifetime:
        """The rules of a table's declaration, with its total ``max_rows`` divided
        over ``shards`` (rounded up)."""
        total = int(declared.get("max_rows", 0))
        return cls(
            int(declared.get("admit_after", 1)),
            int(declared.get("expire_after", 0)),
            math.ceil(total / shards) if total else 0,
        )

    @property
    def default(self) -> bool:
        """Today's rules: a row at first sight, kept for ever."""
        return self == Lifetime()


class WaitingIds:
    """The ids that wait for admission: how many steps used each and when last,
    in arrays sorted by id."""

    def __init__(self) -> None:
        self.ids = np.zeros(0, np.int64)
        self.counts = np.zeros(0, np.int32)
        self.seen = np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def _find(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where each of ``ids`` (sorted, unique) is or would go, and whether it is
        there (a binary search: no pass over every id waiting)."""
        at = np.searchsorted(self.ids, ids)
        inside = at < len(self.ids)
        found = np.zeros(len(ids), bool)
        found[inside] = self.ids[at[inside]] == ids[inside]
        return at, found

    def counts_of(self, ids: np.ndarray) -> np.ndarray:
        """How many steps used each of ``ids`` (sorted, unique) so far: 0 if none."""
        at, found = self._find(ids)
        out = np.zeros(len(ids), np.int32)
        out[found] = self.counts[at[found]]
        return out

    def used(self, ids: np.ndarray, now: int) -> None:
        """One more step used each of ``ids`` (sorted, unique), at step ``now``."""
        if not len(ids):
            return
        at, found = self._find(ids)
        self.counts[at[found]] += 1
        self.seen[at[found]] = now
        new = ~found
        if new.any():
            where = at[new]
            self.ids = np.insert(self.ids, where, ids[new])
            self.counts = np.insert(self.counts, where, np.ones(int(new.sum()), np.int32))
            self.seen = np.insert(self.seen, where, np.full(int(new.sum()), now, np.int64))

    def drop(self, ids: np.ndarray) -> None:
        """Forget ``ids`` (admitted now)."""
        if not len(ids) or not len(self.ids):
            return
        at, found = self._find(ids)
        keep = np.ones(len(self.ids), bool)
        keep[at[found]] = False
        self._keep(keep)

    def forget(self, now: int, after: int, limit: int) -> None:
        """Forget the ids not used for ``after`` steps (0: never) and, past ``limit``
        ids (0: none), the least recently used (ties: the smaller id first)."""
        if after and len(self.ids):
            self._keep(now - self.seen <= after)
        if limit and len(self.ids) > limit:
            self._keep(~oldest(self.seen, self.ids, len(self.ids) - limit))

    def _keep(self, mask: np.ndarray) -> None:
        self.ids, self.counts, self.seen = self.ids[mask], self.counts[mask], self.seen[mask]

    def snapshot(self, prefix: str) -> dict[str, np.ndarray]:
        return {
            f"{prefix}/ids": self.ids.copy(),
            f"{prefix}/counts": self.counts.copy(),
            f"{prefix}/seen": self.seen.copy(),
        }

    @classmethod
    def load(cls, tensors, prefix: str) -> WaitingIds:
        waiting = cls()
        if f"{prefix}/ids" in tensors:
            waiting.ids = np.asarray(tensors[f"{prefix}/ids"], np.int64).copy()
            waiting.counts = np.asarray(tensors[f"{prefix}/counts"], np.int32).copy()
            waiting.seen = np.asarray(tensors[f"{prefix}/seen"], np.int64).copy()
        return waiting


def oldest(last_used: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """A mask of the ``k`` least recently used entries: the smallest ``last_used``,
    ties broken by the smaller id (found in linear time, sorted only among ties)."""
    n = len(last_used)
    mask = np.zeros(n, bool)
    if k <= 0:
        return mask
    if k >= n:
        mask[:] = True
        return mask
    threshold = np.partition(last_used, k - 1)[k - 1]
    below = last_used < threshold
    mask |= below
    tied = np.flatnonzero(last_used == threshold)
    need = k - int(below.sum())
    mask[tied[np.argsort(ids[tied], kind="stable")[:need]]] = True
    return mask


__all__ = ["Lifetime", "WaitingIds", "oldest"]
