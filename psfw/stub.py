"""The stub: one coroutine per process between its workers and the shards.

Each step it collects the row-weighted gradient sums of all local workers, adds them
up per parameter, sends one Update per shard (all shards at once), and publishes the
fresh values the shards answer with. At the start it Puts the parameters its local
owners initialized (one Put per shard) and Gets the rest (one Get per shard).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from psfw.cache import ParamCache
from psfw.client import ShardClient
from psfw.errors import PsfwError, WaitTimeout
from psfw.layout import Layout, SliceKey, SliceSpec
from psfw.wire import param_buffers


class Contribution:
    """One worker's report for one step."""

    __slots__ = ("worker", "grads", "rows", "metrics")

    def __init__(self, worker: int, grads: dict[str, np.ndarray], rows: int, metrics: dict[str, float]):
        self.worker, self.grads, self.rows, self.metrics = worker, grads, rows, metrics


class Stub:
    def __init__(
        self,
        *,
        clients: list[ShardClient],
        layout: Layout,
        cache: ParamCache,
        group: int,
        process: int,
        workers: list[int],
        workers_per_group: int,
        optimizer: str,
        wait_s: float = 120.0,
        on_metrics: Callable[[dict[str, Any]], None] | None = None,
        worker_groups: int = 1,
        staleness: int | None = None,
        warmup_steps: int = 0,
    ):
        self.clients, self.layout, self.cache = clients, layout, cache
        self.group, self.process, self.workers = group, process, list(workers)
        self.workers_per_group, self.optimizer, self.wait_s = workers_per_group, optimizer, wait_s
        self.on_metrics = on_metrics
        self.worker_groups, self.warmup_steps = worker_groups, warmup_steps
        self.staleness = -1 if staleness is None else staleness
        self.slowest_step = 0  # the slowest group's completed steps, from the last answer
        self._inbox: asyncio.Queue[Contribution] = asyncio.Queue()
        self._puts: asyncio.Queue[dict[str, np.ndarray]] = asyncio.Queue()
        self.rpcs = {"Put": 0, "Get": 0, "Update": 0}

    # -- what workers call ---------------------------------------------------

    async def put(self, worker: int, values: dict[str, np.ndarray]) -> None:
        """Hand over the initial values an owner worker made for its parameters."""
        wrong = sorted(n for n in values if self.layout.params[n].owner != worker)
        if wrong or worker not in self.workers:
            raise PsfwError(f"worker {worker} of process {self.process} does not own {wrong}")
        await self._puts.put(values)

    async def update(self, step: int, worker: int, grads: dict[str, np.ndarray], rows: int, metrics: dict) -> None:
        """Report a worker's summed gradients (gradient of the summed loss) for a step."""
        await self._inbox.put(Contribution(worker, grads, rows, {**metrics, "step": step}))

    # -- the coroutine -------------------------------------------------------

    async def run(self, start_step: int, steps: int) -> None:
        """Serve the local workers from ``start_step`` until ``steps`` are done."""
        try:
            await self._initial_sync(start_step)
            last = time.perf_counter()
            for step in range(start_step, steps):
                batch = [await self._inbox.get() for _ in self.workers]
                bad = [c.metrics["step"] for c in batch if c.metrics["step"] != step]
                if bad:
                    raise PsfwError(f"process {self.process} got reports for steps {bad} during step {step}")
                comm_s = await self._step(step, batch)
                now = time.perf_counter()
                self._report(step, batch, comm_s, now - last)
                last = now
        except BaseException as err:
            await self.cache.fail(err)
            raise

    async def _initial_sync(self, step: int) -> None:
        local_owners = {self.layout.params[n].owner for n in self.layout.params} & set(self.workers)
        values: dict[str, np.ndarray] = {}
        if step == 0 and self.group == 0:
            for _ in local_owners:
                values.update(await self._puts.get())
            await self._put_all(values)
        missing = [n for n in self.layout.params if n not in values]
        if missing:
            if self.group == 0 or step > 0:
                values.update(await self._get_all(self.group, step, missing))
            else:  # another group starts from what group 0 has after its warmup steps
                values.update(await self._get_all(0, self.warmup_steps, missing))
        await self.cache.publish(step, {n: jax.device_put(values[n]) for n in self.layout.params})

    async def _put_all(self, values: dict[str, np.ndarray]) -> None:
        by_shard: dict[int, list] = {}
        for name, value in values.items():
            flat = np.asarray(value).reshape(-1)
            for s in self.layout.params[name].slices:
                by_shard.setdefault(s.shard, []).append((name, s.index, flat[s.start : s.stop]))
        self.rpcs["Put"] += len(by_shard)
        await asyncio.gather(*(self.clients[i].put(items, self.optimizer) for i, items in by_shard.items()))

    async def _get_all(self, group: int, step: int, names: list[str]) -> dict[str, np.ndarray]:
        self.rpcs["Get"] += len({s.shard for n in names for s in self.layout.params[n].slices})
        return await fetch_params(self.clients, self.layout, group, step, names, self.wait_s, wait_for_put=True)

    async def _step(self, step: int, batch: list[Contribution]) -> float:
        rows = sum(c.rows for c in batch)
        grads = [c.grads for c in batch]
        fresh, into = param_buffers(self.layout, self.layout.params)
        started = time.perf_counter()

        async def send(shard: int) -> tuple[int, dict[SliceKey, np.ndarray]]:
            # each shard's slices are summed in a thread of their own, and sent as
            # soon as they are ready: the shards' sums run side by side
            items = await asyncio.to_thread(_sum_slices, self.layout.shard_slices(shard), grads)
            return await self.clients[shard].update(
                group=self.group,
                step=step,
                process=self.process,
                workers=len(batch),
                rows=rows,
                workers_per_group=self.workers_per_group,
                worker_groups=self.worker_groups,
                staleness=self.staleness,
                items=items,
                expect=self.layout.slice_dtype_shape,
                wait_s=self.wait_s,
                into=into,
            )

        self.rpcs["Update"] += len(self.clients)
        replies = await asyncio.gather(*(send(i) for i in range(len(self.clients))))
        comm_s = time.perf_counter() - started
        for shard, answer in enumerate(replies):
            if answer.step != step + 1:
                raise WaitTimeout(f"shard {shard} answered step {answer.step} for the update of step {step}")
        self.slowest_step = min(answer.slowest_step for answer in replies)
        # the buffers are 64-byte aligned and new every step: JAX adopts them, no copy
        await self.cache.publish(step + 1, {n: jax.device_put(v) for n, v in fresh.items()})
        return comm_s

    def _report(self, step: int, batch: list[Contribution], comm_s: float, wall_s: float) -> None:
        if self.on_metrics is None:
            return
        rows = sum(c.rows for c in batch)
        report: dict[str, Any] = {"group": self.group, "process": self.process, "step": step, "rows": rows}
        for key in batch[0].metrics:
            if key not in ("step", "compute_s", "wait_s"):
                report[key] = sum(float(c.metrics[key]) * c.rows for c in batch) / rows
        compute_s = max(c.metrics["compute_s"] for c in batch)
        report.update(compute_s=compute_s, comm_s=comm_s, wait_s=max(0.0, wall_s - compute_s - comm_s), wall_s=wall_s)
        if self.worker_groups > 1:
            # how far this group runs ahead of the slowest group (SSP bounds it by staleness)
            report.update(slowest_step=self.slowest_step, lead=step + 1 - self.slowest_step)
        self.on_metrics(report)


