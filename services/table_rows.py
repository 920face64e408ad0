"""The rows of one embedding table that one shard holds.

Rows are made when first used (from their initial value, a pure function of the
seed, the table and the id), or at their ``admit_after``-th step (see
``psfw.services.table_lifetime``), so the shard holds only rows that were used. A
table keeps its rows in contiguous arrays (values, each piece of optimizer state and
the step each row was last used, a row per slot, grown by doubling) and an index from
id to slot: a plain array for bounded tables, a dict for unbounded ids. A row that
expires or is evicted leaves its slot to the last row (the arrays stay dense).
Nothing is stored per row beyond that: no Python object per row.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import grpc
import numpy as np

from psfw.base.errors import WireError
from psfw.compute.row_optimizers import RowOptimizer
from psfw.compute.tables import TableSpec, initial_rows, route
from psfw.protocol.messages import RowBlock
from psfw.services.table_lifetime import Lifetime, WaitingIds, oldest

DIRECT_INDEX_ROWS = 1 << 28  # a bounded table up to this many rows indexes ids with an array (4 bytes per row)
MAX_IDS = 1 << 24  # per table and request


class RowUpdate(NamedTuple):
    """A table's update, computed but not written yet."""

    ids: np.ndarray
    slots: np.ndarray  # -1: a row to make
    rows: np.ndarray
    state: dict[str, np.ndarray]
    waiting: np.ndarray  # ids the step used that have no row and wait for admission: their gradients are dropped


def _refuse(code: grpc.StatusCode, message: str) -> WireError:
    return WireError(code, message)


