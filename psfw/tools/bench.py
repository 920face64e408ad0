"""``psfw bench``: samples/s of psfw against single-process JAX, side by side.

The benchmark model is an MLP 784-1024-1024-10 (float32) on synthetic data, global
batch 256, SGD. In one run, side by side: single-process jitted JAX on the full batch
(the reference), the same 2-worker split with no parameter server (one thread per
worker and one fused update: the bound of data parallelism on this machine), psfw
embedded (1 group x 2 workers, 2 shards in-process), psfw with the 2 shards as
separate OS processes on this host (shared memory), and the same over the network
path, as between hosts: gRPC alone (``grpc``), the shards' links over TCP (``tcp``,
the default), the links with bfloat16 gradients (``tcp_compressed``), and the links
in TLS, as a secure deployment between hosts runs (``tls``).
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from pathlib import Path

import jax
import numpy as np
import optax

from psfw.base.security import NO_SECURITY, Security
from psfw.compute.batching import BatchOrder
from psfw.compute.params import flatten_params
from psfw.compute.step import make_grad_step
from psfw.jobs.config import Config, parse_config
from psfw.jobs.job import build_job
from psfw.jobs.progress import StepReporter
from psfw.jobs.shard_processes import shard_processes
from psfw.jobs.worker_processes import run_worker_processes
from psfw.runtime.devices import device_name
from psfw.runtime.fetch import fetch_params
from psfw.runtime.shard_client import ShardClient
from psfw.services.server import ShardServer
from psfw.tools.bench_certs import make_certs, openssl_installed
from psfw.tools.peer_bench import run_ddp, torch_installed

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


async def _psfw(
    config: Config, warmup: int, addresses: list[str] | None, final: bool = False, security: Security = NO_SECURITY
):
    """Samples/s of psfw on ``config`` after ``warmup`` steps (of each group); with
    ``final``, also the trained parameters (fetched from the shards at ``addresses``,
    reached with ``security``)."""
    job = build_job(config)
    stamps: list[float] = []
    groups = config.cluster.worker_groups
    processes = {g: config.cluster.processes_per_group for g in range(groups)}
    reporter = StepReporter(processes, job.steps, 1, [lambda r: stamps.append(time.perf_counter())])
    servers = []
    if addresses is None:
        addresses = []
        for i in range(config.cluster.servers):
            server = ShardServer(i, config.cluster.servers, link=False)  # called in-process
            await server.start("127.0.0.1:0")
            servers.append(server)
            addresses.append(server.address)
    try:
        await run_worker_processes(job, addresses, reporter=reporter, security=security)
        params = await _trained(job, addresses, security) if final else None
    finally:
        for server in servers:
            await server.stop(0)
    # every group's steps, as they come: a group step is one record of batch_size rows
    measured = len(stamps) - warmup * groups
    if measured < 1:
        raise RuntimeError(f"only {len(stamps)} steps were timed: the shards were not fresh")
    speed = measured * config.train.batch_size / (stamps[-1] - stamps[warmup * groups - 1])
    return (speed, params) if final else speed


async def _trained(job, addresses: list[str], security: Security) -> dict[str, np.ndarray]:
    clients = [ShardClient(a, i, timeout_s=60, security=security) for i, a in enumerate(addresses)]
    try:
        return await fetch_params(clients, job.layout, 0, job.steps, list(job.layout.params), 60)
    finally:
        for client in clients:
            await client.close()


def _gap(params: dict[str, np.ndarray], exact: dict[str, np.ndarray], initial: dict[str, np.ndarray]) -> float:
    """How far ``params`` are from ``exact``, as a share of how far training moved
    ``exact`` from ``initial`` (the largest over the parameters)."""
    return max(
        float(np.abs(params[n] - exact[n]).max() / max(np.abs(exact[n] - initial[n]).max(), 1e-30)) for n in exact
    )


def _initial(config: Config) -> dict[str, np.ndarray]:
    flat, _ = flatten_params(build_job(config).model.init(jax.random.PRNGKey(config.seed)))
    return {name: np.asarray(value) for name, value in flat.items()}


def run_bench(steps: int = 60, warmup: int = 10, path: str = "auto", rounds: int = 3) -> dict:
    """Samples/s of the reference, psfw embedded, psfw with shard processes, and psfw
    with shard processes over the network path (``grpc``), measured side by side in
    ``rounds`` rounds; each figure is its best round (this machine is shared: a slow
    round says more about the neighbours than about the code), and every round's
    ratios are reported too. ``path="grpc"`` forces the network path for every psfw
    variant. Also, in each round: the network path over the shards' links (``tcp``;
    ``tcp_param_gap``: its trained parameters against gRPC's, 0 when the bytes are the
    same) and with bfloat16 gradients (``tcp_compressed``; ``tcp_compressed_param_gap``:
    its trained parameters against the uncompressed run's, see ``_gap``), the links in TLS
    (``tls``, where the ``openssl`` command can make certificates; ``tls_param_gap``: 0,
    the same bytes), 2 asynchronous groups of 1 worker (batch 128 each,
    the same rows per worker as the 2-worker group), embedded (``two_groups``), and
    PyTorch DDP over gloo on the same job where torch is installed (``ddp``)."""
    configs = _variant_configs(bench_config(warmup + steps), path)
    ddp, tls = torch_installed(), openssl_installed()
    extra = (*(("tls",) * tls), *(("ddp",) * ddp))
    runs: dict[str, list[float]] = {key: [] for key in ("single_process", *VARIANTS, *extra)}
    gaps: dict[str, list[float]] = {"tcp_compressed": [], "tcp": [], "tls": []}
    for _ in range(rounds):
        _one_round(configs, warmup, steps, runs, gaps)
    figures = _figures(runs, gaps)
    figures.update(path=path, rounds=rounds, devices=[device_name(d) for d in jax.local_devices()])
    return figures


# what run_bench measures beside the reference, in the order of a round
VARIANTS = (
    "data_parallel_bound",
    "embedded",
    "separate_processes",
    "grpc",
    "tcp",
    "tcp_compressed",
    "two_groups",
)


def _variant_configs(config: Config, path: str) -> dict[str, Config]:
    """The config of each variant that needs its own: the network path over gRPC
    alone (``grpc``), over the links (``tcp``; ``tls`` too), with bfloat16 gradients
    (``tcp_compressed``), 2 groups of 1 worker (``two_groups``); ``main`` for the
    others (the network path everywhere with ``path="grpc"``)."""

    def network(**cluster) -> Config:
        return config.model_copy(
            update={"cluster": config.cluster.model_copy(update={"transport": "network", **cluster})}
        )

    configs = {"grpc": network(link=False), "tcp": network(), "tcp_compressed": network(compression="bf16")}
    main = configs["tcp"] if path == "grpc" else config
    configs["main"] = main
    configs["two_groups"] = main.model_copy(
        update={
            "cluster": main.cluster.model_copy(
                update={"worker_groups": 2, "workers_per_group": 1, "workers_per_process": 1}
            ),
            "train": main.train.model_copy(update={"batch_size": main.train.batch_size // 2}),
        }
    )
    return configs


def _one_round(
    configs: dict[str, Config], warmup: int, steps: int, runs: dict[str, list[float]], gaps: dict[str, list[float]]
) -> None:
    """Each variant once, its samples/s added to ``runs``; the trained parameters of
    the link's (plain and in TLS) and the compressed run's against gRPC's added to
    ``gaps``."""
    config = configs["main"]
    servers = config.cluster.servers
    runs["single_process"].append(single_process(config, warmup, steps))
    runs["data_parallel_bound"].append(data_parallel_bound(config, warmup, steps))
    runs["embedded"].append(asyncio.run(_psfw(config, warmup, None)))
    with shard_processes(servers) as (addresses, _):
        runs["separate_processes"].append(asyncio.run(_psfw(config, warmup, addresses)))
    with shard_processes(servers) as (addresses, _):  # fresh shards: a run leaves its state
        speed, exact = asyncio.run(_psfw(configs["grpc"], warmup, addresses, final=True))
        runs["grpc"].append(speed)
    for key in ("tcp", "tcp_compressed"):
        with shard_processes(servers) as (addresses, _):
            speed, params = asyncio.run(_psfw(configs[key], warmup, addresses, final=True))
            runs[key].append(speed)
        gaps[key].append(_gap(params, exact, _initial(config)))
    if "tls" in runs:
        speed, params = _tls_run(servers, configs["tcp"], warmup)
        runs["tls"].append(speed)
        gaps["tls"].append(_gap(params, exact, _initial(config)))
    runs["two_groups"].append(asyncio.run(_psfw(configs["two_groups"], warmup, None)))
    if "ddp" in runs:
        runs["ddp"].append(run_ddp(steps, warmup, config.train.batch_size, config.optimizer.learning_rate))


def _figures(runs: dict[str, list[float]], gaps: dict[str, list[float]]) -> dict:
    """Each variant's best round, its ratio to the reference's best and to the data
    parallelism's bound, and every round's ratios."""
    best = {key: max(values) for key, values in runs.items()}
    figures: dict = dict(best)
    ddp = "ddp" in runs
    variants = (*VARIANTS, *(key for key in ("tls", "ddp") if key in runs))
    for key in variants:
        figures[f"{key}_ratio"] = best[key] / best["single_process"]
        figures[f"{key}_round_ratios"] = [
            round(v / r, 3) for v, r in zip(runs[key], runs["single_process"], strict=True)
        ]
    for key in variants[1:]:
        # the share of what data parallelism allows on this machine: comparable across machines
        figures[f"{key}_of_bound"] = best[key] / best["data_parallel_bound"]
    figures["ddp"] = best.get("ddp")  # None: torch is not installed
    figures["tls"] = best.get("tls")  # None: no openssl command to make certificates with
    figures["tls_param_gap"] = max(gaps["tls"]) if gaps["tls"] else None  # TLS against gRPC alone: 0
    # the compressed run's parameters after all its steps against the uncompressed run's
    figures["tcp_compressed_param_gap"] = max(gaps["tcp_compressed"])
    figures["tcp_param_gap"] = max(gaps["tcp"])  # the link against gRPC alone: 0, the same bytes
    if ddp:
        figures["separate_processes_over_ddp"] = best["separate_processes"] / best["ddp"]
    return figures


def _tls_run(servers: int, config: Config, warmup: int) -> tuple[float, dict[str, np.ndarray]]:
    """The network path with shards that serve TLS (throwaway certificates): its
    samples/s and trained parameters."""
    with tempfile.TemporaryDirectory(prefix="psfw-bench-tls-") as folder:
        certs = make_certs(Path(folder))
        security = Security.from_files(ca=str(certs.ca))
        tls_flags = ("--tls-cert", str(certs.cert), "--tls-key", str(certs.key))
        with shard_processes(servers, *tls_flags) as (addresses, _):
            return asyncio.run(_psfw(config, warmup, addresses, final=True, security=security))


__all__ = ["BENCH_CONFIG", "data_parallel_bound", "run_bench"]
