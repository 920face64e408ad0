"""The parts of one embedded training (``psfw.jobs.embedded.train_async``), in
order: the checks before anything is touched, the shards, where the step records
go, the evaluator, the final evaluation and the run folder's outputs."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from psfw.base.errors import UsageError, WireError
from psfw.base.identity import changed
from psfw.base.security import Security
from psfw.jobs.best_step import BestKeeper, best_mode, evaluations_since_best
from psfw.jobs.checks import check_shards_here
from psfw.jobs.config import Config
from psfw.jobs.evaluation import Evaluator, eval_line
from psfw.jobs.job import Job, build_job
from psfw.jobs.outputs import (
    CHECKPOINTS,
    PARAMS_FILE,
    MetricsLog,
    new_run_dir,
    read_records,
    resumed_config_changes,
    write_curves,
    write_net,
    write_params,
)
from psfw.jobs.progress import ProgressBar, StepReporter, log_line
from psfw.jobs.reshard import Resharded, reshard_for_job
from psfw.jobs.run_begins import RunBegins
from psfw.jobs.run_dir import EarlierRun, check_run_dir
from psfw.jobs.train_result import TrainResult
from psfw.jobs.worker_processes import job_devices, run_worker_processes
from psfw.runtime.connect import connect_all
from psfw.runtime.fetch import fetch_params, fetch_rows
from psfw.runtime.grpc_channel import Locate
from psfw.runtime.stub import Stub
from psfw.runtime.worker_report import StopRequest
from psfw.services.server import ShardServer, in_process

log = logging.getLogger("psfw")


class Records:
    """Where a run's step records go: the run folder's first writes (``begin``), its
    metrics file (None: not written here) and the reporter that combines them."""

    def __init__(self, begin: RunBegins, metrics: MetricsLog | None, reporter: StepReporter, folder: Path | None):
        self.begin, self.metrics, self.reporter, self.folder = begin, metrics, reporter, folder


class EmbeddedRun:
    """One call of ``train_async``: what it decided before anything is touched (the
    worker processes run here, the run folder, the checkpoints), and the parts of the
    run in order: the shards, the records, the evaluator, the final evaluation, the
    outputs."""

    def __init__(
        self,
        config: Config,
        run_dir: str | Path | None,
        *,
        outputs: bool,
        servers: list[str] | None,
        processes: list[int] | None,
        resume: bool,
        overwrite: bool,
        change_optimizer: bool,
        locate: Locate | None = None,
    ):
        self.config, self.job = config, build_job(config)
        self.run_dir = Path(run_dir) if run_dir else None
        self.outputs, self.servers, self.resume, self.overwrite = outputs, servers, resume, overwrite
        self.change_optimizer, self.locate = change_optimizer, locate
        c = config.cluster
        self.processes = list(range(c.worker_groups * c.processes_per_group)) if processes is None else processes
        self.chief = 0 in self.processes  # runs worker process 0: evaluates and writes the run's outputs
        self.folder: Path | None = None  # the run folder this OS process writes
        self.checkpoints: Path | None = None  # the embedded shards' checkpoints
        self.earlier: EarlierRun | None = None  # what of an earlier run goes once the shards took the job
        self.changes: dict[str, list] = {}  # a resume's changed settings
        self.resharded: Resharded | None = None  # a resume's checkpoint, re-cut for this number of shards

    def check(self) -> None:
        """Refuse what cannot work before anything is touched; then re-cut a resume's
        newest checkpoint when it was made on another number of shards (a
        checkpoint of the same state beside it, ``psfw.jobs.reshard``), decide the
        run folder (made now) and the checkpoints, and clear an earlier run that the
        shards started here would otherwise load."""
        config, job, run_dir, servers, resume = self.config, self.job, self.run_dir, self.servers, self.resume
        change_optimizer = self.change_optimizer
        if not servers:  # the shards start here: this machine holds them too
            check_shards_here(config, {n: jax.ShapeDtypeStruct(p.shape, p.dtype) for n, p in job.layout.params.items()})
        job_devices(job)  # a device this OS process does not see: refused before the run folder is touched
        if resume and not run_dir and not servers:  # against running shards, resume continues the job they hold
            raise UsageError("--resume needs the --run-dir of the run to continue")
        if run_dir and self.chief:  # before the folder is touched: a refused command leaves nothing behind
            self.earlier = check_run_dir(run_dir, resume, checkpoints=not servers, overwrite=self.overwrite)
        if change_optimizer and (servers or not resume):
            raise UsageError("--change-optimizer goes with --resume of an embedded run (psfw train)")
        if resume and run_dir and self.chief:
            self.changes = resumed_config_changes(run_dir, config, change_optimizer)
        if resume and run_dir and self.chief and not servers:  # the shards started here load what it writes
            self.resharded = reshard_for_job(run_dir / CHECKPOINTS, job)
        if self.outputs and self.chief:
            self.folder = run_dir or new_run_dir()
        if run_dir or self.folder:
            self.checkpoints = (run_dir or self.folder) / CHECKPOINTS
        if self.earlier is not None and not servers:  # its checkpoints go before the shards here would load them
            self.earlier.clear()
            self.earlier = None

    async def shards(self, stack: AsyncExitStack) -> tuple[list[str], int | None]:
        """The shards' addresses (the ones given, else shards started here, each from
        its newest checkpoint) and the step the started ones restored (None: fresh).
        A resume past the config's steps is refused, and one whose optimizer settings
        differ switches them (``--change-optimizer``) or is refused."""
        if self.servers:
            return list(self.servers), None
        job, c, t = self.job, self.config.cluster, self.config.train
        started: list[ShardServer] = []
        for shard in range(c.servers):
            server = ShardServer(
                shard,
                c.servers,
                # a model's tables live on the shards only: their final checkpoint keeps them
                checkpoint_dir=self.checkpoints if t.checkpoint_every or self.resume or job.model.tables else None,
                link=c.network_only,  # in-process clients need no link
            )
            await server.start("127.0.0.1:0")
            stack.push_async_callback(server.stop, 0)
            started.append(server)
        step = min((s.restored_step for s in started if s.restored_step is not None), default=None)
        if self.resharded is not None and step == self.resharded.step:
            log.warning("%s", self.resharded.line())
        if self.resume and step is not None and step > job.steps:  # nothing to train, and no step to record
            raise UsageError(
                f"--resume: {self.run_dir} is at step {step} already, and the config asks for {job.steps} steps: "
                "raise train.epochs/train.steps to train on"
            )
        if self.resume:
            changes = await _go_on_with_the_optimizer(self.config, job, started, step, self.change_optimizer)
            self.changes.update(changes)
        return [s.address for s in started], step

    def records(self, stack: AsyncExitStack, step: int | None, progress: bool, done: dict | None) -> Records:
        """Where the step records go: the metrics file of the groups led here, the
        progress bar (or log lines)."""
        c, job = self.config.cluster, self.job
        # each group's records come from the worker process that leads it (its first), here
        # or in another OS process that writes the same file (psfw launch)
        led = {p // c.processes_per_group for p in self.processes if p % c.processes_per_group == 0}
        folder = self.folder or (self.run_dir if self.outputs and led else None)
        begin = RunBegins(folder, self.folder is not None, self.config, self.changes, step, self.earlier, job.data)
        if not self.servers:  # the shards are this OS process's own: they took the job
            begin()
        sinks: list = []
        metrics = None
        if folder is not None:
            metrics = MetricsLog(folder / "metrics.jsonl", resume=self.resume, groups=c.groups_limit)
            sinks.append(lambda record: metrics.write(record) if record["group"] in led else None)
        if progress and ProgressBar.can_show():
            sinks.append(stack.enter_context(ProgressBar(job.steps)))
        else:  # --no-progress, or no terminal to draw a bar on
            sinks.append(log_line)
        local = Counter(p // c.processes_per_group for p in self.processes)
        return Records(
            begin, metrics, StepReporter(dict(local), job.steps, self.config.train.log_every, sinks, done), folder
        )

    def evaluator(self, stack: AsyncExitStack, records: Records, step: int | None) -> Evaluator | None:
        """The evaluation on the test split, worker process 0's (None elsewhere), with
        the best step it keeps (``train.keep_best``) and the early end it may ask for
        (``train.stop_after``)."""
        if not self.chief:
            return None
        t = self.config.train
        keeper = None
        if t.keep_best and self.checkpoints is not None:
            mode = best_mode(t.keep_best, t.best_mode)
            resumed = self.resume and records.folder is not None
            since = evaluations_since_best(records.folder, self.checkpoints, step) if resumed else 0
            keeper = BestKeeper(self.checkpoints, self.config.cluster.servers, t.keep_best, mode, since_best=since)
        stop = StopRequest() if t.stop_after else None
        sinks = [eval_line] + ([records.metrics.write] if records.metrics is not None else [])
        evaluator = Evaluator(self.job, sinks, keeper, stop)
        stack.push_async_exit(evaluator.exit_callback())
        return evaluator

    async def train_workers(
        self,
        addresses: list[str],
        records: Records,
        evaluator: Evaluator | None,
        security: Security,
        devices: dict[int, str],
    ) -> list[Stub]:
        """Train the worker processes that run here against the shards at
        ``addresses`` until their groups are done; returns their stubs."""
        return await run_worker_processes(
            self.job,
            addresses,
            processes=self.processes,
            reporter=records.reporter,
            security=security,
            resume=self.resume,
            on_start=records.begin.then(records.metrics.begin if records.metrics is not None else None),
            watch=evaluator.watch if evaluator is not None else None,
            devices=devices,
            stop=evaluator.stop if evaluator is not None else None,
            locate=self.locate,
        )

    async def final_evaluation(
        self, stack: AsyncExitStack, addresses: list[str], evaluator: Evaluator, steps: int, security: Security
    ) -> FinalEvaluation:
        """The parameters of the last step, read back from the shards, and their
        evaluation on the test split (offered to the best step kept when the last
        step is a checkpoint's)."""
        job, t = self.job, self.config.train
        clients = await connect_all(
            addresses, who="", here=in_process, timeout_s=t.wait_s, security=security, locate=self.locate
        )
        for client in clients:
            stack.push_async_callback(client.close)
        params = await fetch_params(clients, job.layout, 0, steps, list(job.layout.params), t.wait_s)
        test_rows = None
        if job.model.tables:  # the test split's rows, for the final evaluation (the tables stay on the shards)
            feed = job.table_feed(0, [], evaluates=False)
            fingerprint = job.identity()["fingerprint"]
            test_rows = await fetch_rows(clients, feed, job.test_ids(), 0, steps, t.wait_s, fingerprint)
        test_loss, test_metrics = await asyncio.to_thread(evaluator.evaluate, params, test_rows)
        if evaluator.keeper is not None and steps % t.checkpoint_every == 0:  # the last step is a checkpoint's
            last = {"step": steps, "test_loss": test_loss, **{f"test_{k}": v for k, v in test_metrics.items()}}
            await asyncio.to_thread(evaluator.offer_last, last)
        return FinalEvaluation(params, steps, test_loss, test_metrics)

    def result(
        self,
        final: FinalEvaluation,
        evaluator: Evaluator,
        records: Records,
        rpcs: list[dict[str, int]],
        addresses: list[str],
        devices: dict[int, str],
    ) -> TrainResult:
        """What ``train_async`` returns in worker process 0's OS process."""
        return TrainResult(
            params=final.params,
            steps=final.steps,
            test_loss=final.test_loss,
            test_metrics=final.test_metrics,
            records=records.reporter.records,
            run_dir=self.folder,
            rpcs=rpcs,
            shard_addresses=addresses,
            evals=evaluator.records,
            devices=devices,
            best=evaluator.keeper.best if evaluator.keeper is not None else None,
            stopped=evaluator.stop.reason if evaluator.stop is not None and final.steps < self.job.steps else None,
        )

    async def write_outputs(self, result: TrainResult, metrics: MetricsLog) -> None:
        """The run folder's final record, parameters, net and curves."""
        folder, job = self.folder, self.job
        final = {"final": True, "step": result.steps, "test_loss": result.test_loss}
        final.update({f"test_{k}": v for k, v in result.test_metrics.items()})
        if result.best is not None:
            final.update(best_step=result.best["step"], **{f"best_{result.best['metric']}": result.best["value"]})
        if result.stopped is not None:  # why the run ended before its train.steps
            final["stopped_early"] = result.stopped
        metrics.write(final)
        write_params(folder / PARAMS_FILE, result.params, {"step": str(result.steps)})
        await asyncio.to_thread(write_net, folder, job.model.layers, job.layout, job.table_declaration())
        # the final evaluation ends the test curve
        end = {"eval": True, "group": 0, **{k: v for k, v in final.items() if k != "final"}}
        await asyncio.to_thread(write_curves, folder / "curves.png", [*read_records(folder / "metrics.jsonl"), end])


class FinalEvaluation(NamedTuple):
    """The final evaluation: the last step's parameters and their test loss and metrics."""

    params: dict[str, np.ndarray]
    steps: int
    test_loss: float
    test_metrics: dict[str, float]


async def _go_on_with_the_optimizer(
    config: Config, job: Job, servers: list[ShardServer], step: int | None, change: bool
) -> dict[str, list]:
    """Restored embedded shards that train with other optimizer settings than the
    config: switch them when ``change`` (``--change-optimizer``), else UsageError.
    What the shards hold decides, not the run's config.json: a run stopped before
    a checkpoint of its new settings comes back with the old ones. Returns the
    settings changed (``optimizer.field: [before, after]``)."""
    ours = json.loads(config.optimizer.spec_json())
    held = {s.store.optimizer_spec for s in servers if s.store.optimizer_spec}
    changes: dict[str, list] = {}
    for spec in held:
        changes.update(changed(json.loads(spec), ours, "optimizer"))
    if not changes:
        return {}
    shown = "; ".join(f"{k}: {b} -> {a}" for k, (b, a) in list(changes.items())[:4])
    if not change:
        raise UsageError(
            f"--resume: the checkpoint of step {step} trains with other optimizer settings than the config ({shown}): "
            "pass --change-optimizer to go on with the config's, or resume with that run's settings"
        )
    identity = job.identity()
    try:
        for server in servers:
            await server.store.change_optimizer(config.optimizer.spec_json(), json.dumps(identity))
    except WireError as err:
        raise UsageError(f"--change-optimizer: {err.message}") from None
    return changes
