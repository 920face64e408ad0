"""Worker processes of a job run inside this OS process.

A worker process is a group's share of workers (``workers_per_process``) with its
own stub, parameter cache and transports to the shards; several may run inside one
OS process, their workers in threads of one pool. ``psfw train`` runs every worker
process of the job here, ``psfw worker`` the ones it is told to, the benchmark its
own selection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from psfw.base.errors import ConfigError, PsfwError, UsageError
from psfw.base.security import NO_SECURITY, Security
from psfw.compute.step import make_grad_step, make_sparse_step
from psfw.jobs.job import Job, warn_empty_shards
from psfw.jobs.progress import StepReporter
from psfw.runtime.connect import connect_all
from psfw.runtime.devices import describe_devices, worker_devices
from psfw.runtime.grpc_channel import Locate
from psfw.runtime.param_cache import ParamCache, StepValues
from psfw.runtime.process_setup import ProcessSetup
from psfw.runtime.stub import Stub
from psfw.runtime.threads import Threads, cause_of
from psfw.runtime.transport import Transport
from psfw.runtime.worker import WorkerSpec, run_worker
from psfw.runtime.worker_report import StopRequest
from psfw.services.server import in_process

__all__ = ["job_devices", "run_worker_processes"]


async def run_worker_processes(
    job: Job,
    addresses: list[str],
    *,
    processes: list[int] | None = None,
    reporter: StepReporter | None = None,
    security: Security = NO_SECURITY,
    resume: bool = False,
    on_start: Callable[[int, int], None] | None = None,
    watch: Callable[[int, StepValues], None] | None = None,
    devices: dict[int, str] | None = None,
    stop: StopRequest | None = None,
    locate: Locate | None = None,
) -> list[Stub]:
    """Run worker processes of ``job`` (default: all) in this OS process, each with
    its own stub, cache and channels, against the shards at ``addresses``.
    ``resume``: continue the job where the shards hold it (else a worker process
    whose group has advanced there is refused, see ``Stub``).

    Process ``p`` is local process ``p % processes_per_group`` of group
    ``p // processes_per_group`` and runs ``workers_per_process`` workers, each on
    its device (``cluster.devices``). ``watch`` sees process 0's every new step
    (the evaluation), and ``stop`` is process 0's early end of the job
    (``train.stop_after``); ``devices`` (worker -> device) is filled with where each
    worker's gradients were computed, as seen on the arrays; ``locate``: where a
    shard listens now, for shards an engine moves (``psfw.runtime.connect``).
    """
    c = job.config.cluster
    processes = _check_processes(job, addresses, processes)
    if 0 in processes:  # once per job: the OS process that runs process 0
        warn_empty_shards(job)
    # the devices of every worker run in this OS process, in turn: processes here spread over them too
    chosen = job_devices(job, len(processes))
    stubs: list[Stub] = []
    async with AsyncExitStack() as stack:
        # one thread per worker, held for the whole job (its steps run there): nothing
        # else may be submitted to this pool, it would wait for the job's end; a stop
        # does not wait for a thread left in a long step (see run_worker)
        executor = Threads(len(processes) * c.workers_per_process, thread_name_prefix="psfw-worker")
        stack.callback(executor.close)
        here = _ProcessesHere(
            job, addresses, executor, stack, security, resume, reporter, on_start, watch, stop, devices, locate
        )
        async with _first_cause(), asyncio.TaskGroup() as tasks:
            for index, process in enumerate(processes):
                mine = chosen[index * c.workers_per_process : (index + 1) * c.workers_per_process]
                stubs.append(await here.start(process, mine, tasks))
    return stubs


def _check_processes(job: Job, addresses: list[str], processes: list[int] | None) -> list[int]:
    """The worker processes to run (default: all of the job's): UsageError for one
    the job does not have, ConfigError when the shard addresses are not the
    config's count."""
    c = job.config.cluster
    total = c.worker_groups * c.processes_per_group
    processes = list(range(total)) if processes is None else processes
    limit = c.groups_limit
    wrong = [p for p in processes if p < 0 or (limit is not None and p >= limit * c.processes_per_group)]
    if wrong:
        most = (limit or 0) * c.processes_per_group
        hint = "" if limit != c.worker_groups else " (cluster.max_groups lets more groups join a running job)"
        raise UsageError(
            f"process {wrong[0]} does not exist: the cluster of {job.config.source} has processes 0..{most - 1}{hint}"
        )
    if len(addresses) != c.servers:
        raise ConfigError(
            f"{job.config.source}: cluster.servers: {c.servers} shards, but {len(addresses)} shard addresses were given"
        )
    return processes


class _ProcessesHere:
    """The worker processes run in this OS process: what they share (the job, the
    shards' addresses, the workers' thread pool, the run's options) and how one
    starts: its workers' spec, its transports, its cache and stub, and their tasks."""

    def __init__(
        self,
        job: Job,
        addresses: list[str],
        executor: Threads,
        stack: AsyncExitStack,
        security: Security,
        resume: bool,
        reporter: StepReporter | None,
        on_start: Callable[[int, int], None] | None,
        watch: Callable[[int, StepValues], None] | None,
        stop: StopRequest | None,
        seen: dict[int, str] | None,
        locate: Locate | None = None,
    ):
        self.job, self.addresses, self.executor, self.stack = job, addresses, executor, stack
        self.security, self.resume, self.reporter, self.on_start = security, resume, reporter, on_start
        self.watch, self.stop, self.seen, self.locate = watch, stop, seen, locate
        self.tables = bool(job.model.tables)
        self.step_fn = make_sparse_step(job.model.loss) if self.tables else make_grad_step(job.model.loss)
        self.identity = job.identity()

    async def start(self, process: int, devices: list[Any], tasks: asyncio.TaskGroup) -> Stub:
        """Start worker process ``process``, its workers on ``devices``: its stub's
        task and one task per worker in ``tasks``; returns its stub."""
        job, c = self.job, self.job.config.cluster
        group, local = divmod(process, c.processes_per_group)
        workers = list(range(local * c.workers_per_process, (local + 1) * c.workers_per_process))
        spec = self._worker_spec(group, workers, devices)
        clients = await self._connect(process, group, workers, devices)
        cache = ParamCache(group, process)
        if process == 0 and self.watch is not None:
            cache.watchers.append(self.watch)
        stub = self._stub(process, group, workers, clients, cache)
        tasks.create_task(_named(f"the stub of process {process}", stub.run(job.steps)), name=f"stub-{process}")
        for w in workers:
            worker = _named(f"worker {w} of group {group}", run_worker(spec, w, group, stub, cache, job.steps))
            tasks.create_task(worker, name=f"worker-{process}.{w}")
        return stub

    def _worker_spec(self, group: int, workers: list[int], devices: list[Any]) -> WorkerSpec:
        job, c = self.job, self.job.config.cluster
        return WorkerSpec(
            layout=job.layout,
            treedef=job.treedef,
            step_fn=self.step_fn,
            init=job.model.init,
            seed=job.config.seed,
            data=job.data,
            order=job.order(group),
            workers_per_group=c.workers_per_group,
            executor=self.executor,
            wait_s=job.config.train.wait_s,
            devices={w: d for w, d in zip(workers, devices) if d is not None},
            seen={} if self.seen is None else self.seen,
            ids=job.model.ids if self.tables else None,
        )

    async def _connect(self, process: int, group: int, workers: list[int], devices: list[Any]) -> list[Transport]:
        """A transport per shard for worker process ``process`` (closed with the stack)."""
        job, c, t = self.job, self.job.config.cluster, self.job.config.train
        on = describe_devices(workers, devices)
        clients = await connect_all(
            self.addresses,
            who=f"process {process} of group {group}" + (f" ({on})" if on else ""),
            here=lambda address: None if c.network_only else in_process(address),
            layout=None if c.network_only else job.layout,
            same_host=not c.network_only,
            timeout_s=t.wait_s,
            retries=t.retries,
            security=self.security,
            compression=c.compression,
            link=c.link,
            locate=self.locate,
        )
        for client in clients:
            self.stack.push_async_callback(client.close)
        return clients

    def _stub(self, process: int, group: int, workers: list[int], clients: list[Transport], cache: ParamCache) -> Stub:
        job, c, t = self.job, self.job.config.cluster, self.job.config.train
        evaluates = process == 0 and self.watch is not None
        setup = ProcessSetup(
            clients,
            job.layout,
            cache,
            group,
            process,
            wait_s=t.wait_s,
            pipeline=c.pipeline,
            identity=self.identity,
            resume=self.resume,
            warmup_steps=c.warmup_steps,
            joins=group >= c.worker_groups,
            leads=process % c.processes_per_group == 0,
        )
        return Stub(
            setup,
            workers=workers,
            workers_per_group=c.workers_per_group,
            optimizer=job.config.optimizer.spec_json(),
            on_metrics=self.reporter,
            worker_groups=c.worker_groups,
            staleness=c.staleness,
            group_timeout_s=c.group_timeout_s,
            max_groups=-1 if c.max_groups == "any" else c.max_groups or 0,
            checkpoint_every=t.checkpoint_every,
            on_start=self.on_start,
            tables=job.table_feed(group, workers, evaluates=evaluates) if self.tables else None,
            stop=self.stop if process == 0 else None,
        )


def job_devices(job: Job, processes: int = 1) -> list[Any]:
    """The device of each worker of ``processes`` worker processes run in this OS
    process, in order (``cluster.devices``)."""
    try:
        return worker_devices(job.config.cluster.devices, processes * job.config.cluster.workers_per_process)
    except ValueError as err:
        raise job.config.error("cluster.devices", str(err)) from None


async def _named(what: str, task: Coroutine[Any, Any, None]) -> None:
    """Run ``task``; an error that is not psfw's own (a bug, a library's) comes out
    as a PsfwError naming the task and the cause in one line."""
    try:
        await task
    except PsfwError:
        raise
    except Exception as err:
        raise _TaskFailed(f"{what} failed: {cause_of(err)}") from err


class _TaskFailed(PsfwError):
    """A task's error that was not psfw's own, named (``_named``)."""


@asynccontextmanager
async def _first_cause():
    """Raise the error that stopped the job, not the group of every task's error.

    One failure (a shard's refusal, a worker's model error) stops the stubs and
    workers of every worker process here, each with an error that names it as its cause;
    the user wants that one error, in one line."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        # a worker told "process N stopped: ..." carries the stub's error as its cause,
        # or the cause of that error once named (``_named``)
        ids = {id(e) for e in leaves} | {id(e.__cause__) for e in leaves if isinstance(e, _TaskFailed)}
        roots = [e for e in leaves if isinstance(e, _TaskFailed) or id(e.__cause__) not in ids] or leaves
        raise roots[0] from None


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out
