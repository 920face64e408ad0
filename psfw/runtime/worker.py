"""A worker: wait for fresh parameters, compute, report to the stub (in a thread of its own)."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from psfw.base.errors import PsfwError, mark_retrieved
from psfw.compute.batching import BatchOrder
from psfw.compute.datasets import Dataset
from psfw.compute.params import flatten_params, unflatten_params
from psfw.protocol.layout import Layout
from psfw.runtime.devices import device_name
from psfw.runtime.param_cache import ParamCache, Rewind, StepValues
from psfw.runtime.stub import Stub
from psfw.runtime.table_feed import padded_rows, positions
from psfw.runtime.threads import cause_of

# how long a stopped worker's thread may take to finish its step before it is left behind
STOP_WAIT_S = 10.0


@dataclass
class WorkerSpec:
    """What a worker needs beyond its index: shared by the workers of a worker process."""

    layout: Layout
    treedef: Any
    step_fn: Callable  # jitted (params, x, y) -> (loss, metrics, summed_grads); with tables see make_sparse_step
    init: Callable  # model init(key)
    seed: int
    data: Dataset
    order: BatchOrder
    workers_per_group: int
    executor: Executor
    wait_s: float = 120.0
    devices: dict[int, Any] = field(default_factory=dict)  # worker -> its device (absent: JAX's default)
    # the job's worker (group x workers_per_group + worker) -> the device its gradients came from
    seen: dict[int, str] = field(default_factory=dict)
    ids: Callable | None = None  # a model with embedding tables: x -> {table: ids} (Model.ids)


def init_owned(init: Callable, seed: int, names: list[str]) -> dict[str, np.ndarray]:
    """Initialize only ``names``: under jit, XLA drops the work for every other
    parameter, so a worker computes nothing it does not own."""

    def owned(key):
        flat, _ = flatten_params(init(key))
        return {n: flat[n] for n in names}

    return {n: np.asarray(v) for n, v in jax.jit(owned)(jax.random.PRNGKey(seed)).items()}


def _compute(
    spec: WorkerSpec, worker: int, values: StepValues, rows: np.ndarray
) -> tuple[float, dict[str, float], dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """One step of ``worker`` on the data ``rows``: its loss, metrics, the gradients
    of the dense parameters by name, and those of the rows of its process's block by
    table (None for a model without tables)."""
    # only these rows are read (a memory-mapped set), here, off the event loop
    x, y = spec.data.x_train[rows], spec.data.y_train[rows]
    params = unflatten_params(spec.treedef, list(spec.layout.params), values.params)
    device = spec.devices.get(worker)
    if spec.ids is None:
        if device is not None:  # the step's parameters and rows go to the worker's device, once
            params, x, y = jax.device_put((params, x, y), device)
        loss, metrics, grads = spec.step_fn(params, x, y)
        row_grads = None
    else:
        blocks = values.rows
        rows_in, inverse = padded_rows(blocks), positions(blocks, spec.ids(x))
        if device is not None:
            params, rows_in, inverse, x, y = jax.device_put((params, rows_in, inverse, x, y), device)
        loss, metrics, grads, row_grads = spec.step_fn(params, rows_in, inverse, x, y)
    flat, _ = flatten_params(grads)
    key = spec.order.group * spec.workers_per_group + worker
    if key not in spec.seen:
        # a model may have no dense parameters (all in tables): the loss shows the device as well
        computed = next(iter(flat.values()), loss)
        spec.seen[key] = ", ".join(sorted(device_name(d) for d in computed.devices()))
    dense = {n: np.asarray(g) for n, g in flat.items()}  # waits for XLA, off the event loop
    if row_grads is not None:  # a gradient for every row of the process's block (the padding cut off)
        row_grads = {name: np.asarray(g)[: len(blocks[name].ids)] for name, g in row_grads.items()}
    return float(loss), {k: float(v) for k, v in metrics.items()}, dense, row_grads


async def run_worker(spec: WorkerSpec, worker: int, group: int, stub: Stub, cache: ParamCache, steps: int) -> None:
    """Train ``worker`` of ``group`` until the group has completed ``steps`` steps.

    An owner initializes its parameters when the stub asks (a fresh start) and hands
    them over for the Put; then the worker follows the cache in a thread of its own
    (``train_steps``). Cancelling this coroutine stops that thread at its next wait
    for parameters and waits for it up to ``STOP_WAIT_S`` seconds (``_in_thread``).
    """
    stopped = functools.partial(cache.fail, PsfwError(f"worker {worker} of group {group} was stopped"))
    owned = await stub.initial_values(worker)
    if owned:
        try:
            values = await _in_thread(spec.executor, stopped, init_owned, spec.init, spec.seed, owned)
        except PsfwError:
            raise
        except Exception as err:
            raise PsfwError(f"worker {worker} of group {group}: init(key) failed: {cause_of(err)}") from err
        await stub.put(worker, values)
    await _in_thread(spec.executor, stopped, train_steps, spec, worker, stub, cache, steps)


async def _in_thread(executor: Executor, stop: Callable[[], None], fn: Callable, *args: Any) -> Any:
    """``fn(*args)`` in a thread of ``executor``. Cancelled, it calls ``stop`` (the
    worker's thread then ends at its next wait for parameters) and waits for the
    thread up to ``STOP_WAIT_S`` seconds: one still in a long computation is left
    behind (it ends with that step) rather than hold the stop up."""
    loop = asyncio.get_running_loop()
    call = loop.run_in_executor(executor, fn, *args)
    try:
        return await asyncio.shield(call)
    except asyncio.CancelledError:
        # the thread's way out (the stop) is not an error of its own: the cancellation wins
        call.add_done_callback(mark_retrieved)
        stop()
        deadline = loop.time() + STOP_WAIT_S
        while not call.done() and loop.time() < deadline:
            try:
                await asyncio.wait([call], timeout=deadline - loop.time())
            except asyncio.CancelledError:  # a second cancel waits as long as the first
                continue
        raise


def train_steps(spec: WorkerSpec, worker: int, stub: Stub, cache: ParamCache, steps: int) -> None:
    """The worker's loop, in its own thread: wait for each step's fresh parameters,
    compute, report. The whole step runs here, off the event loop, so the loop only
    sees one report per worker per step; after a re-sync the worker goes on where
    the cache says (``Rewind``)."""
    # the stub's own waits (for the shards, for owners' Puts) are bounded by wait_s
    # and name what they waited for: the worker waits longer so that their error wins
    # (and a re-sync has time to finish); its own timeout says what the stub was doing
    patience = 3 * spec.wait_s + 10
    step, generation = cache.start(patience)
    while True:
        waited = time.perf_counter()
        try:
            values = cache.fresh(step, generation, patience)
        except Rewind as rewind:
            step, generation = rewind.step, rewind.generation
            continue
        if step >= steps or 0 < cache.stop_at <= step:
            # the group has completed every step; until then a re-sync (a shard
            # restarted during the last update) may still send the worker back
            return
        started = time.perf_counter()
        rows = spec.order.worker_indices(step, worker, spec.workers_per_group)
        try:
            loss, metrics, grads, row_grads = _compute(spec, worker, values, rows)
        except PsfwError:
            raise
        except Exception as err:  # the model's or the data's: one line that says whose and where
            raise PsfwError(
                f"worker {worker} of group {spec.order.group} failed at step {step}: {cause_of(err)}"
            ) from err
        done = time.perf_counter()
        metrics.update(loss=loss, compute_s=done - started, wait_s=started - waited)
        stub.report(step, worker, grads, len(rows), metrics, generation, row_grads)
        step += 1
