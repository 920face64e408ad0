"""A shard's part of the job's embedding tables: each table's rows routed to it
(``psfw.services.table_rows``), their declaration, a group step's update of all of
them, and their snapshot.

Every request is checked before anything changes: a table that is declared, ids
sorted, unique, in range and routed to this shard, rows of the table's width,
finite gradients; an update is computed aside and written only when it is finite.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import grpc
import numpy as np

from psfw.base.errors import WireError
from psfw.compute.tables import TableSpec, check_table, check_table_optimizer
from psfw.protocol.messages import RowBlock
from psfw.services.table_lifetime import WaitingIds
from psfw.services.table_rows import DIRECT_INDEX_ROWS, RowUpdate, ShardTable

LIFETIME_KEYS = ("admit_after", "expire_after", "max_rows")  # in a declaration only where not their defaults


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
                **_lifetime(name, entry),
            }
            if out[name]["materialize"] and spec.rows > DIRECT_INDEX_ROWS:
                raise ValueError(f"table {name}: materialize takes tables of up to 2^28 rows, it has {spec.rows}")
            if out[name]["materialize"] and any(key in out[name] for key in LIFETIME_KEYS):
                raise ValueError(
                    f"table {name}: materialize makes every row at the start, which admission, expiry "
                    "and a cap would undo"
                )
        return out
    except (ValueError, TypeError, KeyError, RecursionError) as err:
        raise _refuse(grpc.StatusCode.INVALID_ARGUMENT, f"the Put's table declaration: {err}") from None


def _lifetime(name: str, entry: dict[str, Any]) -> dict[str, int]:
    """A declaration's admission, expiry and cap, where they are not the defaults
    (1, 0, 0): a declaration of today's rules reads as one made before they existed."""
    out = {}
    for key, default, low in (("admit_after", 1, 1), ("expire_after", 0, 0), ("max_rows", 0, 0)):
        value = entry.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= 2**62:
            raise ValueError(f"table {name}: {key} {value!r} must be a whole number from {low}")
        if value != default:
            out[key] = value
    return out


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
        not, so that each shard counts the same updates (global bias correction, and
        the clock of admission and expiry)."""
        for name, table in self.tables.items():
            table.commit(plans.get(name))

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
            if not table.lifetime.default:  # when each row was last used, and who waits: what comes next depends on it
                h.update(table.last_used[: table.count][order].tobytes())
                for array in (table.waiting.ids, table.waiting.counts, table.waiting.seen):
                    h.update(array.tobytes())

    def snapshot(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The rows held, as tensors (copies: the arrays change in place) and JSON."""
        tensors: dict[str, np.ndarray] = {}
        meta: dict[str, Any] = {"declaration": self.declaration, "updates": {}, "lifetime": {}}
        for name, table in self.tables.items():
            n = table.count
            tensors[f"table/{name}/ids"] = table.ids[:n].copy()
            tensors[f"table/{name}/values"] = table.values[:n].copy()
            for key, array in table.state.items():
                tensors[f"table/{name}/state/{key}"] = array[:n].copy()
            meta["updates"][name] = table.updates
            if not table.lifetime.default:
                tensors[f"table/{name}/last_used"] = table.last_used[:n].copy()
                tensors.update(table.waiting.snapshot(f"table/{name}/waiting"))
                meta["lifetime"][name] = {
                    "admitted": table.admitted,
                    "expired": table.expired,
                    "evicted": table.evicted,
                }
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
            # a checkpoint from before last uses were kept: every row counts as used now
            used = tensors.get(f"table/{name}/last_used")
            table.last_used[: len(ids)] = table.updates if used is None else np.asarray(used, np.int64)
            table.waiting = WaitingIds.load(tensors, f"table/{name}/waiting")
            counts = meta.get("lifetime", {}).get(name, {})
            table.admitted, table.expired, table.evicted = (
                int(counts.get(k, 0)) for k in ("admitted", "expired", "evicted")
            )
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
