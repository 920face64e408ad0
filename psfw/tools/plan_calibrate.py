"""``psfw plan --calibrate``: what a step's parts cost on this machine, measured
through psfw's own code, for the step model (``psfw.tools.plan_model``).

- An Update (gradients up, the update, values back) of a float32 parameter over a
  shard's link (TCP over loopback, as between hosts) to a real ``psfw server``
  process: a tiny one gives the fixed cost of a message, two large ones the cost of
  a byte; that less the kernel's, half each way, is a pushed and a pulled byte's.
- The shard's update kernel (the jitted optimizer step) alone, for SGD and Adam.
- The benchmark MLP's gradient step (``make_grad_step``, jitted) on sub-batches of
  several sizes.

The result is a JSON file ``psfw plan --constants`` reads.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from psfw.base.atomic import write_atomic
from psfw.tools.plan_model import Constants

SIZES = (4 << 10, 8 << 20, 32 << 20)  # bytes of one Update: tiny, then around the benchmark MLP's 7.45 MB
COMPUTE_ROWS = (4, 16, 64, 128, 256)
# TCP payload of a 1500-byte-MTU Ethernet link over its rate (1448 of every 1514
# bytes a token bucket counts; 948-960 Mbit/s measured at 1 Gbit/s)
PAYLOAD_SHARE = 0.95
SLICE_BYTES = 1 << 20
SHIPPED = Path(__file__).with_name("plan_constants.json")


async def _link_costs(addresses: list[str], repeats: int) -> list[float]:
    """Median seconds of an Update of each of SIZES, one shard each."""
    from psfw.protocol.layout import plan_layout
    from psfw.protocol.messages import UpdateHeader
    from psfw.runtime.shard_client import ShardClient

    sgd = json.dumps({"name": "sgd", "learning_rate": 0.01})
    updates = []
    for size, address in zip(SIZES, addresses, strict=True):
        client = ShardClient(address, 0, timeout_s=120, link=True, same_host=False)
        try:
            await client.open_link()
            if client.linked != "tcp":
                raise RuntimeError(f"the shard at {address} offers no TCP link to measure")
            name = f"w{size}"
            layout = plan_layout({name: ((size // 4,), "float32")}, 1, 1, SLICE_BYTES)
            value = np.full(size // 4, 0.5, np.float32)
            keys = layout.params[name].slices
            await client.put([(name, s.index, value[s.start : s.stop]) for s in keys], sgd)
            grads = {(name, s.index): np.full(s.size, 1e-3, np.float32) for s in keys}
            took = []
            for step in range(repeats + 1):  # the first compiles the kernel and warms the link
                header = UpdateHeader(group=0, step=step, process=0, workers=1, rows=1, workers_per_group=1, wait_s=60)
                started = time.perf_counter()
                await client.update(header, grads, layout.slice_dtype_shape)
                took.append(time.perf_counter() - started)
            updates.append(statistics.median(took[1:]))
        finally:
            await client.close()
    return updates


def _kernel_cost(optimizer: str, repeats: int) -> float:
    """Seconds per parameter byte of the shard's jitted update (one contribution)."""
    import jax.numpy as jnp

    from psfw.services.kernel import UpdateKernel

    spec = {"sgd": {"name": "sgd", "learning_rate": 0.01}, "adam": {"name": "adam", "learning_rate": 0.001}}
    kernel = UpdateKernel(json.dumps(spec[optimizer]))
    took = []
    for size in SIZES[1:]:
        values = {("w", 0): jnp.full(size // 4, 0.5, jnp.float32)}
        states = {("w", 0): kernel.init(values[("w", 0)])}
        grads = {("w", 0): [np.full(size // 4, 1e-3, np.float32)]}
        times = []
        for _ in range(repeats + 1):
            started = time.perf_counter()
            out = kernel.run(False, grads, states, values, np.float32(1))
            out[0][("w", 0)].block_until_ready()
            times.append(time.perf_counter() - started)
        took.append(statistics.median(times[1:]))
    return max(0.0, (took[1] - took[0]) / (SIZES[2] - SIZES[1]))


def bench_compute(rows: tuple[int, ...] = COMPUTE_ROWS, repeats: int = 5) -> list[float]:
    """Median seconds of the benchmark MLP's jitted gradient step on each sub-batch size."""
    import jax

    from psfw.compute.step import make_grad_step
    from psfw.jobs.job import build_job
    from psfw.tools.bench import bench_config

    job = build_job(bench_config(1))
    params = job.model.init(jax.random.PRNGKey(0))
    step = make_grad_step(job.model.loss)
    seconds = []
    for count in rows:
        x, y = job.data.x_train[:count], job.data.y_train[:count]
        times = []
        for _ in range(repeats + 1):
            started = time.perf_counter()
            jax.block_until_ready(step(params, x, y))
            times.append(time.perf_counter() - started)
        seconds.append(statistics.median(times[1:]))
    return seconds


def machine() -> dict:
    """Which machine: its CPU model, cores, the date and psfw's version."""
    from psfw.version import __version__

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "date": datetime.date.today().isoformat(),
        "psfw": __version__,
    }


def calibrate(repeats: int = 5) -> Constants:
    """Measure this machine's constants (about half a minute)."""
    from psfw.jobs.shard_processes import shard_processes
    from psfw.protocol.chunks import CHUNK_BYTES

    with shard_processes(len(SIZES)) as (addresses, _):
        updates = asyncio.run(_link_costs(addresses, repeats))
    round_trip = max(0.0, (updates[2] - updates[1]) / (SIZES[2] - SIZES[1]))
    kernels = {name: _kernel_cost(name, repeats) for name in ("sgd", "adam")}
    each_way = max(round_trip - kernels["sgd"], 0.5 * round_trip) / 2
    return Constants(
        machine=machine(),
        payload_share=PAYLOAD_SHARE,
        per_message_s=updates[0],
        push_s_per_byte=each_way,
        pull_s_per_byte=each_way,
        update_s_per_byte=kernels,
        chunk_bytes=CHUNK_BYTES,
        compute_rows=list(COMPUTE_ROWS),
        compute_s=bench_compute(COMPUTE_ROWS, repeats),
    )


def write_constants(constants: Constants, path: Path) -> None:
    write_atomic(path, (json.dumps(constants._asdict(), indent=1) + "\n").encode())


def read_constants(path: Path | None = None) -> Constants:
    """The constants in ``path`` (default: the ones shipped with psfw).

    Raises:
        ValueError: not a constants file, in one line.
    """
    path = SHIPPED if path is None else Path(path)
    try:
        data = json.loads(path.read_text())
        constants = Constants(**data)
    except FileNotFoundError:
        raise ValueError(f"--constants {path}: no such file (make one with psfw plan --calibrate --out FILE)") from None
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(
            f"--constants {path}: not a constants file ({type(err).__name__}); make one with psfw plan --calibrate"
        ) from None
    if "adam" not in constants.update_s_per_byte or len(constants.compute_rows) < 2:
        raise ValueError(f"--constants {path}: incomplete; make it again with psfw plan --calibrate")
    return constants


__all__ = ["SHIPPED", "bench_compute", "calibrate", "machine", "read_constants", "write_constants"]
