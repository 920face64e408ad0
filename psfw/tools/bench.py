"""``psfw bench``: samples/s of psfw against single-process JAX, side by side.

The benchmark model is an MLP 784-1024-1024-10 (float32) on synthetic data, global
batch 256, SGD. In one run, side by side: single-process jitted JAX on the full batch
(the reference), the same 2-worker split with no parameter server (one thread per
worker and one fused update: the bound of data parallelism on this machine), psfw
embedded (1 group x 2 workers, 2 shards in-process), psfw with the 2 shards as
separate OS processes on this host (shared memory), and the same over the network
path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import threading
import time

import jax
import numpy as np
import optax

from psfw.compute.batching import BatchOrder
from psfw.compute.step import make_grad_step
from psfw.jobs.config import Config, parse_config
from psfw.jobs.embedded import run_job
from psfw.jobs.job import build_job
from psfw.jobs.progress import StepReporter
from psfw.jobs.shard_processes import shard_processes
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


def data_parallel_bound(config: Config, warmup: int, steps: int) -> float:
    """Samples/s of the group's split with no parameter server: one thread per worker
    runs the same jitted gradient step as psfw's workers on its sub-batch, and the
    last to finish applies one fused optimizer update to the whole parameters (no
    slices, no checks, no protocol). What any in-process data-parallel scheme can
    reach on this machine; psfw's embedded figure over this one is the cost of the
    parameter server itself."""
    job = build_job(config)
    workers = config.cluster.workers_per_group
    opt = optax.sgd(config.optimizer.learning_rate)
    step_fn = make_grad_step(job.model.loss)
    params = job.model.init(jax.random.PRNGKey(config.seed))
    state = {"params": params, "opt": opt.init(params), "grads": [None] * workers}
    rows = np.float32(config.train.batch_size)
    order = job.order(0)
    stamps: list[float] = []

    @jax.jit
    def apply(params, opt_state, grads):
        total = jax.tree.map(lambda *g: sum(g) / rows, *grads)
        updates, opt_state = opt.update(total, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def update() -> None:  # run by the last worker to arrive, while the others wait
        state["params"], state["opt"] = jax.block_until_ready(apply(state["params"], state["opt"], state["grads"]))
        stamps.append(time.perf_counter())

    barrier = threading.Barrier(workers, action=update)
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        try:
            for step in range(warmup + steps):
                index = order.worker_indices(step, w, workers)
                _, _, grads = step_fn(state["params"], job.data.x_train[index], job.data.y_train[index])
                state["grads"][w] = jax.block_until_ready(grads)
                barrier.wait(timeout=60)
        except BaseException as err:  # noqa: BLE001 - handed to the caller below
            errors.append(err)
            barrier.abort()  # the others stop waiting for this one

    threads = [threading.Thread(target=worker, args=(w,), name=f"bound-worker-{w}") for w in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:  # the cause, not the other threads' broken barrier
        cause = next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
        raise RuntimeError(f"the data-parallel bound failed: {cause!r}") from cause
    return steps * config.train.batch_size / (stamps[-1] - stamps[warmup - 1])


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
    if measured < 1:
        raise RuntimeError(f"only {len(stamps)} steps were timed: the shards were not fresh")
    return measured * config.train.batch_size / (stamps[-1] - stamps[warmup - 1])


def run_bench(steps: int = 60, warmup: int = 10, path: str = "auto", rounds: int = 3) -> dict:
    """Samples/s of the reference, psfw embedded, psfw with shard processes, and psfw
    with shard processes over the network path (``tcp``), measured side by side in
    ``rounds`` rounds; each figure is its best round (this machine is shared: a slow
    round says more about the neighbours than about the code), and every round's
    ratios are reported too. ``path="tcp"`` forces the network path for every psfw
    variant."""
    config = bench_config(warmup + steps)
    tcp_config = config.model_copy(update={"cluster": config.cluster.model_copy(update={"transport": "grpc"})})
    if path == "tcp":
        config = tcp_config
    runs: dict[str, list[float]] = {
        "single_process": [],
        "data_parallel_bound": [],
        "embedded": [],
        "separate_processes": [],
        "tcp": [],
    }
    for _ in range(rounds):
        runs["single_process"].append(single_process(config, warmup, steps))
        runs["data_parallel_bound"].append(data_parallel_bound(config, warmup, steps))
        runs["embedded"].append(asyncio.run(_psfw(config, warmup, None)))
        with shard_processes(config.cluster.servers) as (addresses, _):
            runs["separate_processes"].append(asyncio.run(_psfw(config, warmup, addresses)))
        with shard_processes(config.cluster.servers) as (addresses, _):  # fresh shards: a run leaves its state
            runs["tcp"].append(asyncio.run(_psfw(tcp_config, warmup, addresses)))
    best = {key: max(values) for key, values in runs.items()}
    figures: dict = dict(best)
    for key in ("data_parallel_bound", "embedded", "separate_processes", "tcp"):
        figures[f"{key}_ratio"] = best[key] / best["single_process"]
        figures[f"{key}_round_ratios"] = [
            round(v / r, 3) for v, r in zip(runs[key], runs["single_process"], strict=True)
        ]
    for key in ("embedded", "separate_processes", "tcp"):
        # the share of what data parallelism allows on this machine: comparable across machines
        figures[f"{key}_of_bound"] = best[key] / best["data_parallel_bound"]
    figures.update(path=path, rounds=rounds)
    return figures


TRANSFER_SHARDS = 2
MIN_TRANSFER_BYTES = 4 * TRANSFER_SHARDS  # one float32 on each shard
MIN_MEMORY_BYTES = 4  # an MLP 1-1-10


def transfer_slice_bytes(size: int) -> int:
    """The slice size that spreads a transfer of ``size`` bytes (float32) over both
    shards: 1 MiB slices, smaller when the model is under 2 MiB."""
    return min(1 << 20, 4 * -(-(size // 4) // TRANSFER_SHARDS))


async def _transfer(clients, size: int, slice_bytes: int, tag: str, repeats: int) -> tuple[float, float]:
    """Best push and pull GB/s of a model of ``size`` bytes over ``clients``' shards."""
    from psfw.protocol.layout import plan_layout
    from psfw.runtime.fetch import fetch_params

    n = size // 4
    best_push = best_pull = 0.0
    for r in range(repeats):
        name = f"{tag}{r}/w"
        layout = plan_layout({name: ((n,), "float32")}, len(clients), 1, slice_bytes)
        value = np.full(n, 0.5, np.float32)
        items: dict[int, list] = {}
        for s in layout.params[name].slices:
            items.setdefault(s.shard, []).append((name, s.index, value[s.start : s.stop]))
        sgd = json.dumps({"name": "sgd", "learning_rate": 0.01})  # not 0: a shard refuses it
        started = time.perf_counter()
        await asyncio.gather(*(clients[i].put(part, sgd) for i, part in items.items()))
        best_push = max(best_push, size / (time.perf_counter() - started) / 1e9)
        started = time.perf_counter()
        got = await fetch_params(clients, layout, 0, 0, [name], wait_s=120)
        best_pull = max(best_pull, size / (time.perf_counter() - started) / 1e9)
        if got[name][-1] != 0.5:
            raise AssertionError("the transfer did not round-trip")
        del got, value
    return best_push, best_pull


