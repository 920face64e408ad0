"""Whole parameters from the shards that hold their slices, and table rows from
the shards that hold them."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np

from psfw.base.errors import ConfigError, ShardError
from psfw.protocol.layout import Layout, SliceKey
from psfw.protocol.messages import GetHeader, RowBlock, TableIds
from psfw.protocol.row_wire import PULL_IDS
from psfw.protocol.wire import param_buffers
from psfw.runtime.table_feed import TableFeed
from psfw.runtime.transport import Transport


async def put_params(clients: list[Transport], layout: Layout, values: dict, optimizer: str, job: str) -> int:
    """Put whole parameters' initial ``values`` to the shards that hold their slices
    (one Put per shard; ``optimizer`` and ``job``, JSON, name them); returns the Puts
    made. A Put the shards refuse as invalid is the config's fault: ConfigError."""
    by_shard: dict[int, list] = {}
    for name, value in values.items():
        flat = np.asarray(value).reshape(-1)
        for s in layout.params[name].slices:
            by_shard.setdefault(s.shard, []).append((name, s.index, flat[s.start : s.stop]))
    try:
        await asyncio.gather(*(clients[i].put(items, optimizer, job) for i, items in by_shard.items()))
    except ShardError as err:
        if err.code == grpc.StatusCode.INVALID_ARGUMENT:  # what the config asks for, not a fault of the shards
            raise ConfigError(f"the shards refuse this job's first Put: {err}") from None
        raise
    return len(by_shard)


async def fetch_params(
    clients: list[Transport],
    layout: Layout,
    group: int,
    step: int,
    names: list[str],
    wait_s: float,
    wait_for_put: bool = False,
    job: str = "",
) -> dict[str, np.ndarray]:
    """Whole parameters ``names`` once ``group`` has completed ``step`` steps: one
    Get per shard, all shards at once. With ``wait_for_put``, the shards wait (up to
    ``wait_s``) for slices whose owners in other worker processes have not put them yet.
    ``job``: the job's fingerprint (shards of another job refuse)."""
    by_shard: dict[int, list[SliceKey]] = {}
    for name in names:
        for s in layout.params[name].slices:
            by_shard.setdefault(s.shard, []).append((name, s.index))
    params, into = param_buffers(layout, names)

    async def fetch(shard: int, keys: list[SliceKey]) -> None:
        wanted = GetHeader(group, step, keys, wait_s, wait_for_put, job)
        await clients[shard].get(wanted, layout.slice_dtype_shape, into)

    await asyncio.gather(*(fetch(i, keys) for i, keys in by_shard.items()))
    return params


async def fetch_rows(
    clients: list[Transport],
    tables: TableFeed,
    ids: TableIds,
    group: int,
    step: int,
    wait_s: float,
    job: str = "",
) -> dict[str, RowBlock]:
    """Table rows ``ids`` (sorted unique, by table) once ``group`` has completed
    ``step`` steps: one Get per shard that holds any of them, all at once; the
    shards wait (up to ``wait_s``) for the tables to be declared. Returns one
    block per table, in id order."""

    async def fetch(shard: int, part: dict[str, np.ndarray]) -> dict[str, RowBlock]:
        reply = await clients[shard].get(GetHeader(group, step, [], wait_s, True, job, part), _no_slices)
        return reply.table_rows

    gets = row_gets(tables, ids)
    return tables.assemble(await asyncio.gather(*(fetch(shard, part) for shard, part in gets)))


def row_gets(tables: TableFeed, ids: TableIds) -> list[tuple[int, dict[str, np.ndarray]]]:
    """The Gets that pull ``ids``: one per shard that holds any, more where a shard's
    ids exceed ``PULL_IDS`` (a request stays far below gRPC's message limit)."""
    gets: list[tuple[int, dict[str, np.ndarray]]] = []
    for shard, part in enumerate(tables.by_shard(ids)):
        request: dict[str, np.ndarray] = {}
        room = PULL_IDS
        for name, table_ids in part.items():
            start = 0
            while start < len(table_ids):
                if not room:
                    gets.append((shard, request))
                    request, room = {}, PULL_IDS
                piece = table_ids[start : start + room]
                request[name] = piece
                room -= len(piece)
                start += len(piece)
        if request:
            gets.append((shard, request))
    return gets


def _no_slices(key: SliceKey):
    raise KeyError(key)  # a Get of rows alone asks for no slice
