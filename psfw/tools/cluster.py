"""A client script's view of a running cluster: describe the shards, read
parameters by name, follow the progress.

    async with Cluster(["127.0.0.1:50051", "127.0.0.1:50052"], config) as cluster:
        print(await cluster.status())
        w = await cluster.read("dense0/w")
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import numpy as np

from psfw.base.errors import PsfwError, UsageError
from psfw.base.security import NO_SECURITY, Security
from psfw.jobs.config import Config
from psfw.jobs.job import build_job
from psfw.proto import ps_pb2 as pb
from psfw.runtime.connect import wiring_problem
from psfw.runtime.fetch import fetch_params
from psfw.runtime.shard_client import ShardClient


class Cluster:
    """A client script's view of a running cluster: channels to every shard, to
    describe them, read parameters by name and follow the progress. An async
    context manager; ``close`` ends the channels.

    Args:
        addresses: ``host:port`` of every shard, in the order of their ``--shard``.
        config: the job's config; needed only to read parameters, whose layout it
            defines.
        timeout_s: the deadline of each call to a shard.
        security: TLS and token of the channels (``psfw.base.security``).

    Raises:
        UsageError: no addresses.

    Example::

        async with psfw.Cluster(["127.0.0.1:50051", "127.0.0.1:50052"], config) as cluster:
            print(psfw.format_status(await cluster.status()))
            w = await cluster.read("dense0/w")
    """

    def __init__(
        self,
        addresses: list[str],
        config: Config | None = None,
        timeout_s: float = 10.0,
        security: Security = NO_SECURITY,
    ):
        if not addresses:
            raise UsageError("no shard addresses given: pass host:port of every shard, comma-separated")
        self.addresses = list(addresses)
        self.config = config
        self.clients = [
            ShardClient(a, i, timeout_s=timeout_s, retries=2, security=security) for i, a in enumerate(addresses)
        ]
        self._job = None

    async def __aenter__(self) -> Cluster:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients))

    async def describe(self) -> list[pb.DescribeReply]:
        """Every shard's Describe answer (``ps.proto``'s ``DescribeReply``), in order."""
        return list(await asyncio.gather(*(c.describe() for c in self.clients)))

    async def read(self, name: str, group: int = 0) -> np.ndarray:
        """The value of a parameter as the shards hold it now.

        Args:
            name: the parameter (``"dense0/w"``).
            group: the group whose step is read (its newest complete step).

        Returns:
            The whole parameter, put together from its slices.

        Raises:
            PsfwError: no config was given, or the job has no such parameter.
        """
        if self.config is None:
            raise PsfwError("reading a parameter needs the job's config (its layout says where the slices are)")
        if self._job is None:
            self._job = build_job(self.config)
        layout = self._job.layout
        if name not in layout.params:
            raise PsfwError(f"no parameter {name!r}; the job has {', '.join(layout.params)}")
        step = min(_group_steps(await self.describe()).get(group, 0), self._job.steps)
        values = await fetch_params(self.clients, layout, group, step, [name], wait_s=self.clients[0].timeout_s)
        return values[name]

    async def status(self, interval_s: float = 1.0) -> list[dict[str, Any]]:
        """Where each shard stands, described twice ``interval_s`` apart.

        Args:
            interval_s: the time the update rate is measured over (0: no rate).

        Returns:
            One dict per shard: ``shard``, ``address``, ``problem`` (a wiring
            problem, or ''), ``keys``, ``slices``, ``bytes``, ``versions`` (min,
            max), ``groups`` (group -> completed steps), ``gone`` (the groups the
            shard no longer counts: no Update for the job's
            ``cluster.group_timeout_s``), ``pending`` (group ->
            worker processes of its open step), ``updates_per_s``,
            ``updates_applied``, ``job``, ``tables`` (name -> rows, bytes, updates,
            rows admitted, expired and evicted, ids waiting for admission) and
            ``resharded`` (``{"step", "from"}``: the checkpoint it restored was made on
            ``from`` shards and re-cut for this count; None when not).
        """
        first, started = await self.describe(), time.monotonic()
        if interval_s > 0:
            await asyncio.sleep(interval_s)
        second, elapsed = await self.describe(), time.monotonic() - started
        rows = []
        for i, (address, a, b) in enumerate(zip(self.addresses, first, second, strict=True)):
            versions = [s.version for s in b.slices]
            rows.append(
                {
                    "shard": b.shard,  # its own index: where it is listed in the wrong place, "problem" says so
                    "address": address,
                    "problem": wiring_problem(b, address, i, len(self.addresses), "the address list has"),
                    "keys": len({s.key for s in b.slices}),
                    "slices": len(b.slices),
                    "bytes": b.bytes,
                    "versions": (min(versions, default=0), max(versions, default=0)),
                    "groups": {g.group: g.step for g in b.groups},
                    "gone": sorted(g.group for g in b.groups if g.gone),
                    "pending": {g.group: list(g.pending_processes) for g in b.groups if g.pending_workers},
                    # None without an interval to measure over (interval 0)
                    "updates_per_s": (b.updates_applied - a.updates_applied) / elapsed if interval_s > 0 else None,
                    "updates_applied": b.updates_applied,
                    "job": _job_label(b.job),
                    # embedding tables: the rows this shard holds of each, and their bytes
                    "tables": {t.name: _table_status(t) for t in b.tables},
                    # the checkpoint it started from, when that was made on another number of shards
                    "resharded": {"step": b.resharded_step, "from": b.resharded_from} if b.resharded_from else None,
                }
            )
        return rows


def _rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.1f}"


def _job_label(job: str) -> str:
    """``digits_mlp#3f2a9c01d4e5b6a7`` for a job identity, ``-`` for none."""
    if not job:
        return "-"
    identity = json.loads(job)
    return f"{identity.get('name', '?')}#{identity.get('fingerprint', '?')}"


