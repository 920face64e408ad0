"""Which embedding-table rows a worker process needs each step, and where they live.

A process's workers read known rows of the data each step (the batch order is
fixed by the seed), so the rows of their sub-batches' ids are known before the
step: the stub pulls them once per process (deduplicated over its workers), split
by shard, and pulls the next step's with the answer to this step's update. The
workers then look their ids up in that one block (``RowBlock`` of sorted ids), and
each hands back a gradient for every row of it; the stub adds them up and pushes,
to each shard, the rows of that shard the step used.
"""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from psfw.base.errors import PsfwError
from psfw.compute.tables import TableSpec, bucket, route, unique_ids
from psfw.protocol.messages import RowBlock, TableIds, TableRows, UpdateHeader

EMPTY = np.zeros(0, np.int64)


class TableFeed:
    """The rows of ``tables`` one worker process needs.

    ``batch_ids(step)``: the ids its workers' sub-batches of ``step`` use, by table
    (any shape, repeats allowed); ``steps``: the job's steps (none are trained at
    or after it). ``extra``: ids wanted also at the steps ``extra_due`` says (the
    test split's, for an evaluation); they are pulled, never pushed.
    """

    def __init__(
        self,
        tables: Mapping[str, TableSpec],
        batch_ids: Callable[[int], dict[str, Any]],
        shards: int,
        steps: int,
        declaration: dict[str, Any],
        extra: TableIds | None = None,
        extra_due: Callable[[int], bool] | None = None,
    ):
        self.tables, self.batch_ids, self.shards, self.steps = dict(tables), batch_ids, shards, steps
        self.declaration = json.dumps(declaration, sort_keys=True)
        self.extra, self.extra_due = dict(extra or {}), extra_due
        self._train: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self.traffic = {"rows_pulled": 0, "rows_pushed": 0, "row_bytes": 0}  # table rows moved, both ways

    def train_ids(self, step: int) -> dict[str, np.ndarray]:
        """The sorted unique ids the process's workers use at ``step``, by table."""
        known = self._train.get(step)
        if known is None:
            if step >= self.steps:
                known = {name: EMPTY for name in self.tables}
            else:
                used = self.batch_ids(step)
                known = {name: unique_ids([used[name]]) for name in self.tables}
            self._train[step] = known
            while len(self._train) > 4:  # this step, the next, and a re-sync's
                self._train.popitem(last=False)
        return known

    def _extra_due(self, step: int) -> bool:
        return bool(self.extra) and self.extra_due is not None and self.extra_due(step)

    def block_ids(self, step: int) -> dict[str, np.ndarray]:
        """The ids of the rows pulled for ``step``: its training ids, and the extra
        ids when they are due then (one pull serves both)."""
        ids = self.train_ids(step)
        if self._extra_due(step):
            ids = {name: unique_ids([ids[name], self.extra.get(name, EMPTY)]) for name in self.tables}
        return ids

    def published(self, step: int, rows: TableRows) -> tuple[dict[str, RowBlock], dict[str, RowBlock] | None]:
        """The rows pulled for ``step`` as the cache publishes them: the workers' block
        (the training ids only, so its size never jumps at an evaluation) and, when
        due, the evaluation's (else None)."""
        test_rows = _subset(rows, self.extra) if self._extra_due(step) else None
        return _subset(rows, self.train_ids(step)), test_rows

    def by_shard(self, ids: TableIds) -> list[dict[str, np.ndarray]]:
        """``ids`` split by the shard that holds them (each part sorted)."""
        parts: list[dict[str, np.ndarray]] = [{} for _ in range(self.shards)]
        for name, table_ids in ids.items():
            owners = route(name, table_ids, self.shards)
            for shard in range(self.shards):
                mine = table_ids[owners == shard]
                if len(mine):
                    parts[shard][name] = mine
        return parts

    def pushes(self, step: int, sums: Mapping[str, np.ndarray]) -> list[dict[str, RowBlock]]:
        """The gradient sums of the workers' block of ``step`` (``sums[table]``: a row
        per id of ``train_ids(step)``), by shard."""
        train = self.train_ids(step)
        parts: list[dict[str, RowBlock]] = [{} for _ in range(self.shards)]
        for name in self.tables:
            ids, grads = train[name], sums[name]
            owners = route(name, ids, self.shards)
            for shard in range(self.shards):
                mine = owners == shard
                if mine.any():
                    parts[shard][name] = RowBlock(ids[mine], np.ascontiguousarray(grads[mine]))
        return parts

    def headers(self, header: UpdateHeader, step: int, row_grads: list[Mapping[str, np.ndarray]]) -> list[UpdateHeader]:
        """Each shard's Update header of ``step``: with the step's gradient sums of
        that shard's rows (``row_grads``: each worker's, a gradient of every row of
        its block by table), and the next step's rows wanted."""
        sums = {}
        for name in self.tables:
            parts = [g[name] for g in row_grads]
            sums[name] = parts[0] if len(parts) == 1 else np.sum(parts, axis=0, dtype=np.float32)
        pushes = self.pushes(step, sums)
        pulls = self.by_shard(self.block_ids(step + 1))
        for push in pushes:
            self.count(push, pulled=False)
        self.traffic["row_bytes"] += sum(ids.nbytes for pull in pulls for ids in pull.values())  # the ids asked for
        return [dataclasses.replace(header, push=push, pull=pull) for push, pull in zip(pushes, pulls, strict=True)]

    def count(self, rows: TableRows, pulled: bool) -> None:
        """Add rows moved to ``traffic``."""
        self.traffic["rows_pulled" if pulled else "rows_pushed"] += sum(len(b.ids) for b in rows.values())
        self.traffic["row_bytes"] += sum(b.ids.nbytes + b.values.nbytes for b in rows.values())

    def assemble(self, answers: list[TableRows]) -> dict[str, RowBlock]:
        """One block per table from every shard's rows, in id order."""
        out = {}
        for name, spec in self.tables.items():
            blocks = [a[name] for a in answers if name in a]
            if not blocks:
                out[name] = RowBlock(EMPTY, np.zeros((0, spec.dim), np.float32))
                continue
            ids = np.concatenate([b.ids for b in blocks])
            values = np.concatenate([b.values for b in blocks])
            order = np.argsort(ids, kind="stable")
            out[name] = RowBlock(ids[order], values[order])
        return out