class ShardTable:
    """The rows of one table that one shard holds."""

    def __init__(self, name: str, declared: dict[str, Any], shard: int, shards: int, make_rows: bool = True):
        self.name, self.declared, self.shard, self.shards = name, declared, shard, shards
        self.spec = TableSpec(declared["rows"], declared["dim"], declared["init"], declared["scale"])
        self.seed = declared["seed"]
        self.optimizer = RowOptimizer(declared["optimizer"])
        self.lifetime = Lifetime.of(declared, shards)
        self.waiting = WaitingIds()
        self.updates = 0  # updates applied (the step of global bias correction, and the clock of last uses)
        self.rows_touched = 0  # by the last update
        self.admitted = self.expired = self.evicted = 0  # rows, since the shard started (or its checkpoint)
        self.count = 0  # rows held: slots 0..count-1
        dim = self.spec.dim
        capacity = 1024
        self.ids = np.zeros(capacity, np.int64)  # slot -> id
        self.values = np.zeros((capacity, dim), np.float32)
        self.last_used = np.zeros(capacity, np.int64)  # slot -> the update count when it was last read or updated
        self.state = {
            key: np.zeros((capacity, width), np.float32) for key, width in self.optimizer.state_widths(dim).items()
        }
        rows = self.spec.rows
        self._direct = rows is not None and rows <= DIRECT_INDEX_ROWS
        # slot + 1 by id (0: none yet), zeros the kernel maps lazily: only the pages of ids used take memory
        self._slot_array = np.zeros(rows, np.int32) if self._direct else None
        self._slot_dict: dict[int, int] = {}
        if declared.get("materialize") and make_rows:
            self.materialize()

    def materialize(self, chunk: int = 1 << 20) -> None:
        """Make every row of this shard's share of a bounded table now (memory taken
        up front, as a dense table's), a chunk of ids at a time."""
        rows = self.spec.rows
        count = sum(
            int((route(self.name, np.arange(i, min(i + chunk, rows)), self.shards) == self.shard).sum())
            for i in range(0, rows, chunk)
        )
        self._grow(count, exact=True)
        for start in range(0, rows, chunk):
            ids = np.arange(start, min(start + chunk, rows), dtype=np.int64)
            self.create(ids[route(self.name, ids, self.shards) == self.shard])

    # -- the index -------------------------------------------------------------

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """The slot of each id, -1 where the shard has no row yet."""
        if self._direct:
            return self._slot_array[ids].astype(np.int64) - 1
        get = self._slot_dict.get
        return np.fromiter((get(i, -1) for i in ids.tolist()), np.int64, len(ids))

    def _grow(self, needed: int, exact: bool = False) -> None:
        """Room for ``needed`` rows: the capacity doubles (or becomes ``needed``
        exactly), never beyond the table's declared rows. The new arrays are zeros
        the kernel maps lazily: capacity not used yet takes no memory."""
        capacity = len(self.ids)
        if needed <= capacity:
            return
        while capacity < needed and not exact:
            capacity *= 2
        if exact or self.spec.rows is not None:
            capacity = max(needed, min(capacity, self.spec.rows or capacity))

        def grown(array: np.ndarray) -> np.ndarray:
            out = np.zeros((capacity, *array.shape[1:]), array.dtype)
            out[: self.count] = array[: self.count]
            return out

        self.ids, self.values, self.last_used = grown(self.ids), grown(self.values), grown(self.last_used)
        self.state = {key: grown(array) for key, array in self.state.items()}

    def create(self, ids: np.ndarray, values: np.ndarray | None = None) -> np.ndarray:
        """Make rows for ``ids`` (unique, none held yet) from their initial values
        (or ``values``), used now; returns their slots."""
        n = len(ids)
        self._grow(self.count + n)
        slots = np.arange(self.count, self.count + n, dtype=np.int64)
        self.ids[slots] = ids
        self.values[slots] = initial_rows(self.seed, self.name, ids, self.spec) if values is None else values
        self.last_used[slots] = self.updates
        for key, array in self.state.items():  # a row's state starts when the row does
            fill = self.optimizer.state_fill(key)
            if fill:
                array[slots] = fill
        if self._direct:
            self._slot_array[ids] = slots + 1
        else:
            self._slot_dict.update(zip(ids.tolist(), slots.tolist(), strict=True))
        self.count += n
        return slots

    def remove(self, mask: np.ndarray) -> None:
        """Remove the rows whose slots ``mask`` (over slots 0..count-1) marks, with
        their state: the last rows move into the slots they leave."""
        gone = np.flatnonzero(mask)
        if not len(gone):
            return
        n, k = self.count, len(gone)
        holes = gone[gone < n - k]  # slots to fill, below the new end
        tail = np.arange(n - k, n)
        movers = tail[~mask[n - k : n]]  # rows past the new end that stay
        gone_ids = self.ids[gone].copy()
        for array in (self.ids, self.values, self.last_used, *self.state.values()):
            array[holes] = array[movers]
        moved_ids = self.ids[holes]
        if self._direct:
            self._slot_array[gone_ids] = 0
            self._slot_array[moved_ids] = holes + 1
        else:
            for i in gone_ids.tolist():
                del self._slot_dict[i]
            self._slot_dict.update(zip(moved_ids.tolist(), holes.tolist(), strict=True))
        self.count = n - k
        # the freed rows read as zeros again (a row made there later starts afresh)
        for array in (self.values, *self.state.values()):
            array[self.count : n] = 0

    # -- requests --------------------------------------------------------------

    def check_ids(self, ids: np.ndarray, what: str) -> None:
        """INVALID_ARGUMENT unless ``ids`` are sorted, unique, in range and this shard's."""
        name = self.name
        if ids.dtype != np.int64 or ids.ndim != 1:
            raise _refuse(grpc.StatusCode.INVALID_ARGUMENT, f"{what} of table {name}: ids must be a 1-D int64 array")
        if len(ids) > MAX_IDS:
            raise _refuse(grpc.StatusCode.INVALID_ARGUMENT, f"{what} of table {name}: {len(ids)} ids exceed {MAX_IDS}")
        if not len(ids):
            return
        if (np.diff(ids) <= 0).any():
            raise _refuse(grpc.StatusCode.INVALID_ARGUMENT, f"{what} of table {name}: ids are not sorted and unique")
        limit = (self.spec.rows or 2**63) - 1
        if ids[0] < 0 or ids[-1] > limit:
            bad = int(ids[0] if ids[0] < 0 else ids[-1])
            raise _refuse(grpc.StatusCode.INVALID_ARGUMENT, f"{what} of table {name}: id {bad} is outside 0..{limit}")
        elsewhere = route(name, ids, self.shards) != self.shard
        if elsewhere.any():
            bad = int(ids[np.argmax(elsewhere)])
            raise _refuse(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{what} of table {name}: id {bad} belongs to another shard than {self.shard} of {self.shards}",
            )

    def check_push(self, block: RowBlock) -> None:
        self.check_ids(block.ids, "the push")
        if block.values.dtype != np.float32 or block.values.shape != (len(block.ids), self.spec.dim):
            raise _refuse(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the push of table {self.name}: rows of {block.values.dtype}{list(block.values.shape)}, the "
                f"table's are float32[{len(block.ids)}, {self.spec.dim}]",
            )

    def read(self, ids: np.ndarray) -> np.ndarray:
        """The values of ``ids`` (checked), now used: a row missing is made if the
        id is admitted (its ``admit_after``-th step), else reads as zeros."""
        slots = self.lookup(ids)
        missing = slots < 0
        if missing.any():
            admitted = missing.copy()
            if self.lifetime.admit_after > 1:
                admitted[missing] = self.waiting.counts_of(ids[missing]) >= self.lifetime.admit_after - 1
                self.waiting.drop(ids[admitted])
            slots[admitted] = self.create(ids[admitted])  # first: making rows may grow (replace) the arrays
            self.admitted += int(admitted.sum())
        held = slots >= 0
        self.last_used[slots[held]] = self.updates
        if held.all():
            return self.values[slots]
        out = np.zeros((len(ids), self.spec.dim), np.float32)
        out[held] = self.values[slots[held]]
        return out

    def plan(self, ids: np.ndarray, grads: np.ndarray) -> RowUpdate | None:
        """The update of rows ``ids`` (sorted, unique) by the mean gradient ``grads``,
        computed aside (see ``commit``); None when it is not finite. Under admission,
        the ids without a row wait (their gradients are dropped); otherwise a missing
        row (one that expired or was evicted since it was read) starts afresh."""
        slots = self.lookup(ids)
        missing = slots < 0
        waiting = np.zeros(0, np.int64)
        if missing.any() and self.lifetime.admit_after > 1:
            waiting = ids[missing]
            keep = ~missing
            ids, grads, slots, missing = ids[keep], grads[keep], slots[keep], missing[keep]
        present = slots.clip(0)
        rows = self.values[present]
        state = {k: v[present] for k, v in self.state.items()}
        if missing.any():
            rows[missing] = initial_rows(self.seed, self.name, ids[missing], self.spec)
            fresh = self.optimizer.initial_state(int(missing.sum()), self.spec.dim)
            for key in state:
                state[key][missing] = fresh[key]
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is caught just below
            new_rows, new_state = self.optimizer.apply(rows, state, grads, self.updates)
        if not (np.isfinite(new_rows).all() and all(np.isfinite(v).all() for v in new_state.values())):
            return None  # an overflowed state (an Adagrad sum of squares, say) would freeze its rows
        return RowUpdate(ids, slots, new_rows, new_state, waiting)

    def commit(self, update: RowUpdate | None) -> None:
        """Write a planned update (no other update of the table came between; None:
        the step did not touch the table), count the step, then let rows expire and
        keep the cap."""
        if update is not None:
            slots = update.slots
            missing = slots < 0
            if missing.any():
                slots = slots.copy()
                slots[missing] = self.create(update.ids[missing])
                self.admitted += int(missing.sum())
            self.values[slots] = update.rows
            for key, value in update.state.items():
                self.state[key][slots] = value
            self.last_used[slots] = self.updates
            self.waiting.used(update.waiting, self.updates)
        self.rows_touched = 0 if update is None else len(update.ids)
        self.updates += 1
        if not self.lifetime.default:
            self._age()

    def _age(self) -> None:
        """Rows untouched for ``expire_after`` steps go, then the least recently used
        past the cap; the ids waiting for admission are forgotten alike."""
        now, life = self.updates, self.lifetime
        if life.expire_after and self.count:
            stale = now - self.last_used[: self.count] > life.expire_after  # used at step now - 1: untouched 0 steps
            self.expired += int(stale.sum())
            self.remove(stale)
        if life.cap and self.count > life.cap:
            excess = self.count - life.cap
            self.evicted += excess
            self.remove(oldest(self.last_used[: self.count], self.ids[: self.count], excess))
        if life.admit_after > 1:
            self.waiting.forget(now, life.expire_after, life.cap)

    def nbytes(self) -> int:
        """Bytes of the rows held and their optimizer state."""
        per_row = self.values.itemsize * self.spec.dim + sum(a.itemsize * a.shape[1] for a in self.state.values())
        return self.count * per_row


__all__ = ["DIRECT_INDEX_ROWS", "MAX_IDS", "RowUpdate", "ShardTable"]
