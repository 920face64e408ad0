"""The stub: one coroutine per process between its workers and the shards.

Each step it collects the row-weighted gradient sums of all local workers, adds them
up per parameter, sends one Update per shard (all shards at once), and publishes the
fresh values the shards answer with. At the start it Puts the parameters its local
owners initialized (one Put per shard) and Gets the rest (one Get per shard).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
import jax
import numpy as np

from psfw.base.errors import PsfwError, ShardError, WaitTimeout
from psfw.protocol.messages import Gradients, UpdateHeader
from psfw.protocol.wire import param_buffers, slice_views
from psfw.runtime.fetch import fetch_params, fetch_rows, put_params, row_gets
from psfw.runtime.gradient_sums import GradientStage, shard_sums
from psfw.runtime.lockstep import Lockstep
from psfw.runtime.param_cache import StepValues
from psfw.runtime.process_setup import ProcessSetup
from psfw.runtime.sync import ShardSync
from psfw.runtime.table_feed import TableFeed
from psfw.runtime.waiting import GroupWait, whole_or_none
from psfw.runtime.whole_params import whole_params
from psfw.runtime.worker_report import TIMES, StopRequest, WorkerReport, step_metrics

log = logging.getLogger(__name__)


# A shard said the cluster moved under us (restored, restarted, rolled back) or it is
# unreachable for longer than the client's retries: re-sync instead of failing.
RESYNC_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION)


class Stub:
    """The stub of the worker process ``setup`` describes, for its local ``workers`` (their
    indices in the group). ``optimizer``: the shards' optimizer (JSON spec), named by
    the first Put; ``on_metrics``: takes each step's report; ``worker_groups``,
    ``staleness``: the job's groups and their bound (None: none); ``group_timeout_s``:
    how long a group may send no Update before the shards count it as gone (None:
    never); ``max_groups``: the groups that may train (0: ``worker_groups``, -1: any
    number); ``checkpoint_every``:
    group 0's steps between checkpoints; ``on_start``: told ``(group, step)`` once the
    stub knows where its group starts; ``tables``: the embedding-table rows this
    process needs (None: the model has no tables); ``stop``: the evaluating process's
    early end of the job (train.stop_after)."""

    def __init__(
        self,
        setup: ProcessSetup,
        *,
        workers: list[int],
        workers_per_group: int,
        optimizer: str,
        on_metrics: Callable[[dict[str, Any]], None] | None = None,
        worker_groups: int = 1,
        staleness: int | None = None,
        group_timeout_s: float | None = None,
        max_groups: int = 0,
        checkpoint_every: int = 0,
        on_start: Callable[[int, int], None] | None = None,
        tables: TableFeed | None = None,
        stop: StopRequest | None = None,
    ):
        self.clients, self.layout, self.cache = setup.clients, setup.layout, setup.cache
        self.group, self.process, self.workers = setup.group, setup.process, list(workers)
        self.workers_per_group, self.optimizer, self.wait_s = workers_per_group, optimizer, setup.wait_s
        self.on_metrics = on_metrics
        self.worker_groups, self.warmup_steps = worker_groups, setup.warmup_steps
        self.staleness = -1 if staleness is None else staleness
        self.group_timeout_s, self.max_groups = group_timeout_s or 0.0, max_groups
        self.checkpoint_every = checkpoint_every
        # the job's identity (psfw.base.identity); shards that hold another job are refused,
        # and joining this job where this group has advanced needs ``resume``
        self.identity, self.resume = setup.identity, setup.resume
        self.on_start = on_start
        self.pipeline = setup.pipeline
        self.tables = tables
        self.fingerprint = self.identity["fingerprint"] if self.identity is not None else ""
        self.group_processes = workers_per_group // max(len(self.workers), 1)
        self.slowest_step = 0  # the slowest group's completed steps, from the last answer
        self.group_metrics: tuple[dict[str, float], int] = ({}, 0)  # the group's, x rows, of the last step
        self.epoch = 0  # the shards' restore count this stub is synced to
        self.stop = stop
        self.stop_at = 0  # the step count the job ends at early, as the shards answered (0: none)
        self._loop = asyncio.get_running_loop()
        self._inbox: asyncio.Queue[WorkerReport] = asyncio.Queue()
        self._puts: asyncio.Queue[dict[str, np.ndarray]] = asyncio.Queue()
        self._wanted: asyncio.Future[dict[int, list[str]]] = self._loop.create_future()
        self.rpcs = {"Put": 0, "Get": 0, "Update": 0}
        self._whole_params = jax.jit(functools.partial(whole_params, self.layout))
        self.sync = ShardSync(setup)
        self._header = self._shared_header()
        # says whom a step waits for
        self.group_wait = GroupWait(self.clients, self.group, self.process, self.group_processes)
        self.layout_slices = [self.layout.shard_slices(i) for i in range(len(self.clients))]  # what each shard holds
        # where the transports want a step's tensors (a shared region), if they say
        self.buffers = next((c.step_buffers for c in self.clients if c.step_buffers is not None), None)
        self._stage, self._staged = None, {}
        if self.buffers is not None:
            self._stage = GradientStage(self.buffers.gradients(), lambda: self.cache.generation)
            self._staged = slice_views(self.layout, self.buffers.gradients())

    def _shared_header(self) -> UpdateHeader:
        """The fields every Update of this process shares."""
        return UpdateHeader(
            group=self.group,
            step=0,
            process=self.process,
            workers=len(self.workers),
            rows=0,
            workers_per_group=self.workers_per_group,
            worker_groups=self.worker_groups,
            staleness=self.staleness,
            group_processes=self.group_processes,
            checkpoint_every=self.checkpoint_every if self.group == 0 else 0,
            job=self.fingerprint,
            wait_s=self.wait_s,
            group_timeout_s=self.group_timeout_s,
            max_groups=self.max_groups,
        )

    # -- what workers call ---------------------------------------------------

    async def initial_values(self, worker: int) -> list[str]:
        """The parameters ``worker`` must initialize and hand to ``put``: the ones it
        owns on a fresh start, none when the shards hold them already (a resume)."""
        return (await asyncio.shield(self._wanted)).get(worker, [])

    async def put(self, worker: int, values: dict[str, np.ndarray]) -> None:
        """Hand over the initial values an owner worker made for its parameters."""
        wrong = sorted(n for n in values if self.layout.params[n].owner != worker)
        if wrong or worker not in self.workers:
            raise PsfwError(f"worker {worker} of process {self.process} does not own {wrong}")
        await self._puts.put(values)

    def report(
        self,
        step: int,
        worker: int,
        grads: dict[str, np.ndarray],
        rows: int,
        metrics: dict,
        generation: int = 0,
        row_grads: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Report a worker's summed gradients (gradient of the summed loss) for a
        step: ``grads`` of the dense parameters by name, ``row_grads`` of the table
        rows the cache published by table. Called from the worker's thread (safe from
        any thread), where the gradients are added into the step's buffers when the
        stub has some."""
        if self._stage is not None and not self._stage.add(step, generation, grads):
            return  # computed before a re-sync: dropped
        self._loop.call_soon_threadsafe(
            self._inbox.put_nowait, WorkerReport(worker, step, generation, grads, rows, metrics, row_grads)
        )

    # -- the coroutine -------------------------------------------------------

    async def run(self, steps: int) -> None:
        """Join the shards (fresh start or resume), then serve the local workers until
        the group has completed ``steps`` steps; re-sync when the shards moved."""
        try:
            step = await self._join(steps)
            last = time.perf_counter()
            batch = None
            while step < (min(steps, self.stop_at) if self.stop_at else steps):
                try:
                    batch = batch or await self._collect(step)
                    comm_s = await self._step(step, batch)
                except ShardError as err:
                    if err.code not in RESYNC_CODES:
                        raise
                    log.warning("process %d step %d: %s", self.process, step, err)
                    if not await self.sync.can_retry(step, self.epoch):
                        step, batch = await self._resync(), None
                        last = time.perf_counter()
                    continue  # the same contributions again: a shard adds them once
                now = time.perf_counter()
                self._report(step, batch, comm_s, now - last)
                last, batch = now, None
                step += 1
        except BaseException as err:
            if not self._wanted.done():
                self._wanted.set_exception(PsfwError(f"the stub of process {self.process} failed: {err}"))
                self._wanted.exception()
            self.cache.fail(err)
            raise

    async def _collect(self, step: int) -> list[WorkerReport]:
        self.cache.doing(lambda: f"waiting for its workers' gradients of step {step}")
        batch: list[WorkerReport] = []
        while len(batch) < len(self.workers):
            c = await self._inbox.get()
            if c.generation != self.cache.generation:
                continue  # computed before a re-sync: dropped
            if c.step != step:
                raise PsfwError(f"process {self.process}: worker {c.worker} reported step {c.step} during {step}")
            batch.append(c)
        return batch

    async def _join(self, steps: int) -> int:
        self.cache.doing("joining the shards")
        await self.sync.refuse_second_start()
        replies = await self.sync.settle()
        self.epoch = replies[0].epoch
        start, joins = await self.sync.start(replies)
        self.sync.check_job(replies, start, steps)
        if self.on_start is not None:
            self.on_start(self.group, start)
        held = {(s.key, s.slice) for r in replies for s in r.slices}
        wanted: dict[int, list[str]] = {}
        if self.group == 0 and start == 0:
            for w in self.workers:
                names = [
                    n
                    for n in self.layout.owned_by(w)
                    if any((n, s.index) not in held for s in self.layout.params[n].slices)
                ]
                if names:
                    wanted[w] = names
        self._wanted.set_result(wanted)
        if self.tables is not None and self.group == 0 and start == 0 and 0 in self.workers:
            await self._declare_tables()  # worker 0 of group 0 owns the tables: its process declares them
        values: dict[str, np.ndarray] = {}
        for _ in wanted:
            values.update(await self._puts.get())
        if values:
            await self._put_all(values)
        missing = [n for n in self.layout.params if n not in values]
        # another group starts from group 0 after its warmup steps; a group that joins
        # from the current values (its own step 0 is every shard's now)
        source = (0, self.warmup_steps) if self.group != 0 and start == 0 else (self.group, 0 if joins else start)
        if source[0] != self.group:
            await self.sync.await_warmup()
        if missing:
            values.update(await self._get_all(*source, missing))
        published = {n: jax.device_put(values[n]) for n in self.layout.params}
        self.cache.publish(start, await self._with_rows(published, *source, start))
        if joins and start:
            log.warning("process %d: group %d joins the job at step %d", self.process, self.group, start)
        return start

    async def _declare_tables(self) -> None:
        """Declare the job's embedding tables to every shard (each holds rows of each)."""
        self.rpcs["Put"] += len(self.clients)
        job = json.dumps(self.identity) if self.identity is not None else ""
        declaration = self.tables.declaration
        await asyncio.gather(*(c.put([], self.optimizer, job, declaration) for c in self.clients))

    async def _with_rows(self, params: dict[str, Any], group: int, step: int, at: int) -> StepValues:
        """``params`` and the table rows of step ``at``, as ``group`` has them after
        ``step`` steps (one Get per shard that holds any of them)."""
        if self.tables is None:
            return StepValues(params)
        ids = self.tables.block_ids(at)
        self.rpcs["Get"] += len(row_gets(self.tables, ids))
        rows = await fetch_rows(self.clients, self.tables, ids, group, step, self.wait_s, self.fingerprint)
        self.tables.count(rows, pulled=True)
        return StepValues(params, *self.tables.published(at, rows))

    async def _resync(self) -> int:
        self.cache.doing("re-syncing with the shards")
        replies = await self.sync.settle()
        self.epoch = replies[0].epoch
        start, joins = await self.sync.start(replies)
        self.sync.check_job(replies, 0, 1)  # a shard restarted with another job's checkpoint: stop, naming it
        at = 0 if joins else start  # a group that joins: the current values (some shards may not know it yet)
        params = await self._get_all(self.group, at, list(self.layout.params))
        values = await self._with_rows({n: jax.device_put(v) for n, v in params.items()}, self.group, at, start)
        while not self._inbox.empty():
            self._inbox.get_nowait()
        self.cache.rewind(start, values)
        log.warning("process %d re-synced at step %d (epoch %d)", self.process, start, self.epoch)
        return start

    async def _put_all(self, values: dict[str, np.ndarray]) -> None:
        job = json.dumps(self.identity) if self.identity is not None else ""
        self.rpcs["Put"] += await put_params(self.clients, self.layout, values, self.optimizer, job)

    async def _get_all(self, group: int, step: int, names: list[str]) -> dict[str, np.ndarray]:
        self.rpcs["Get"] += len({s.shard for n in names for s in self.layout.params[n].slices})
        return await fetch_params(
            self.clients, self.layout, group, step, names, self.wait_s, wait_for_put=True, job=self.fingerprint
        )

    async def _step(self, step: int, batch: list[WorkerReport]) -> float:
        rows = sum(c.rows for c in batch)
        # the shards add up every process's metrics x rows: the answer has the group's
        metrics = {k: sum(float(c.metrics[k]) * c.rows for c in batch) for k in batch[0].metrics if k not in TIMES}
        header = dataclasses.replace(self._header, step=step, rows=rows, metrics=metrics, epoch=self.epoch)
        if self.stop is not None and self.stop.at(step):
            header = dataclasses.replace(header, stop_at=self.stop.at(step))
        # shards that answer with their own immutable arrays: whole parameters are put
        # together by one jitted call (the only copy); the others write their answers
        # straight into the step's buffers (a shared region), else into new aligned ones
        shares = all(c.capabilities.shares_arrays for c in self.clients)
        if shares:
            fresh, into = {}, None
        elif self.buffers is not None:
            fresh, into = self.buffers.values(step)
        else:
            fresh, into = param_buffers(self.layout, self.layout.params)
        started = time.perf_counter()
        sums = self._sums([c.grads for c in batch])
        self.rpcs["Update"] += len(self.clients)
        waiting = set(range(len(self.clients)))

        def note() -> str:  # formatted only if a worker's wait runs out
            return f"waiting for shards {sorted(waiting)} to answer the Update of step {step}"

        if self.tables is None:
            heads = [header] * len(self.clients)
        else:  # in a thread: it reads the next step's rows of data and runs the model's ids() on them
            heads = await asyncio.to_thread(self.tables.headers, header, step, [c.row_grads for c in batch])
        pipelined = self._pipelined(batch)
        heads = [dataclasses.replace(h, pipelined=p) for h, p in zip(heads, pipelined, strict=True)]
        # the pipelined Updates leave in step: each shard gets a slice from every worker at about one time
        lockstep = Lockstep() if sum(pipelined) > 1 else None

        async def send(shard: int):
            client, expect = self.clients[shard], self.layout.slice_dtype_shape
            if pipelined[shard]:
                answer = await client.update(heads[shard], sums[shard], expect, into, lockstep=lockstep)
            else:
                answer = await client.update(heads[shard], sums[shard], expect, into)
            waiting.discard(shard)
            self.cache.doing(note)  # an answer is progress
            return answer

        self.cache.doing(note)
        watch = self.group_wait.watch(step, waiting)
        try:
            sending = asyncio.gather(*(send(i) for i in range(len(self.clients))))
            # shards in other OS processes stop apart from this one: a stop lets the sends end whole
            replies = await (sending if shares else whole_or_none(sending))
        finally:
            if watch is not None:
                watch.cancel()
        comm_s = time.perf_counter() - started
        for shard, answer in enumerate(replies):
            if answer.step != step + 1:
                raise WaitTimeout(f"shard {shard} answered step {answer.step} for the update of step {step}")
        self.slowest_step = min(answer.slowest_step for answer in replies)
        self.stop_at = self.cache.stop_at = max(answer.stop_at for answer in replies) or self.stop_at
        self.group_metrics = next(((a.metrics, a.rows) for a in replies if a.rows), ({}, 0))
        if shares:
            slices = {key: value for answer in replies for key, value in answer.values.items()}
            published = self._whole_params(slices)
        else:
            # published as the arrays they are: each worker's jitted step adopts them
            # (64-byte aligned: no copy; a device_put here costs more); new every step,
            # or not written over while a worker reads them (psfw.runtime.step_region)
            published = dict(fresh)
        values = StepValues(published)
        if self.tables is not None:
            rows = self.tables.assemble([answer.table_rows for answer in replies])
            self.tables.count(rows, pulled=True)
            values = StepValues(published, *self.tables.published(step + 1, rows))
        self.cache.publish(step + 1, values)
        return comm_s

    def _pipelined(self, batch: list[WorkerReport]) -> list[bool]:
        """Which shards are asked to answer this step's Update slice by slice
        (``psfw.services.slice_rounds``): those whose transport can, in a job of one
        group (another group's checkpoint never sees a step half applied), when
        every gradient is finite (a refused step then leaves nothing applied)."""
        wanted = [
            self.pipeline and self.worker_groups == 1 and not self.max_groups and c.pipelines for c in self.clients
        ]
        # a sum is finite only where every element is (and a sum that overflows sends the step whole)
        grads = [g for c in batch for g in (*c.grads.values(), *(c.row_grads or {}).values())]
        if any(wanted) and not all(np.isfinite(np.sum(g)) for g in grads):
            return [False] * len(self.clients)
        return wanted

    def _sums(self, grads: list[dict[str, np.ndarray]]) -> list[Gradients]:
        staged = self._staged if self._stage is not None else None
        return shard_sums(self.clients, self.layout_slices, grads, staged)

    def _report(self, step: int, batch: list[WorkerReport], comm_s: float, wall_s: float) -> None:
        if self.on_metrics is None:
            return
        report: dict[str, Any] = {"group": self.group, "process": self.process, "step": step}
        report.update(step_metrics(batch, self.group_metrics, comm_s, wall_s))
        if self.worker_groups > 1 or self.max_groups:
            # how far this group runs ahead of the slowest group (SSP bounds it by staleness)
            report.update(slowest_step=self.slowest_step, lead=step + 1 - self.slowest_step)
        self.on_metrics(report)