async def fetch_params(
    clients: list[ShardClient],
    layout: Layout,
    group: int,
    step: int,
    names: list[str],
    wait_s: float,
    wait_for_put: bool = False,
) -> dict[str, np.ndarray]:
    """Whole parameters ``names`` once ``group`` has completed ``step`` steps: one
    Get per shard, all shards at once. With ``wait_for_put``, the shards wait (up to
    ``wait_s``) for slices whose owners in other processes have not put them yet."""
    by_shard: dict[int, list[SliceKey]] = {}
    for name in names:
        for s in layout.params[name].slices:
            by_shard.setdefault(s.shard, []).append((name, s.index))
    params, into = param_buffers(layout, names)

    async def fetch(shard: int, keys: list[SliceKey]) -> None:
        await clients[shard].get(group, step, keys, layout.slice_dtype_shape, wait_s, into, wait_for_put)

    await asyncio.gather(*(fetch(i, keys) for i, keys in by_shard.items()))
    return params


def _sum_slices(slices: list[SliceSpec], grads: list[dict[str, np.ndarray]]) -> list[tuple[str, int, np.ndarray]]:
    """The workers' gradients summed slice by slice: ``(key, index, sum)`` items."""
    items = []
    for s in slices:
        parts = [g[s.key].reshape(-1)[s.start : s.stop] for g in grads]
        total = parts[0] if len(parts) == 1 else np.add(parts[0], parts[1])
        for part in parts[2:]:
            np.add(total, part, out=total)
        items.append((s.key, s.index, total))
    return items
