"""A shard's part of the job's embedding tables: the rows routed to it, their
optimizer state, and the row-wise update.

Rows are made when first pulled or pushed, from their initial value (a pure
function of the seed, the table and the id), so the shard holds only rows that
were used. A table keeps its rows in contiguous arrays (values and each piece of
optimizer state, a row per slot, grown by doubling) and an index from id to slot:
a plain array for bounded tables, a dict for unbounded ids. Nothing is stored per
row beyond that: no Python object per row.

Every request is checked before anything changes: a table that is declared, ids
sorted, unique, in range and routed to this shard, rows of the table's width,
finite gradients; an update is computed aside and written only when it is finite.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, NamedTuple

import grpc
import numpy as np

from psfw.base.errors import WireError
from psfw.compute.row_optimizers import RowOptimizer
from psfw.compute.tables import TableSpec, check_table, check_table_optimizer, initial_rows, route
from psfw.protocol.messages import RowBlock

DIRECT_INDEX_ROWS = 1 << 28  # a bounded table up to this many rows indexes ids with an array (4 bytes per row)
MAX_IDS = 1 << 24  # per table and request


class RowUpdate(NamedTuple):
    """A table's update, computed but not written yet."""

    ids: np.ndarray
    slots: np.ndarray  # -1: a row to make
    rows: np.ndarray
    state: dict[str, np.ndarray]


def _refuse(code: grpc.StatusCode, message: str) -> WireError:
    return WireError(code, message)


def parse_tables(declaration: str) -> dict[str, Any]:
    """A Put's table declaration (JSON), checked; INVALID_ARGUMENT saying what is wrong."""
    try:
        tables = json.loads(declaration)
        if not isinstance(tables, dict):
            raise ValueError("not a JSON object of tables")
        out = {}
        for name, entry in tables.items():
            spec = TableSpec(entry["rows"], entry["dim"], entry["init"], entry["scale"])
            check_table(name, spec)
            out[name] = {
                **spec.describe(),
                "optimizer": check_table_optimizer(entry["optimizer"]),
                "seed": int(entry["seed"]),
                "materialize": bool(entry.get("materialize", False)) and spec.rows is not None,
            }
            if out[name]["materialize"] and spec.rows > DIRECT_INDEX_ROWS:
                raise ValueError(f"table {name}: materialize takes tables of up to 2^28 rows, it has {spec.rows}")
        return out
    except (ValueError, TypeError, KeyError, RecursionError) as err:
        raise _refuse(grpc.StatusCode.INVALID_ARGUMENT, f"the Put's table declaration: {err}") from None


class ShardTable:
    """The rows of one table that one shard holds."""

    def __init__(self, name: str, declared: dict[str, Any], shard: int, shards: int, make_rows: bool = True):
        self.name, self.declared, self.shard, self.shards = name, declared, shard, shards
        self.spec = TableSpec(declared["rows"], declared["dim"], declared["init"], declared["scale"])
        self.seed = declared["seed"]
        self.optimizer = RowOptimizer(declared["optimizer"])
        self.updates = 0  # updates applied (the step of global bias correction)
        self.rows_touched = 0  # by the last update
        self.count = 0  # rows held: slots 0..count-1
        dim = self.spec.dim
        capacity = 1024
        self.ids = np.zeros(capacity, np.int64)  # slot -> id
        self.values = np.zeros((capacity, dim), np.float32)
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

        self.ids, self.values = grown(self.ids), grown(self.values)
        self.state = {key: grown(array) for key, array in self.state.items()}

    def create(self, ids: np.ndarray, values: np.ndarray | None = None) -> np.ndarray:
        """Make rows for ``ids`` (unique, none held yet) from their initial values
        (or ``values``); returns their slots."""
        n = len(ids)
        self._grow(self.count + n)
        slots = np.arange(self.count, self.count + n, dtype=np.int64)
        self.ids[slots] = ids
        self.values[slots] = initial_rows(self.seed, self.name, ids, self.spec) if values is None else values
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

    def slots(self, ids: np.ndarray) -> np.ndarray:
        """The slots of ``ids``, making the rows that are missing."""
        slots = self.lookup(ids)
        missing = slots < 0
        if missing.any():
            slots[missing] = self.create(ids[missing])
        return slots

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
        """The values of ``ids`` (checked), making missing rows."""
        slots = self.slots(ids)  # first: making rows may grow (replace) the arrays
        return self.values[slots]

    def plan(self, ids: np.ndarray, grads: np.ndarray) -> RowUpdate | None:
        """The update of rows ``ids`` (sorted, unique) by the mean gradient ``grads``,
        computed aside (see ``commit``); None when it is not finite."""
        slots = self.lookup(ids)
        missing = slots < 0
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
        return RowUpdate(ids, slots, new_rows, new_state)

    def commit(self, update: RowUpdate) -> None:
        """Write a planned update (no other update of the table came between)."""
        slots = update.slots
        missing = slots < 0
        if missing.any():
            slots = slots.copy()
            slots[missing] = self.create(update.ids[missing])
        self.values[slots] = update.rows
        for key, value in update.state.items():
            self.state[key][slots] = value
        self.updates += 1
        self.rows_touched = len(update.ids)

    def nbytes(self) -> int:
        """Bytes of the rows held and their optimizer state."""
        per_row = self.values.itemsize * self.spec.dim + sum(a.itemsize * a.shape[1] for a in self.state.values())
        return self.count * per_row