def run_transfer(size: int, repeats: int = 3) -> dict[str, float | None]:
    """Push and pull of ``size`` bytes (float32: rounded down to a multiple of 4; at
    least MIN_TRANSFER_BYTES) across 2 shards, GB/s each way: over the network path
    (Put, Get), through shared memory with shard processes on this host (an Update
    carries the gradients in and the values back; Get), and in-process."""
    from psfw.protocol.messages import UpdateHeader
    from psfw.runtime.grpc_transport import ShardClient
    from psfw.runtime.inprocess import InProcessClient
    from psfw.runtime.shm_transport import SharedMemoryClient

    if size < MIN_TRANSFER_BYTES:
        raise ValueError(f"a transfer of {size} bytes: at least {MIN_TRANSFER_BYTES} (one float32 on each shard)")
    size -= size % 4
    slice_bytes = transfer_slice_bytes(size)

    async def network(addresses):
        clients = [ShardClient(a, i, timeout_s=300) for i, a in enumerate(addresses)]
        try:
            return await _transfer(clients, size, slice_bytes, "net", repeats)
        finally:
            for c in clients:
                await c.close()

    async def in_process():
        servers = [ShardServer(i, TRANSFER_SHARDS) for i in range(TRANSFER_SHARDS)]
        for server in servers:
            await server.start("127.0.0.1:0")
        try:
            return await _transfer(
                [InProcessClient(s, i) for i, s in enumerate(servers)], size, slice_bytes, "mem", repeats
            )
        finally:
            for server in servers:
                await server.stop(0)

    async def shared(addresses):
        from psfw.protocol.layout import plan_layout
        from psfw.runtime.fetch import fetch_params

        layout = plan_layout({"w": ((size // 4,), "float32")}, TRANSFER_SHARDS, 1, slice_bytes)
        nets = [ShardClient(a, i, timeout_s=300) for i, a in enumerate(addresses)]
        clients = [await SharedMemoryClient.attach(net, layout.slice_specs(i)) for i, net in enumerate(nets)]
        try:
            if None in clients:  # not on this host after all
                return None, None
            value = np.full(size // 4, 0.5, np.float32)
            sgd = json.dumps({"name": "sgd", "learning_rate": 0.01})  # not 0: a shard refuses it
            for i, client in enumerate(clients):
                await client.put([("w", s.index, value[s.start : s.stop]) for s in layout.shard_slices(i)], sgd)
            best_update = best_pull = 0.0
            for step in range(repeats):
                header = UpdateHeader(group=0, step=step, process=0, workers=1, rows=1, workers_per_group=1, wait_s=120)
                started = time.perf_counter()
                await asyncio.gather(
                    *(
                        c.update(
                            header,
                            {("w", s.index): value[s.start : s.stop] for s in layout.shard_slices(i)},
                            layout.slice_dtype_shape,
                        )
                        for i, c in enumerate(clients)
                    )
                )
                best_update = max(best_update, size / (time.perf_counter() - started) / 1e9)
                started = time.perf_counter()
                await fetch_params(clients, layout, 0, step + 1, ["w"], wait_s=120)
                best_pull = max(best_pull, size / (time.perf_counter() - started) / 1e9)
            return best_update, best_pull
        finally:
            for c in [*(c for c in clients if c is not None), *nets]:
                await c.close()

    with shard_processes(TRANSFER_SHARDS) as (addresses, _):
        push, pull = asyncio.run(network(addresses))
    with shard_processes(TRANSFER_SHARDS) as (addresses, _):
        shm_update, shm_pull = asyncio.run(shared(addresses))
    local_push, local_pull = asyncio.run(in_process())
    return {
        "transfer_bytes": size,  # rounded down to whole float32s
        "tcp_push_gb_s": push,
        "tcp_pull_gb_s": pull,
        "shared_memory_update_gb_s": shm_update,  # gradients in and fresh values back, per direction
        "shared_memory_pull_gb_s": shm_pull,
        "in_process_push_gb_s": local_push,
        "in_process_pull_gb_s": local_pull,
    }


def run_scale(stubs: int = 16, seconds: float = 3.0, model_mb: float = 1.0) -> dict[str, float]:
    """Updates/s of ``stubs`` simulated stub processes (synthetic gradients, no
    compute) against 1, 2 and 4 shard processes holding a model of ``model_mb`` MB."""
    from psfw.tools.loadtest import load_test

    figures = {}
    for shards in (1, 2, 4):
        result = load_test(stubs, seconds, model_mb / shards, shards=shards, gets_every=10**9)
        if result["errors"] or result["lost"] or result["doubled"]:
            raise AssertionError(f"scale run with {shards} shards went wrong: {result}")
        figures[f"scale_{shards}_shards_updates_per_s"] = result["updates_per_s"]
    return figures


def run_memory(size: int, steps: int = 3) -> dict:
    """Train an MLP F-F-10 of about ``size`` bytes (F*F float32) for ``steps`` steps
    with 2 shard processes and one worker process of 2 workers; report each shard's
    peak RSS against the bytes of values it holds."""
    import math
    import subprocess
    import tempfile

    from psfw.jobs.children import child_env, psfw_command
    from psfw.jobs.shard_processes import rss_bytes

    if size < MIN_MEMORY_BYTES:
        raise ValueError(f"a model of {size} bytes: at least {MIN_MEMORY_BYTES} (one float32 weight)")
    width = int(math.sqrt(size / 4))
    text = (
        f"[model]\nname = 'mlp'\nhidden = [{width}]\n"
        f"[data]\nname = 'synthetic'\nfeatures = {width}\nclasses = 10\ntrain = 64\ntest = 16\n"
        f"[train]\nbatch_size = 8\nsteps = {steps}\nwait_s = 1200\n"
        "[optimizer]\nname = 'sgd'\nlearning_rate = 0.01\n"
        "[cluster]\nworkers_per_group = 2\nworkers_per_process = 2\nservers = 2\n"
    )
    with tempfile.TemporaryDirectory() as folder, shard_processes(2) as (addresses, procs):
        config = f"{folder}/memory.toml"
        with open(config, "w") as f:
            f.write(text)
        started = time.perf_counter()
        done = subprocess.run(
            psfw_command("worker", config, "--servers", ",".join(addresses), "--run-dir", f"{folder}/run"),
            capture_output=True,
            text=True,
            env=child_env(),
        )
        if done.returncode != 0:
            raise RuntimeError(f"the memory run failed: {done.stderr[-2000:]}")
        peaks = [rss_bytes(p.pid) for p in procs]
    values = width * width * 4 + width * 4 + width * 40 + 40  # the MLP's parameters
    return {
        "memory_model_bytes": values,
        "memory_seconds": round(time.perf_counter() - started, 1),
        "memory_shard_values_mb": round(values / 2 / 2**20, 1),
        "memory_shard_peak_rss_mb": [round(p / 2**20, 1) for p in peaks],
        "memory_shard_peak_over_values": [round(p / (values / 2), 2) for p in peaks],
        "memory_path": "shared-memory" if "shared-memory" in done.stderr else "grpc",
    }


def parse_size(text: str) -> int:
    """``256MiB``, ``1GB``, ``8388608`` -> bytes."""
    units = {
        "": 1,
        "k": 10**3,
        "kb": 10**3,
        "kib": 2**10,
        "m": 10**6,
        "mb": 10**6,
        "mib": 2**20,
        "g": 10**9,
        "gb": 10**9,
        "gib": 2**30,
    }
    found = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-z]*)\s*", text.lower())
    if not found or found.group(2) not in units:
        raise ValueError(f"size {text!r}: use a number with an optional unit (KiB, MiB, GiB, KB, MB, GB)")
    return int(float(found.group(1)) * units[found.group(2)])


def _size_flag(flag: str, text: str | None, least: int) -> int | None:
    """The size a flag names, checked before anything runs."""
    if text is None:
        return None
    size = parse_size(text)
    if size < least:
        raise ValueError(f"{flag} {text}: the smallest size it measures is {least} bytes")
    return size


def _bytes_text(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:,.4g} {unit}"
    return f"{size} bytes"


def main(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.warmup < 1 or args.rounds < 1:
        raise ValueError(
            f"--steps {args.steps}, --warmup {args.warmup}, --rounds {args.rounds}: each must be at least 1 "
            "(the first measured step is timed from the end of the last warmup step)"
        )
    transfer = _size_flag("--transfer", args.transfer, MIN_TRANSFER_BYTES)
    memory = _size_flag("--memory", args.memory, MIN_MEMORY_BYTES)
    figures: dict = {}
    if transfer is not None:
        figures.update(run_transfer(transfer))
    if args.scale:
        figures.update(run_scale())
    if memory is not None:
        figures.update(run_memory(memory))
    if transfer is None and not args.scale and memory is None:
        figures.update(run_bench(args.steps, args.warmup, args.path, args.rounds))
    if args.json:
        print(json.dumps(figures))
        return 0
    if "single_process" in figures:
        print(
            f"benchmark MLP 784-1024-1024-10, float32, batch 256, SGD; 1 group x 2 workers, 2 shards "
            f"(path: {figures['path']}; best of {figures['rounds']} rounds)"
        )
        print(f"  single-process JAX      {figures['single_process']:10,.0f} samples/s  (reference)")
        for key, label in (
            ("data_parallel_bound", "2 threads, no server"),
            ("embedded", "psfw embedded"),
            ("separate_processes", "psfw shard processes"),
            ("tcp", "psfw network path"),
        ):
            rounds = ", ".join(f"{r:.2f}" for r in figures[key + "_round_ratios"])
            of_bound = f"  {figures[key + '_of_bound']:.2f} of the bound" if key + "_of_bound" in figures else ""
            print(
                f"  {label:<22}  {figures[key]:10,.0f} samples/s  ratio {figures[key + '_ratio']:.2f}"
                f"{of_bound}  (rounds: {rounds})"
            )
    if "transfer_bytes" in figures:
        print(f"transfer of {_bytes_text(figures['transfer_bytes'])} over 2 shards (push / pull, GB/s):")
        print(f"  network path  {figures['tcp_push_gb_s']:.3g} / {figures['tcp_pull_gb_s']:.3g}")
        if figures["shared_memory_pull_gb_s"] is not None:
            print(
                f"  shared memory {figures['shared_memory_update_gb_s']:.3g} (update) / "
                f"{figures['shared_memory_pull_gb_s']:.3g}"
            )
        print(f"  in-process    {figures['in_process_push_gb_s']:.3g} / {figures['in_process_pull_gb_s']:.3g}")
    if "memory_model_bytes" in figures:
        print(
            f"model of {figures['memory_model_bytes'] / 2**30:.2f} GiB, 2 shards ({figures['memory_path']}): "
            f"shard peak RSS {figures['memory_shard_peak_rss_mb']} MB for {figures['memory_shard_values_mb']} MB "
            f"of values each ({figures['memory_shard_peak_over_values']} x)"
        )
    for shards in (1, 2, 4):
        key = f"scale_{shards}_shards_updates_per_s"
        if key in figures:
            print(f"  {shards} shard(s): {figures[key]:,.1f} updates/s")
    return 0


__all__ = ["BENCH_CONFIG", "data_parallel_bound", "run_bench", "run_scale", "run_transfer"]
