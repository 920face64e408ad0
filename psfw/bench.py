"""``psfw bench``: samples/s of psfw against single-process JAX, side by side.

The benchmark model is an MLP 784-1024-1024-10 (float32) on synthetic data, global
batch 256, SGD. Three ways, in one run: single-process jitted JAX on the full batch
(the reference), psfw embedded (1 group x 2 workers, 2 shards in-process), and psfw
with the 2 shards as separate OS processes on this host.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import jax
import optax

from psfw.compute.batching import BatchOrder
from psfw.config import Config, parse_config
from psfw.job import build_job
from psfw.launcher import run_job
from psfw.localprocs import shard_processes
from psfw.progress import StepReporter
from psfw.services.server import ShardServer

BENCH_CONFIG = {
    "seed": 0,
    "model": {"name": "mlp", "hidden": [1024, 1024]},
    "data": {"name": "synthetic", "features": 784, "classes": 10, "train": 8192, "test": 256},
    "train": {"batch_size": 256, "steps": 70, "log_every": 1},
    "optimizer": {"name": "sgd", "learning_rate": 0.01},
    "cluster": {"worker_groups": 1, "workers_per_group": 2, "workers_per_process": 2, "servers": 2},
}


def bench_config(steps: int) -> Config:
    data = {**BENCH_CONFIG, "train": {**BENCH_CONFIG["train"], "steps": steps}}
    return parse_config(data, "bench")


def single_process(config: Config, warmup: int, steps: int) -> float:
    """Samples/s of plain jitted JAX + optax on the full batch (one XLA call a step)."""
    job = build_job(config)
    opt = optax.sgd(config.optimizer.learning_rate)
    params = job.model.init(jax.random.PRNGKey(config.seed))
    state = opt.init(params)

    @jax.jit
    def step(params, state, x, y):
        (loss, _), grads = jax.value_and_grad(job.model.loss, has_aux=True)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    order = BatchOrder(len(job.data.x_train), config.train.batch_size, config.seed)
    batches = [order.indices(i) for i in range(warmup + steps)]
    for i in range(warmup):
        params, state, loss = step(params, state, job.data.x_train[batches[i]], job.data.y_train[batches[i]])
    jax.block_until_ready(loss)
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        params, state, loss = step(params, state, job.data.x_train[batches[i]], job.data.y_train[batches[i]])
    jax.block_until_ready(loss)
    return steps * config.train.batch_size / (time.perf_counter() - start)


async def _psfw(config: Config, warmup: int, addresses: list[str] | None) -> float:
    job = build_job(config)
    stamps: list[float] = []
    reporter = StepReporter(
        {0: config.cluster.processes_per_group}, job.steps, 1, [lambda r: stamps.append(time.perf_counter())]
    )
    servers = []
    if addresses is None:
        addresses = []
        for i in range(config.cluster.servers):
            server = ShardServer(i, config.cluster.servers)
            await server.start("127.0.0.1:0")
            servers.append(server)
            addresses.append(server.address)
    try:
        await run_job(job, addresses, reporter=reporter)
    finally:
        for server in servers:
            await server.stop(0)
    measured = len(stamps) - warmup
    return measured * config.train.batch_size / (stamps[-1] - stamps[warmup - 1])


def run_bench(steps: int = 60, warmup: int = 10) -> dict[str, float]:
    config = bench_config(warmup + steps)
    ref = single_process(config, warmup, steps)
    embedded = asyncio.run(_psfw(config, warmup, None))
    with shard_processes(config.cluster.servers) as (addresses, _):
        separate = asyncio.run(_psfw(config, warmup, addresses))
    return {
        "single_process": ref,
        "embedded": embedded,
        "separate_processes": separate,
        "embedded_ratio": embedded / ref,
        "separate_processes_ratio": separate / ref,
    }


def main(args: argparse.Namespace) -> int:
    figures = run_bench(args.steps, args.warmup)
    if args.json:
        print(json.dumps(figures))
        return 0
    print("benchmark MLP 784-1024-1024-10, float32, batch 256, SGD; 1 group x 2 workers, 2 shards")
    print(f"  single-process JAX  {figures['single_process']:10,.0f} samples/s  (reference)")
    print(f"  psfw embedded       {figures['embedded']:10,.0f} samples/s  ratio {figures['embedded_ratio']:.2f}")
    print(
        f"  psfw shard procs    {figures['separate_processes']:10,.0f} samples/s  "
        f"ratio {figures['separate_processes_ratio']:.2f}"
    )
    return 0


__all__ = ["BENCH_CONFIG", "run_bench"]
