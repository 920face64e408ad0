"""``psfw loadtest``: many concurrent streams against shard processes, for a fixed
time, then a count of what arrived.

Each stream is a worker group of its own (one worker process of one worker), so every
stream's updates are applied as they arrive. Every update subtracts exactly 2**-10
from every value (SGD, learning rate 1), so the final values and versions tell
whether an update was lost or applied twice. Figures are printed; nothing here
asserts on speed.
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np

from psfw.jobs.shard_processes import rss_bytes, shard_processes
from psfw.protocol.messages import GetHeader, UpdateHeader
from psfw.runtime.shard_client import ShardClient

STEP = 2.0**-10  # exact in float32 for the counts a test reaches


async def _stream(clients, group, streams, n, until, max_updates, gets_every, counts):
    grad = [{("w", i): np.full(n, STEP, np.float32)} for i in range(len(clients))]
    expect = lambda key: (np.dtype("float32"), (n,))  # noqa: E731
    step = 0
    while time.monotonic() < until and step < max_updates:
        answers = await asyncio.gather(
            *(
                c.update(
                    UpdateHeader(
                        group=group,
                        step=step,
                        process=group,
                        workers=1,
                        rows=1,
                        workers_per_group=1,
                        worker_groups=streams,
                        group_processes=1,
                        wait_s=30,
                    ),
                    grad[i],
                    expect,
                )
                for i, c in enumerate(clients)
            )
        )
        if any(a.step != step + 1 for a in answers):
            raise AssertionError(f"stream {group} step {step}: shards answered {[a.step for a in answers]}")
        step += 1
        if step % gets_every == 0:
            got = await asyncio.gather(
                *(c.get(GetHeader(group, step, [("w", i)], 30), expect) for i, c in enumerate(clients))
            )
            counts["gets"] += len(got)
    counts["steps"][group] = step


async def run_load(
    addresses: list[str],
    streams: int,
    seconds: float,
    values_per_shard: int,
    gets_every: int,
    max_updates: int,
    on_ready=None,
) -> dict:
    setup = [ShardClient(a, i, timeout_s=30) for i, a in enumerate(addresses)]
    sgd = json.dumps({"name": "sgd", "learning_rate": 1.0})
    await asyncio.gather(*(c.put([("w", i, np.zeros(values_per_shard, np.float32))], sgd) for i, c in enumerate(setup)))
    if on_ready is not None:
        on_ready()
    counts: dict = {"gets": 0, "steps": {}}
    until = time.monotonic() + seconds
    per_stream = [[ShardClient(a, i, timeout_s=30) for i, a in enumerate(addresses)] for _ in range(streams)]
    started = time.monotonic()
    results = await asyncio.gather(
        *(
            _stream(clients, g, streams, values_per_shard, until, max_updates, gets_every, counts)
            for g, clients in enumerate(per_stream)
        ),
        return_exceptions=True,
    )
    elapsed = time.monotonic() - started
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    sent = sum(counts["steps"].values())
    described = await asyncio.gather(*(c.describe() for c in setup))
    expect = lambda key: (np.dtype("float32"), (values_per_shard,))  # noqa: E731
    finals = await asyncio.gather(*(c.get(GetHeader(0, 0, [("w", i)], 30), expect) for i, c in enumerate(setup)))
    applied = [d.slices[0].version for d in described]
    value_counts = [float(-f.values[("w", i)][0] / STEP) for i, f in enumerate(finals)]
    uniform = all(np.all(f.values[("w", i)] == f.values[("w", i)][0]) for i, f in enumerate(finals))
    group_steps_match = all({g.group: g.step for g in d.groups} == counts["steps"] for d in described)
    for c in [*setup, *(c for clients in per_stream for c in clients)]:
        await c.close()
    return {
        "streams": streams * len(addresses),
        "seconds": round(elapsed, 2),
        "updates_sent": sent,
        "updates_applied_per_shard": applied,
        "values_say_applied": value_counts,
        "lost": sum(max(0, sent - a) for a in applied),
        "doubled": sum(max(0, a - sent) for a in applied),
        "values_consistent": uniform and all(v == sent for v in value_counts) and group_steps_match,
        "gets": counts["gets"],
        "errors": errors,
        "updates_per_s": round(sent / elapsed, 1),
    }


def load_test(
    streams: int = 32,
    seconds: float = 10.0,
    mb_per_shard: float = 1.0,
    shards: int = 2,
    gets_every: int = 4,
    max_updates: int = 100_000,
) -> dict:
    """Start ``shards`` shard processes, run ``streams`` groups (each one stream per
    shard) for ``seconds``, and report counts, errors and the shards' peak RSS."""
    n = max(1, int(mb_per_shard * (1 << 20)) // 4)
    with shard_processes(shards) as (addresses, procs):
        baseline: list[int] = []
        figures = asyncio.run(
            run_load(
                addresses,
                streams,
                seconds,
                n,
                gets_every,
                max_updates,
                on_ready=lambda: baseline.extend(rss_bytes(p.pid, "VmRSS") for p in procs),
            )
        )
        peak = [rss_bytes(p.pid) for p in procs]
    mb = 2**20
    figures["shard_values_mb"] = round(n * 4 / mb, 2)
    figures["shard_rss_before_load_mb"] = [round(r / mb, 1) for r in baseline]
    figures["shard_peak_rss_mb"] = [round(r / mb, 1) for r in peak]
    figures["shard_peak_growth_in_values"] = [round((p - b) / (n * 4), 1) for p, b in zip(peak, baseline, strict=True)]
    return figures
