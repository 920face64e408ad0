"""``psfw bench --transfer/--scale/--memory``: bytes moved per second on each path,
updates per second with many stubs, and a shard's memory against what it holds."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import TYPE_CHECKING

import numpy as np

from psfw.jobs.shard_processes import shard_processes
from psfw.services.server import ShardServer

if TYPE_CHECKING:
    from psfw.protocol.messages import UpdateHeader

__all__ = ["run_memory", "run_scale", "run_transfer", "transfer_slice_bytes"]


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
    (Put, Get), over gRPC alone and over the shards' links (TCP), through shared memory
    with shard processes on this host (an Update carries the gradients in and the
    values back), and in-process."""
    if size < MIN_TRANSFER_BYTES:
        raise ValueError(f"a transfer of {size} bytes: at least {MIN_TRANSFER_BYTES} (one float32 on each shard)")
    size -= size % 4
    slice_bytes = transfer_slice_bytes(size)
    with shard_processes(TRANSFER_SHARDS) as (addresses, _):
        push, pull = asyncio.run(_network(addresses, size, slice_bytes, repeats, link=False))
    with shard_processes(TRANSFER_SHARDS) as (addresses, _):
        tcp_push, tcp_pull = asyncio.run(_network(addresses, size, slice_bytes, repeats, link=True))
    with shard_processes(TRANSFER_SHARDS) as (addresses, _):
        shm_update = asyncio.run(_shared_memory(addresses, size, slice_bytes, repeats))
    local_push, local_pull = asyncio.run(_in_process(size, slice_bytes, repeats))
    return {
        "transfer_bytes": size,  # rounded down to whole float32s
        "grpc_push_gb_s": push,
        "grpc_pull_gb_s": pull,
        "tcp_push_gb_s": tcp_push,  # the network path over the shards' links, TCP (None: none)
        "tcp_pull_gb_s": tcp_pull,
        # an Update as a stub sends one: the gradients into the region, the values back in it
        "shared_memory_update_gb_s": shm_update,
        "in_process_push_gb_s": local_push,
        "in_process_pull_gb_s": local_pull,
    }


async def _network(
    addresses: list[str], size: int, slice_bytes: int, repeats: int, link: bool
) -> tuple[float | None, float | None]:
    """Best push and pull GB/s over the network path, as between hosts: the shards'
    links over TCP, or gRPC alone; (None, None) when ``link`` is asked for and a shard
    offers none."""
    from psfw.runtime.shard_client import ShardClient

    clients = [ShardClient(a, i, timeout_s=300, link=link, same_host=False) for i, a in enumerate(addresses)]
    try:
        for client in clients:
            await client.open_link()
        if link and any(c.linked != "tcp" for c in clients):
            return None, None  # no link after all
        return await _transfer(clients, size, slice_bytes, "net", repeats)
    finally:
        for c in clients:
            await c.close()


async def _in_process(size: int, slice_bytes: int, repeats: int) -> tuple[float, float]:
    """Best push and pull GB/s to shards in this OS process."""
    from psfw.runtime.inprocess import InProcessClient

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


async def _shared_memory(addresses: list[str], size: int, slice_bytes: int, repeats: int) -> float | None:
    """Best GB/s of an Update through shared memory with shard processes on this
    host (None: they are not on this host after all)."""
    from psfw.protocol.layout import plan_layout
    from psfw.protocol.messages import UpdateHeader
    from psfw.runtime.shard_client import ShardClient
    from psfw.runtime.step_region import StepRegion

    layout = plan_layout({"w": ((size // 4,), "float32")}, TRANSFER_SHARDS, 1, slice_bytes)
    region = StepRegion(layout).acquire()
    clients = [ShardClient(a, i, timeout_s=300) for i, a in enumerate(addresses)]
    for client in clients:
        reply = await client.describe()
        client.share_memory(region, reply)
        await client.open_link(reply)
    region.release()  # the clients hold it now
    try:
        if not all(c.shares_memory for c in clients):  # not on this host after all
            return None
        value = np.full(size // 4, 0.5, np.float32)
        sgd = json.dumps({"name": "sgd", "learning_rate": 0.01})  # not 0: a shard refuses it
        for i, client in enumerate(clients):
            await client.put([("w", s.index, value[s.start : s.stop]) for s in layout.shard_slices(i)], sgd)
        staged = region.gradients()["w"]
        best = 0.0
        for step in range(repeats):
            header = UpdateHeader(group=0, step=step, process=0, workers=1, rows=1, workers_per_group=1, wait_s=120)
            started = time.perf_counter()
            await _update_through(region, layout, clients, header, staged, value)
            best = max(best, size / (time.perf_counter() - started) / 1e9)
        return best
    finally:
        for c in clients:
            await c.close()


async def _update_through(region, layout, clients, header: UpdateHeader, staged: np.ndarray, value: np.ndarray) -> None:
    """One Update of every shard as a stub sends it: the gradients written into the
    region (what a stub's workers do as they report), the answers into its values."""
    np.copyto(staged, value)
    into = region.values(header.step)[1]
    await asyncio.gather(
        *(
            c.update(
                header,
                {("w", s.index): region.gradient_slot(("w", s.index)) for s in layout.shard_slices(i)},
                layout.slice_dtype_shape,
                into,
            )
            for i, c in enumerate(clients)
        )
    )


def run_scale(stubs: int = 16, seconds: float = 3.0, model_mb: float = 1.0) -> dict[str, float]:
    """Updates/s of ``stubs`` simulated worker processes (their stubs alone, synthetic
    gradients, no compute) against 1, 2 and 4 shard processes holding a model of
    ``model_mb`` MB."""
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
    with worker_run(text) as (addresses, procs, done, seconds):
        peaks = [rss_bytes(p.pid) for p in procs]
    values = width * width * 4 + width * 4 + width * 40 + 40  # the MLP's parameters
    return {
        "memory_model_bytes": values,
        "memory_seconds": round(seconds, 1),
        "memory_shard_values_mb": round(values / 2 / 2**20, 1),
        "memory_shard_peak_rss_mb": [round(p / 2**20, 1) for p in peaks],
        "memory_shard_peak_over_values": [round(p / (values / 2), 2) for p in peaks],
        "memory_path": "shared memory" if "shared memory" in done.stderr else "network",
    }


@contextlib.contextmanager
def worker_run(text: str, shards: int = 2):
    """Run the job of config ``text`` as one ``psfw worker`` process against
    ``shards`` shard processes; yields ``(addresses, shard processes, the worker's
    CompletedProcess, its seconds)`` while the shards still run (to read their
    memory, to ask them what they hold). RuntimeError when the worker fails."""
    import subprocess
    import tempfile

    from psfw.jobs.children import child_env, psfw_command

    with tempfile.TemporaryDirectory() as folder, shard_processes(shards) as (addresses, procs):
        config = f"{folder}/job.toml"
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
            raise RuntimeError(f"the run failed: {done.stderr[-2000:]}")
        yield addresses, procs, done, time.perf_counter() - started