class ShardTables:
    """Every table of the job, as far as one shard holds them."""

    def __init__(self, shard: int, shards: int):
        self.shard, self.shards = shard, shards
        self.declaration = ""  # JSON, from the first Put that declared tables
        self.tables: dict[str, ShardTable] = {}

    def declare(self, declaration: str, make_rows: bool = True) -> None:
        """Take on the job's tables (the first declaration fixes them; the same again
        is acknowledged, another one refused). ``make_rows``: make the rows of a
        materialized table now (not when a checkpoint's rows are about to come)."""
        declared = parse_tables(declaration)
        if self.declaration:
            if json.loads(self.declaration) != declared:
                raise _refuse(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"shard {self.shard} holds other embedding tables than the Put declares: tables are declared "
                    "once, by the job that made them",
                )
            return
        self.tables = {n: ShardTable(n, d, self.shard, self.shards, make_rows) for n, d in declared.items()}
        self.declaration = json.dumps(declared, sort_keys=True)

    def table(self, name: str) -> ShardTable:
        table = self.tables.get(name)
        if table is None:
            known = ", ".join(sorted(self.tables)) or "none"
            raise _refuse(
                grpc.StatusCode.NOT_FOUND,
                f"shard {self.shard} has no embedding table {name!r} (it has {known}): has the job's owner put it?",
            )
        return table

    def check_pull(self, pull: Mapping[str, np.ndarray]) -> None:
        for name, ids in pull.items():
            self.table(name).check_ids(ids, "the pull")

    def check_push(self, push: Mapping[str, RowBlock]) -> str | None:
        """Check a push; returns the first table whose gradient is not finite (for
        the caller's policy), None when all are."""
        bad = None
        for name, block in push.items():
            self.table(name).check_push(block)
            if bad is None and not np.isfinite(block.values).all():
                bad = name
        return bad

    def read(self, pull: Mapping[str, np.ndarray]) -> dict[str, RowBlock]:
        return {name: RowBlock(ids, self.tables[name].read(ids)) for name, ids in pull.items()}

    def plan(self, pushes: list[Mapping[str, RowBlock]], rows: float) -> dict[str, RowUpdate] | None:
        """The update of every table by a group step's pushes (gradient sums x rows,
        divided here by the group's ``rows``); None when one is not finite."""
        plans = {}
        for name, block in merge_pushes(pushes).items():
            plan = self.tables[name].plan(block.ids, block.values / np.float32(rows))
            if plan is None:
                return None
            plans[name] = plan
        return plans

    def commit(self, plans: Mapping[str, RowUpdate]) -> None:
        """Write the plans of a group step; every table counts the step, touched or
        not, so that each shard counts the same updates (global bias correction)."""
        for name, plan in plans.items():
            self.tables[name].commit(plan)
        for name in self.tables.keys() - plans.keys():
            table = self.tables[name]
            table.rows_touched = 0
            table.updates += 1

    def nbytes(self) -> int:
        return sum(t.nbytes() for t in self.tables.values())

    def digest_into(self, h: Any) -> None:
        """Add every row held, its state and each table's update count to hash ``h``
        (in id order: equal for equal rows, whatever the order they were made in)."""
        for name, table in sorted(self.tables.items()):
            order = np.argsort(table.ids[: table.count], kind="stable")
            h.update(repr((name, table.updates)).encode())
            h.update(table.ids[: table.count][order].tobytes())
            h.update(table.values[: table.count][order].tobytes())
            for key in sorted(table.state):
                h.update(table.state[key][: table.count][order].tobytes())

    def snapshot(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The rows held, as tensors (copies: the arrays change in place) and JSON."""
        tensors: dict[str, np.ndarray] = {}
        meta: dict[str, Any] = {"declaration": self.declaration, "updates": {}}
        for name, table in self.tables.items():
            n = table.count
            tensors[f"table/{name}/ids"] = table.ids[:n].copy()
            tensors[f"table/{name}/values"] = table.values[:n].copy()
            for key, array in table.state.items():
                tensors[f"table/{name}/state/{key}"] = array[:n].copy()
            meta["updates"][name] = table.updates
        return tensors, meta

    @classmethod
    def load(cls, shard: int, shards: int, tensors: Mapping[str, np.ndarray], meta: dict[str, Any]) -> ShardTables:
        """Tables from a snapshot (see ``snapshot``); a checkpoint without tables gives none."""
        tables = cls(shard, shards)
        if not meta or not meta.get("declaration"):
            return tables
        tables.declare(meta["declaration"], make_rows=False)  # the rows come from the checkpoint
        for name, table in tables.tables.items():
            ids = np.asarray(tensors[f"table/{name}/ids"], np.int64)
            if len(ids):
                table._grow(len(ids), exact=True)
                slots = table.create(ids, tensors[f"table/{name}/values"])
                for key in table.state:
                    table.state[key][slots] = tensors[f"table/{name}/state/{key}"].reshape(len(ids), -1)
            table.updates = int(meta["updates"][name])
        return tables


def merge_pushes(pushes: list[Mapping[str, RowBlock]]) -> dict[str, RowBlock]:
    """Every contribution's rows of each table added up: sorted unique ids and the
    gradient sum of each (contributions in the order given)."""
    merged: dict[str, RowBlock] = {}
    names = sorted({name for push in pushes for name in push})
    for name in names:
        blocks = [push[name] for push in pushes if name in push]
        if len(blocks) == 1:
            merged[name] = blocks[0]
            continue
        ids, inverse = np.unique(np.concatenate([b.ids for b in blocks]), return_inverse=True)
        sums = np.zeros((len(ids), blocks[0].values.shape[1]), np.float32)
        start = 0
        for block in blocks:  # a block's ids are unique; one block at a time fixes the order of the additions
            sums[inverse[start : start + len(block.ids)]] += block.values
            start += len(block.ids)
        merged[name] = RowBlock(ids, sums)
    return merged
