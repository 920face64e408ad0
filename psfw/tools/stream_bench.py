"""``psfw bench --sparse --stream``: a table that runs for months, in minutes.

A stream of events (``psfw.tools.event_stream``: a Zipf head and a uniform tail,
about ``distinct`` distinct ids) drives 2 shard processes on this host (over their
links) through one simulated worker process: each step it pulls the rows of the
step's unique ids (a Get) and pushes a gradient for them (an Update: every event
of an id adds 1 to each of its values' gradients), with no model compute. The table
is declared as a job declares it (``Job.table_declaration``: 16-wide rows,
unbounded ids, Adagrad) with ``admit_after``, ``expire_after`` and ``max_rows``.

The stream runs twice: under the cap, and without it (``max_rows`` 0, the same
expiry) over its first ``uncapped_events`` events, so that the run without a cap
stays within the machine's memory. Every ``sample_every`` steps each shard's RSS
(``VmRSS``) and its Describe (rows held, ids waiting, rows admitted, expired and
evicted) are recorded. At the end, the frequent ids: the share of the head's 1000
most frequent ids (of a head under 10,000 ids, its tenth) that hold a row.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import numpy as np

from psfw.compute.tables import TableSpec, check_table_optimizer, initial_rows, route
from psfw.jobs.optimizer_config import TableLifetimeConfig
from psfw.protocol.messages import GetHeader, RowBlock, UpdateHeader
from psfw.tools.event_stream import EventStream

EVENTS = 50_000_000
DISTINCT = 20_000_000
MAX_ROWS = 1_000_000
EXPIRE_AFTER = 2_000  # steps: 8.2M events
UNCAPPED_EVENTS = 10_000_000  # past EXPIRE_AFTER steps, where expiry alone bounds the rows
BATCH = 4096  # events a step
DIM = 16
SHARDS = 2
TOP = 1000  # the head's most frequent ids checked for a row at the end (at most a tenth of the head)
TABLE = "events"
SEED = 0


def declaration(admit_after: int, expire_after: int, max_rows: int) -> dict[str, Any]:
    """The table as ``Job.table_declaration`` declares it to the shards."""
    spec = TableSpec(rows=None, dim=DIM)
    lifetime = TableLifetimeConfig(admit_after=admit_after, expire_after=expire_after, max_rows=max_rows)
    return {
        TABLE: {
            **spec.describe(),
            "optimizer": check_table_optimizer({"name": "adagrad", "learning_rate": 0.05}),
            "seed": SEED,
            "materialize": False,
            **lifetime.declared(),
        }
    }


def top_ids(stream: EventStream) -> int:
    """How many of the head's most frequent ids are checked for a row at the end."""
    return min(TOP, max(1, stream.head_ids // 10))


def no_slices(key):  # the job has no dense parameters: no slice is ever expected
    raise AssertionError(f"no slice was asked for, {key} came")


class StreamWorker:
    """One simulated worker process: the stream's steps against ``clients`` (one per
    shard), each step a pull and a push per shard."""

    def __init__(self, clients: list, stream: EventStream):
        self.clients, self.stream = clients, stream
        self.step = 0
        self.row_bytes = 0  # ids asked for, rows pulled, rows pushed
        self.seen = np.zeros(stream.range, bool)  # which ids the events used

    def parts(self, ids: np.ndarray) -> list[np.ndarray]:
        owners = route(TABLE, ids, len(self.clients))
        return [ids[owners == shard] for shard in range(len(self.clients))]

    async def pull(self, ids: np.ndarray) -> list[np.ndarray]:
        """The values of ``ids`` (sorted, unique), by shard, once the group completed
        ``self.step`` steps."""
        parts = self.parts(ids)
        answers = await asyncio.gather(
            *(
                c.get(GetHeader(0, self.step, [], wait_s=120, pull={TABLE: part}), no_slices)
                for c, part in zip(self.clients, parts, strict=True)
            )
        )
        values = [
            a.table_rows[TABLE].values if len(part) else np.zeros((0, DIM), np.float32)
            for a, part in zip(answers, parts, strict=True)
        ]
        self.row_bytes += sum(p.nbytes * 2 + v.nbytes for p, v in zip(parts, values, strict=True))
        return values

    async def run_step(self, events: np.ndarray) -> None:
        """Pull the rows of the step's ids, push the gradient of its events."""
        self.seen[events] = True
        ids, counts = np.unique(events, return_counts=True)
        await self.pull(ids)
        grads = np.repeat(counts.astype(np.float32)[:, None], DIM, axis=1)
        owners = route(TABLE, ids, len(self.clients))
        pushes = []
        for shard in range(len(self.clients)):
            mine = owners == shard
            pushes.append({TABLE: RowBlock(ids[mine], grads[mine])} if mine.any() else {})
        self.row_bytes += sum(b.ids.nbytes + b.values.nbytes for p in pushes for b in p.values())
        await asyncio.gather(
            *(
                c.update(
                    UpdateHeader(
                        group=0,
                        step=self.step,
                        process=0,
                        workers=1,
                        rows=len(events),
                        workers_per_group=1,
                        wait_s=120,
                        push=push,
                    ),
                    {},
                    no_slices,
                )
                for c, push in zip(self.clients, pushes, strict=True)
            )
        )
        self.step += 1

    async def tables(self) -> list[Any]:
        """Each shard's Describe of the table."""
        replies = await asyncio.gather(*(c.describe() for c in self.clients))
        return [next(t for t in r.tables if t.name == TABLE) for r in replies]

    async def held_share(self, ids: np.ndarray) -> float:
        """The share of ``ids`` that hold a row. A row held was trained (every row is
        pushed at its step), so its value is neither zeros (an id waiting) nor its
        initial value (a row this pull made): ask for them, compare. Pulling makes
        rows: ask last."""
        values = await self.pull(ids)
        spec = TableSpec(rows=None, dim=DIM)
        held = 0
        for part, got in zip(self.parts(ids), values, strict=True):
            fresh = initial_rows(SEED, TABLE, part, spec)
            held += int(((got != fresh).any(axis=1) & (got != 0).any(axis=1)).sum())
        return held / len(ids)


async def _drive(addresses: list[str], pids: list[int], stream: EventStream, events: int, rules: dict, every: int):
    """Run the first ``events`` events of ``stream`` through the shards at
    ``addresses``; the samples, the final counts and the frequent ids' share."""
    from psfw.jobs.shard_processes import rss_bytes
    from psfw.runtime.shard_client import ShardClient

    clients = [ShardClient(a, i, timeout_s=120) for i, a in enumerate(addresses)]
    try:
        for client in clients:
            await client.open_link()  # the link on this host: its Unix socket
        sgd = json.dumps({"name": "sgd", "learning_rate": 0.01})
        await asyncio.gather(*(c.put([], sgd, "", json.dumps(declaration(**rules), sort_keys=True)) for c in clients))
        worker = StreamWorker(clients, stream)
        samples: list[dict[str, Any]] = []

        async def sample() -> None:
            tables = await worker.tables()
            samples.append(
                {
                    "step": worker.step,
                    "rss_mb": [round(rss_bytes(pid, "VmRSS") / 2**20, 1) for pid in pids],
                    "rows_held": [t.rows_held for t in tables],
                    "ids_waiting": [t.ids_waiting for t in tables],
                    "counts": [(t.rows_admitted, t.rows_expired, t.rows_evicted) for t in tables],
                }
            )

        await sample()
        started = time.perf_counter()
        while stream.made < events:
            await worker.run_step(stream.next_batch(until=events))
            if worker.step % every == 0:
                await sample()
        seconds = time.perf_counter() - started
        if samples[-1]["step"] != worker.step:
            await sample()
        return {
            "samples": samples,
            "seconds": seconds,
            "steps": worker.step,
            "path": clients[0].kind,  # link (unix): the link on this host
            "row_bytes": worker.row_bytes,
            "distinct_seen": int(worker.seen.sum()),
            "peak_rss_mb": [round(rss_bytes(pid) / 2**20, 1) for pid in pids],
            "head_held_share": await worker.held_share(stream.top(top_ids(stream))),
        }
    finally:
        for c in clients:
            await c.close()


def _run(stream: EventStream, events: int, rules: dict, every: int | None) -> dict[str, Any]:
    """One run of the first ``events`` events of ``stream`` against 2 fresh shard processes."""
    from psfw.jobs.shard_processes import shard_processes

    every = every or max(1, -(-events // stream.batch) // 200)
    with shard_processes(SHARDS) as (addresses, procs):
        return asyncio.run(_drive(addresses, [p.pid for p in procs], stream, events, rules, every))


def run_stream(
    events: int = EVENTS,
    distinct: int = DISTINCT,
    max_rows: int = MAX_ROWS,
    expire_after: int = EXPIRE_AFTER,
    admit_after: int = 1,
    uncapped_events: int | None = None,
    sample_every: int | None = None,
    seed: int = SEED,
    batch: int = BATCH,
) -> dict[str, Any]:
    """The stream of ``events`` (``batch`` a step) under the cap of ``max_rows``, and
    its first ``uncapped_events`` without a cap (None: ``UNCAPPED_EVENTS``, or every
    event of a shorter stream; 0: not run); a sample every
    ``sample_every`` steps (None: about 200 a run). The figures, by run (``capped``,
    ``uncapped``)."""
    if uncapped_events is None:
        uncapped_events = min(UNCAPPED_EVENTS, events)
    if uncapped_events > events:
        raise ValueError(
            f"--uncapped-events {uncapped_events:,}: at most --events ({events:,}), a prefix of its stream"
        )
    stream = EventStream(events, distinct, batch, seed)  # one it cannot make is refused before anything starts
    figures: dict[str, Any] = {
        "stream_events": events,
        "stream_distinct": distinct,
        "stream_batch": batch,
        "stream_head_ids": stream.head_ids,
        "stream_top_ids": top_ids(stream),
        "stream_dim": DIM,
        "stream_shards": SHARDS,
        "stream_admit_after": admit_after,
        "stream_expire_after": expire_after,
    }
    runs = [("capped", max_rows, events)]
    if uncapped_events:
        runs.append(("uncapped", 0, uncapped_events))
    for name, cap, count in runs:
        rules = {"admit_after": admit_after, "expire_after": expire_after, "max_rows": cap}
        got = _run(EventStream(events, distinct, batch, seed), count, rules, sample_every)
        samples, key = got["samples"], f"stream_{name}_"
        figures.update(
            {
                key + "events": count,
                key + "max_rows": cap,
                key + "shard_cap": -(-cap // SHARDS),
                key + "steps": got["steps"],
                key + "seconds": round(got["seconds"], 1),
                key + "steps_per_s": round(got["steps"] / got["seconds"], 1),  # samples included
                key + "path": got["path"],
                key + "bytes_per_step": int(got["row_bytes"] / got["steps"]),
                key + "distinct_ids": got["distinct_seen"],
                key + "sample_steps": [s["step"] for s in samples],
                key + "rss_mb": [s["rss_mb"] for s in samples],
                key + "rows_held": [s["rows_held"] for s in samples],
                key + "ids_waiting": [s["ids_waiting"] for s in samples],
                key + "admitted": [c[0] for c in samples[-1]["counts"]],
                key + "expired": [c[1] for c in samples[-1]["counts"]],
                key + "evicted": [c[2] for c in samples[-1]["counts"]],
                key + "peak_rss_mb": got["peak_rss_mb"],
                key + "head_held_share": round(got["head_held_share"], 4),
            }
        )
    return figures


__all__ = ["run_stream"]