def _group_steps(replies: list[pb.DescribeReply]) -> dict[int, int]:
    steps: dict[int, int] = {}
    for reply in replies:
        for g in reply.groups:
            steps[g.group] = min(steps.get(g.group, g.step), g.step)
    return steps


def format_status(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of ``Cluster.status`` (what ``psfw status`` prints).

    Args:
        rows: ``Cluster.status()``'s answer.

    Returns:
        The table, a line per shard, a line when the shards restored a checkpoint
        made on another number of shards, then a line per shard and embedding table.
    """
    lines = [
        f"{'shard':>5}  {'address':<22} {'keys':>5} {'slices':>6} {'MB':>9} {'versions':>11}  updates/s  groups  job"
    ]
    for r in rows:
        gone = set(r.get("gone", ()))
        groups = " ".join(f"g{g}@{s}" + ("(gone)" if g in gone else "") for g, s in sorted(r["groups"].items()))
        groups = groups or "-"
        lines.append(
            f"{r['shard']:>5}  {r['address']:<22} {r['keys']:>5} {r['slices']:>6} {r['bytes'] / 1e6:>9.2f} "
            f"{r['versions'][0]:>5}-{r['versions'][1]:<5}  {_rate(r['updates_per_s']):>9}  {groups}  {r['job']}"
        )
    resharded = {(r["resharded"]["step"], r["resharded"]["from"]) for r in rows if r.get("resharded")}
    for step, made_on in sorted(resharded):
        lines.append(f"restored the checkpoint of step {step} made on {made_on} shards onto {len(rows)}")
    tables = [(r["shard"], name, t) for r in rows for name, t in sorted(r.get("tables", {}).items())]
    if tables:
        # how long rows live: shown once an id waits for admission or a row went
        aging = any(t.get("waiting") or t.get("expired") or t.get("evicted") for _, _, t in tables)
        head = f"{'shard':>5}  {'table':<22} {'rows held':>12} {'MB':>9} {'updates':>9}"
        lines.append(head + (f" {'admitted':>10} {'expired':>10} {'evicted':>10} {'waiting':>10}" if aging else ""))
        for shard, name, t in tables:
            line = f"{shard:>5}  {name:<22} {t['rows']:>12,} {t['bytes'] / 1e6:>9.2f} {t['updates']:>9}"
            if aging:
                line += "".join(f" {t.get(k, 0):>10,}" for k in ("admitted", "expired", "evicted", "waiting"))
            lines.append(line)
    return "\n".join(lines)


def _table_status(table) -> dict[str, int]:
    """A table's part of a shard's status: its rows, bytes and updates, and how many
    rows were admitted, expired and evicted and how many ids wait."""
    return {
        "rows": table.rows_held,
        "bytes": table.bytes,
        "updates": table.updates,
        "admitted": table.rows_admitted,
        "expired": table.rows_expired,
        "evicted": table.rows_evicted,
        "waiting": table.ids_waiting,
    }
