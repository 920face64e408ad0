"""``psfw bench --sparse``: embedding tables, as a parameter server is chosen for them.

- **Table sizes.** A regression over bags of ids (``psfw.compute.recsys.embedding_bag``,
  64-wide rows, 4 Zipf-distributed ids per row, batch 4096, 1 group x 2 workers, 2
  shards in-process) with tables of 10^5, 10^6 and 10^7 rows: samples/s and the bytes
  moved per step. Only the rows a batch uses travel, so the bytes stay flat as the
  table grows. The same model with the table as a dense parameter moves the whole
  table both ways every step: measured where it fits (``dense_limit``).
- **A cap.** The largest table trained over 2 shard processes (Adagrad) without a
  cap and with ``tables.max_rows``: the rows each shard holds at the end, the bytes
  per step and each shard's RSS.
- **Scale** (``--scale``): rows pulled and pushed per second by 2 simulated
  processes against 1, 2 and 4 shard processes.
- **Memory** (``--memory SIZE``): a table of SIZE bytes over 2 shard processes,
  every row made at the start (``tables.materialize``) and trained by a worker
  process: each shard's peak RSS against the bytes of the rows and optimizer state
  it holds.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import jax
import numpy as np

from psfw.compute.datasets import Dataset
from psfw.compute.params import flatten_params
from psfw.compute.recsys import embedding_bag
from psfw.jobs.config import parse_config
from psfw.jobs.job import Job
from psfw.jobs.progress import StepReporter
from psfw.jobs.worker_processes import run_worker_processes
from psfw.protocol.layout import plan_layout
from psfw.services.server import ShardServer

SIZES = (10**5, 10**6, 10**7)
DIM, BAG, BATCH = 64, 4, 4096
DENSE_LIMIT = 256 << 20  # table bytes up to which the dense path is measured too
CAP_ROWS = 100_000  # tables.max_rows of the capped run: under the rows 35 steps of the largest table make


def zipf_bags(rows: int, count: int, seed: int = 0, alpha: float = 1.1) -> np.ndarray:
    """``count`` bags of BAG ids in 0..rows-1, Zipf-distributed, the hot ids spread over
    the range by a fixed shuffle (as FBGEMM's benchmarks draw them)."""
    rng = np.random.default_rng(seed)
    ranks = (rng.zipf(alpha, (count, BAG)) - 1) % rows
    # a fixed permutation of the ranks, without materializing one of ``rows`` ids
    return ((ranks * 0x9E3779B1 + 12345) % rows).astype(np.int64) if rows > 1 else ranks.astype(np.int64)


def _job(rows: int, dense: bool, steps: int, optimizer: str = "sgd", max_rows: int = 0) -> Job:
    cap = {"max_rows": max_rows} if max_rows else {}
    config = parse_config(
        {
            "seed": 0,
            "train": {"batch_size": BATCH, "steps": steps, "log_every": 1, "wait_s": 600},
            "optimizer": {"name": "sgd", "learning_rate": 0.01},
            "tables": {"optimizer": {"name": optimizer, "learning_rate": 0.01}, **cap},
            "cluster": {"workers_per_group": 2, "workers_per_process": 2, "servers": 2},
        },
        "sparse bench",
    )
    model = embedding_bag(rows, DIM, dense=dense)
    x = zipf_bags(rows, BATCH * steps)
    y = np.random.default_rng(1).normal(size=len(x)).astype(np.float32)
    data = Dataset(x, y, x[:BATCH], y[:BATCH], None)
    flat, treedef = flatten_params(jax.eval_shape(model.init, jax.random.PRNGKey(0)))
    shapes = {n: (tuple(s.shape), str(s.dtype)) for n, s in flat.items()}
    layout = plan_layout(shapes, 2, 2, config.cluster.slice_bytes)
    return Job(config, model, data, layout, treedef, steps)


async def _train(job: Job, warmup: int, addresses: list[str] | None = None) -> dict[str, float]:
    """Samples/s after ``warmup`` steps and the bytes moved per step (both ways),
    against the shards at ``addresses`` (None: 2 in this process)."""
    stamps: list[float] = []
    reporter = StepReporter({0: 1}, job.steps, 1, [lambda r: stamps.append(time.perf_counter())])
    servers = [] if addresses is not None else [ShardServer(i, 2) for i in range(2)]
    for server in servers:
        await server.start("127.0.0.1:0")
    try:
        stubs = await run_worker_processes(job, addresses or [s.address for s in servers], reporter=reporter)
    finally:
        for server in servers:
            await server.stop(0)
    dense_bytes = 2 * sum(p.nbytes for p in job.layout.params.values())  # each way, every step
    feeds = [s.tables for s in stubs if s.tables is not None]  # the dense variant has none
    row_bytes = sum(f.traffic["row_bytes"] for f in feeds)
    measured = len(stamps) - warmup
    return {
        "samples_per_s": measured * BATCH / (stamps[-1] - stamps[warmup - 1]),
        "bytes_per_step": dense_bytes + row_bytes / job.steps,
        "rows_per_step": sum(f.traffic["rows_pulled"] + f.traffic["rows_pushed"] for f in feeds) / job.steps,
    }


def run_sparse(
    sizes: tuple[int, ...] = SIZES, steps: int = 30, warmup: int = 5, dense_limit: int = DENSE_LIMIT
) -> dict[str, Any]:
    """Samples/s and bytes per step of the table path (and of the dense path where the
    table has at most ``dense_limit`` bytes) for each table size, at the same batch."""
    figures: dict[str, Any] = {"sparse_dim": DIM, "sparse_batch": BATCH, "sparse_ids_per_row": BAG}
    for rows in sizes:
        sparse = asyncio.run(_train(_job(rows, False, warmup + steps), warmup))
        figures[f"sparse_{rows}_samples_per_s"] = round(sparse["samples_per_s"], 1)
        figures[f"sparse_{rows}_bytes_per_step"] = int(sparse["bytes_per_step"])
        figures[f"sparse_{rows}_rows_per_step"] = int(sparse["rows_per_step"])
        if rows * DIM * 4 <= dense_limit:
            dense = asyncio.run(_train(_job(rows, True, warmup + min(steps, 10)), warmup))
            figures[f"dense_{rows}_samples_per_s"] = round(dense["samples_per_s"], 1)
            figures[f"dense_{rows}_bytes_per_step"] = int(dense["bytes_per_step"])
        else:
            figures[f"dense_{rows}_samples_per_s"] = None  # the whole table, both ways, every step: not run
            figures[f"dense_{rows}_bytes_per_step"] = 2 * rows * DIM * 4
    return figures


def run_sparse_cap(rows: int = SIZES[-1], max_rows: int = CAP_ROWS, steps: int = 30, warmup: int = 5) -> dict[str, Any]:
    """The table of ``rows`` rows without a cap and with ``tables.max_rows``, over 2
    shard processes (Adagrad): the rows each shard holds at the end, the bytes per
    step, samples/s and each shard's RSS."""
    from psfw.jobs.shard_processes import rss_bytes, shard_processes

    figures: dict[str, Any] = {"sparse_cap_table_rows": rows, "sparse_cap_max_rows": max_rows}
    for name, cap in (("uncapped", 0), ("capped", max_rows)):
        with shard_processes(2) as (addresses, procs):
            job = _job(rows, False, warmup + steps, optimizer="adagrad", max_rows=cap)
            measured = asyncio.run(_train(job, warmup, addresses))
            tables = asyncio.run(_described_tables(addresses))
            rss = [rss_bytes(p.pid, "VmRSS") for p in procs]
            peak = [rss_bytes(p.pid) for p in procs]
        key = f"sparse_{name}_"
        figures[key + "rows_held"] = [t.rows_held for t in tables]
        figures[key + "held_mb"] = [round(t.bytes / 2**20, 1) for t in tables]
        figures[key + "bytes_per_step"] = int(measured["bytes_per_step"])
        figures[key + "samples_per_s"] = round(measured["samples_per_s"], 1)
        figures[key + "shard_rss_mb"] = [round(r / 2**20, 1) for r in rss]
        figures[key + "shard_peak_rss_mb"] = [round(r / 2**20, 1) for r in peak]
    return figures


async def _described_tables(addresses: list[str]) -> list[Any]:
    """Each shard's Describe of the table "ids"."""
    from psfw.runtime.shard_client import ShardClient

    clients = [ShardClient(a, i, timeout_s=60) for i, a in enumerate(addresses)]
    try:
        replies = await asyncio.gather(*(c.describe() for c in clients))
        return [next(t for t in r.tables if t.name == "ids") for r in replies]
    finally:
        for c in clients:
            await c.close()


async def _scale_round(addresses: list[str], rows: int, seconds: float) -> float:
    """Rows pulled and pushed per second by 2 simulated worker processes of one group."""
    import json

    from psfw.compute.tables import check_table_optimizer
    from psfw.protocol.messages import RowBlock, UpdateHeader
    from psfw.runtime.shard_client import ShardClient
    from psfw.runtime.table_feed import TableFeed

    shards = len(addresses)
    declaration = {
        "ids": {
            "rows": 10**6,
            "dim": DIM,
            "init": "normal",
            "scale": 0.01,
            "optimizer": check_table_optimizer({"name": "adagrad", "learning_rate": 0.01}),
            "seed": 0,
        }
    }
    clients = [ShardClient(a, i, timeout_s=60) for i, a in enumerate(addresses)]
    spec = embedding_bag(10**6, DIM).tables
    feed = TableFeed(spec, lambda step: {}, shards, 1, declaration)
    opt = json.dumps({"name": "sgd", "learning_rate": 0.01})
    await asyncio.gather(*(c.put([], opt, "", feed.declaration) for c in clients))
    rng = np.random.default_rng(0)
    moved, step, started = 0, 0, time.perf_counter()

    async def process(p: int, ids: np.ndarray) -> None:
        parts = feed.by_shard({"ids": ids})
        grads = np.ones((len(ids), DIM), np.float32)
        heads = [
            UpdateHeader(
                group=0,
                step=step,
                process=p,
                workers=1,
                rows=BATCH,
                workers_per_group=2,
                push={"ids": RowBlock(part["ids"], grads[: len(part["ids"])])} if part else {},
                pull=part,
            )
            for part in parts
        ]
        await asyncio.gather(*(c.update(h, {}, lambda key: None) for c, h in zip(clients, heads, strict=True)))

    try:
        while time.perf_counter() - started < seconds:
            batches = [np.unique(rng.integers(0, 10**6, rows)) for _ in range(2)]
            await asyncio.gather(*(process(p, ids) for p, ids in enumerate(batches)))
            moved += 2 * sum(len(b) for b in batches)  # each row pushed, and pulled back
            step += 1
        return moved / (time.perf_counter() - started)
    finally:
        for c in clients:
            await c.close()


def run_scale(rows: int = 16384, seconds: float = 5.0) -> dict[str, Any]:
    """Rows per second (pulled + pushed) against 1, 2 and 4 shard processes."""
    from psfw.jobs.shard_processes import shard_processes

    figures: dict[str, Any] = {"sparse_scale_rows_per_step": rows}
    for shards in (1, 2, 4):
        with shard_processes(shards) as (addresses, _):
            figures[f"sparse_scale_{shards}_shards_rows_per_s"] = round(
                asyncio.run(_scale_round(addresses, rows, seconds))
            )
    return figures


def run_memory(size: int, steps: int = 5) -> dict[str, Any]:
    """A table of about ``size`` bytes (64-wide float32 rows, adagrad) over 2 shard
    processes, every row made at the start, trained ``steps`` steps by a worker
    process: each shard's peak RSS against the rows and state it holds."""
    from psfw.jobs.shard_processes import rss_bytes
    from psfw.runtime.shard_client import ShardClient
    from psfw.tools.transfer_bench import worker_run

    users = max(size // (DIM * 4), 1)
    text = (
        f"seed = 0\n[model]\nname = 'fm'\ndim = {DIM - 1}\n"
        f"[data]\nname = 'clicks'\nusers = {users}\nitems = 1000\ntrain = {BATCH * steps}\ntest = 1024\n"
        f"[train]\nbatch_size = {BATCH}\nsteps = {steps}\nwait_s = 1200\n"
        "[optimizer]\nname = 'sgd'\nlearning_rate = 0.01\n"
        "[tables]\nmaterialize = true\n[tables.optimizer]\nname = 'adagrad'\nlearning_rate = 0.05\n"
        "[cluster]\nworkers_per_group = 2\nworkers_per_process = 2\nservers = 2\n"
    )
    with worker_run(text) as (addresses, procs, _, seconds):

        async def held() -> list[int]:
            clients = [ShardClient(a, i, timeout_s=60) for i, a in enumerate(addresses)]
            try:
                replies = await asyncio.gather(*(c.describe() for c in clients))
                return [sum(t.bytes for t in r.tables) for r in replies]
            finally:
                for c in clients:
                    await c.close()

        holds = asyncio.run(held())
        peaks = [rss_bytes(p.pid) for p in procs]
    return {
        "sparse_memory_table_bytes": users * DIM * 4 + 1000 * DIM * 4,
        "sparse_memory_seconds": round(seconds, 1),
        "sparse_memory_shard_held_mb": [round(h / 2**20, 1) for h in holds],
        "sparse_memory_shard_peak_rss_mb": [round(p / 2**20, 1) for p in peaks],
        "sparse_memory_shard_peak_over_held": [round(p / h, 2) for p, h in zip(peaks, holds, strict=True)],
    }