def _subset(rows: Mapping[str, RowBlock], ids: TableIds) -> dict[str, RowBlock]:
    """The rows of ``ids`` (sorted, all present in ``rows``), by table."""
    out = {}
    for name, block in rows.items():
        wanted = ids.get(name, EMPTY)
        if len(wanted) == len(block.ids):
            out[name] = block
        else:
            out[name] = RowBlock(wanted, block.values[np.searchsorted(block.ids, wanted)])
    return out


def padded_rows(blocks: Mapping[str, RowBlock]) -> dict[str, np.ndarray]:
    """Each table's block of rows padded with zero rows to a bucket size (a jitted
    step compiles once per size, not once per batch)."""
    out = {}
    for name, block in blocks.items():
        rows = np.zeros((bucket(len(block.ids)), block.values.shape[1]), np.float32)
        rows[: len(block.ids)] = block.values
        out[name] = rows
    return out


def positions(blocks: Mapping[str, RowBlock], used: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The row of each id of ``used`` (by table, any shape) in its table's block."""
    out = {}
    for name, block in blocks.items():
        ids = np.asarray(used[name])
        where = np.searchsorted(block.ids, ids)
        if ids.size and (where.max() >= len(block.ids) or (block.ids[where] != ids).any()):
            raise PsfwError(
                f"table {name}: the batch uses ids that its step's rows lack: does the model's ids(x) give the same "
                "ids for the same rows every time?"
            )
        out[name] = where.astype(np.int32)
    return out
