"""The embedded default: shards, stubs and workers of a whole job in one OS process.

``train(config)`` starts one gRPC shard per ``cluster.servers`` on 127.0.0.1 (or
uses the addresses given), one stub per worker process and the workers, trains,
evaluates on the test split, and writes the run folder.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

from psfw.base.errors import UsageError, WireError
from psfw.base.identity import changed
from psfw.base.security import NO_SECURITY, Security
from psfw.jobs.best_step import BestKeeper, best_mode, evaluations_since_best
from psfw.jobs.checks import check_shards_here
from psfw.jobs.config import Config, load_config
from psfw.jobs.evaluation import Evaluator, eval_line
from psfw.jobs.job import Job, build_job
from psfw.jobs.outputs import (
    CHECKPOINTS,
    PARAMS_FILE,
    MetricsLog,
    mark_run_dir,
    new_run_dir,
    read_records,
    resumed_config_changes,
    write_curves,
    write_labels,
    write_net,
    write_params,
)
from psfw.jobs.progress import ProgressBar, StepReporter, log_line
from psfw.jobs.run_dir import EarlierRun, check_run_dir
from psfw.jobs.stopping import run_job
from psfw.jobs.worker_processes import job_devices, run_worker_processes
from psfw.runtime.connect import connect_all
from psfw.runtime.fetch import fetch_params, fetch_rows
from psfw.runtime.worker_report import StopRequest
from psfw.services.server import ShardServer, in_process

log = logging.getLogger("psfw")


@dataclass
class TrainResult:
    """What ``train`` returns: the final parameters and evaluation, and what the run
    recorded on the way.

    Attributes:
        params: the final values by parameter name (flat: ``"dense0/w"``; empty
            in an OS process that does not run worker process 0).
        steps: the steps trained (fewer than the config's after an early end).
        test_loss: the final evaluation's loss on the test split.
        test_metrics: the final evaluation's metrics (``{"accuracy": ...}``).
        records: the metrics records of the steps, as ``metrics.jsonl`` has them.
        run_dir: the run folder written (None without outputs).
        rpcs: per worker process, the RPCs its stub sent (``{"Put", "Get", "Update"}``).
        shard_addresses: the shards trained against.
        evals: the evaluations during training (``train.eval_every``).
        devices: the job's worker (group x workers_per_group + worker) -> the
            device it computed on, for those run here.
        best: with ``train.keep_best``, the best step kept: ``{"step", "metric",
            "value", "mode"}``.
        stopped: with ``train.stop_after``, why the run ended before its steps.
    """

    params: dict[str, np.ndarray]  # final values by parameter name
    steps: int
    test_loss: float
    test_metrics: dict[str, float]
    records: list[dict[str, Any]] = field(default_factory=list)
    run_dir: Path | None = None
    rpcs: list[dict[str, int]] = field(default_factory=list)  # per process: RPCs its stub sent
    shard_addresses: list[str] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)  # the evaluations during training (eval_every)
    # worker of the job (group x workers_per_group + worker) -> the device it computed on, for those run here
    devices: dict[int, str] = field(default_factory=dict)
    best: dict[str, Any] | None = None  # train.keep_best: the best step kept, {"step", "metric", "value", "mode"}
    stopped: str | None = None  # train.stop_after: why the run ended before its steps

    @property
    def test_accuracy(self) -> float | None:
        return self.test_metrics.get("accuracy")

    def summary(self) -> str:
        """``test loss 0.1165, test accuracy 0.9694``: the final evaluation, every
        metric the model reports."""
        shown = [f"test loss {self.test_loss:.4f}"]
        shown += [f"test {name.replace('_', ' ')} {value:.4f}" for name, value in self.test_metrics.items()]
        if self.best is not None:
            shown.append(
                f"best step {self.best['step']} ({self.best['metric'].replace('_', ' ')} {self.best['value']:.4f})"
            )
        if self.stopped is not None:
            shown.append(f"stopped early at step {self.steps}: {self.stopped}")
        return ", ".join(shown)


async def train_async(
    config: Config,
    run_dir: str | Path | None = None,
    *,
    progress: bool = True,
    outputs: bool = True,
    servers: list[str] | None = None,
    processes: list[int] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    change_optimizer: bool = False,
    security: Security = NO_SECURITY,
    done: dict[int, int] | None = None,
) -> TrainResult:
    """Train ``config`` inside a running event loop (``train`` is the same from
    synchronous code; see the module docstring).

    Evaluation and the run folder are the job of the OS process that runs worker
    process 0; elsewhere the result holds no parameters. The embedded shards
    checkpoint into ``RUN_DIR/checkpoints`` every ``train.checkpoint_every`` steps.
    Nothing is written to the run folder before the shards took the job: a refused
    command leaves it as it was.

    Args:
        config: the job.
        run_dir: the run folder (default: a new one under ``runs/``).
        progress: draw a progress bar where there is a terminal (else log lines).
        outputs: write the run folder (metrics, parameters, net, curves).
        servers: addresses of running shards (default: start them here, on 127.0.0.1).
        processes: run only these worker processes here (``psfw worker``; default: all).
        resume: continue from the newest complete checkpoint in ``run_dir``.
        overwrite: clear the run in ``run_dir`` first (see ``psfw.jobs.run_dir``).
        change_optimizer: with ``resume``, go on with the config's optimizer settings
            where the checkpoint's differ (the optimizer state is kept).
        security: TLS and token for the channels to ``servers``.
        done: filled with each group's completed steps here, as they complete (what
            an interrupted run says).

    Returns:
        A ``TrainResult``.

    Raises:
        ConfigError: the config cannot run (the model, the data, the memory it needs).
        UsageError: the run folder or the options cannot work together.
        PsfwError: training failed (a shard's refusal, a worker's model error),
            in one line that says where.
    """
    job = build_job(config)
    if not servers:  # the shards start here: this machine holds them too
        check_shards_here(config, {n: jax.ShapeDtypeStruct(p.shape, p.dtype) for n, p in job.layout.params.items()})
    job_devices(job)  # a device this OS process does not see: refused before the run folder is touched
    t, c = config.train, config.cluster
    processes = list(range(c.worker_groups * c.processes_per_group)) if processes is None else processes
    chief = 0 in processes
    folder = None
    if resume and not run_dir and not servers:  # against running shards, resume continues the job they hold
        raise UsageError("--resume needs the --run-dir of the run to continue")
    earlier = None
    if run_dir and chief:  # before the folder is touched: a refused command leaves nothing behind
        earlier = check_run_dir(Path(run_dir), c.servers, resume, checkpoints=not servers, overwrite=overwrite)
    if change_optimizer and (servers or not resume):
        raise UsageError("--change-optimizer goes with --resume of an embedded run (psfw train)")
    changes = resumed_config_changes(Path(run_dir), config, change_optimizer) if resume and run_dir and chief else {}
    if outputs and chief:
        folder = Path(run_dir) if run_dir else new_run_dir()
    checkpoints = (Path(run_dir) if run_dir else folder) / CHECKPOINTS if (run_dir or folder) else None
    if earlier is not None and not servers:  # its checkpoints go before the shards here would load them
        earlier.clear()
        earlier = None
    async with AsyncExitStack() as stack:
        addresses = list(servers or [])
        restored: list[int | None] = []
        started: list[ShardServer] = []
        if not addresses:
            for shard in range(c.servers):
                server = ShardServer(
                    # a model's tables live on the shards only: their final checkpoint keeps them
                    shard,
                    c.servers,
                    checkpoint_dir=checkpoints if t.checkpoint_every or resume or job.model.tables else None,
                    data_port=0 if c.transport == "grpc" else None,  # in-process clients need no data link
                )
                await server.start("127.0.0.1:0")
                stack.push_async_callback(server.stop, 0)
                addresses.append(server.address)
                restored.append(server.restored_step)
                started.append(server)
        step = min((r for r in restored if r is not None), default=None)
        if resume and step is not None and step > job.steps:  # nothing to train, and no step to record
            raise UsageError(
                f"--resume: {run_dir} is at step {step} already, and the config asks for {job.steps} steps: "
                "raise train.epochs/train.steps to train on"
            )
        if resume and started:
            changes.update(await _go_on_with_the_optimizer(config, job, started, step, change_optimizer))
        # each group's records come from the worker process that leads it (its first), here
        # or in another OS process that writes the same file (psfw launch)
        led = {p // c.processes_per_group for p in processes if p % c.processes_per_group == 0}
        records_dir = folder if folder is not None else Path(run_dir) if run_dir and outputs and led else None
        begin = _RunBegins(records_dir, folder is not None, config, changes, step, earlier, job.data)
        if not servers:  # the shards are this process's own: they took the job
            begin()
        sinks: list = []
        metrics = None
        if records_dir is not None:
            metrics = MetricsLog(records_dir / "metrics.jsonl", resume=resume, groups=c.worker_groups)
            sinks.append(lambda record: metrics.write(record) if record["group"] in led else None)
        if progress and ProgressBar.can_show():
            sinks.append(stack.enter_context(ProgressBar(job.steps)))
        else:  # --no-progress, or no terminal to draw a bar on
            sinks.append(log_line)
        local = Counter(p // c.processes_per_group for p in processes)
        reporter = StepReporter(dict(local), job.steps, t.log_every, sinks, done)
        evaluator = None
        if chief:  # the evaluation on the test split is process 0's
            keeper = None
            if t.keep_best and checkpoints is not None:
                mode = best_mode(t.keep_best, t.best_mode)
                since = evaluations_since_best(records_dir, checkpoints, step) if resume and records_dir else 0
                keeper = BestKeeper(checkpoints, c.servers, t.keep_best, mode, since_best=since)
            stop = StopRequest() if t.stop_after else None
            evaluator = Evaluator(job, [eval_line] + ([metrics.write] if metrics is not None else []), keeper, stop)
            stack.push_async_exit(evaluator.exit_callback())
        devices: dict[int, str] = {}
        stubs = await run_worker_processes(
            job,
            addresses,
            processes=processes,
            reporter=reporter,
            security=security,
            resume=resume,
            on_start=begin.then(metrics.begin if metrics is not None else None),
            watch=evaluator.watch if evaluator is not None else None,
            devices=devices,
            stop=evaluator.stop if evaluator is not None else None,
        )
        rpcs = [dict(s.rpcs) for s in stubs]
        steps = min([s.stop_at for s in stubs if s.stop_at] + [job.steps])  # what was trained: an early end too
        if not chief:
            return TrainResult({}, steps, float("nan"), {}, reporter.records, None, rpcs, devices=devices)
        clients = await connect_all(addresses, who="", local=in_process, timeout_s=t.wait_s, security=security)
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
    result = TrainResult(
        params=params,
        steps=steps,
        test_loss=test_loss,
        test_metrics=test_metrics,
        records=reporter.records,
        run_dir=folder,
        rpcs=rpcs,
        shard_addresses=addresses,
        evals=evaluator.records,
        devices=devices,
        best=evaluator.keeper.best if evaluator.keeper is not None else None,
        stopped=evaluator.stop.reason if evaluator.stop is not None and steps < job.steps else None,
    )
    if folder is not None:
        final = {"final": True, "step": steps, "test_loss": result.test_loss}
        final.update({f"test_{k}": v for k, v in result.test_metrics.items()})
        if result.best is not None:
            final.update(best_step=result.best["step"], **{f"best_{result.best['metric']}": result.best["value"]})
        if result.stopped is not None:  # why the run ended before its train.steps
            final["stopped_early"] = result.stopped
        metrics.write(final)
        write_params(folder / PARAMS_FILE, params, {"step": str(steps)})
        await asyncio.to_thread(write_net, folder, job.model.layers, job.layout, job.table_declaration())
        # the final evaluation ends the test curve
        end = {"eval": True, "group": 0, **{k: v for k, v in final.items() if k != "final"}}
        await asyncio.to_thread(write_curves, folder / "curves.png", [*read_records(folder / "metrics.jsonl"), end])
    return result


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


class _RunBegins:
    """Writes to the run folder once the shards took the job (at once for shards of
    this OS process, at the first stub's start against running ones), so that a refused
    command leaves the folder as it was: makes ``folder`` for the records; with
    ``chief`` (the OS process that writes the run's outputs), clears what ``earlier``
    left, marks the folder, writes ``config.json`` (what this run trains with),
    ``labels.json`` (what the user's labels are, ``data``'s) and a resume's changes
    in ``history.jsonl``."""

    def __init__(
        self,
        folder: Path | None,
        chief: bool,
        config: Config,
        changes: dict,
        step: int | None,
        earlier: EarlierRun | None,
        data: Any = None,
    ):
        self.folder, self.chief, self.config, self.changes, self.step = folder, chief, config, changes, step
        self.earlier, self.data = earlier, data
        self.done = folder is None

    def __call__(self) -> None:
        if self.done:
            return
        self.done = True
        try:
            if self.earlier is not None:
                self.earlier.clear()
            self.folder.mkdir(parents=True, exist_ok=True)
            if not self.chief:
                return
            mark_run_dir(self.folder)
            (self.folder / "config.json").write_text(self.config.model_dump_json(indent=1))
            if self.data is not None:  # what the user's labels are (labels.json)
                write_labels(self.folder, self.data)
            if self.changes:  # config.json holds the settings from now on; the history says since when
                _append_json(self.folder / "history.jsonl", {"resumed_at_step": self.step, "changed": self.changes})
        except OSError as err:
            raise UsageError(f"cannot write the run folder {self.folder}: {err.strerror or err}") from None

    def then(self, on_start: Callable[[int, int], None] | None) -> Callable[[int, int], None]:
        """A stub's ``on_start``: this first, then ``on_start``."""

        def started(group: int, step: int) -> None:
            self()
            if on_start is not None:
                on_start(group, step)

        return started


def _append_json(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def train(config: Config | str | Path, run_dir: str | Path | None = None, **options: Any) -> TrainResult:
    """Train a job in this OS process: its shards, stubs and workers (the embedded
    default, ``psfw train``). Ctrl-C stops it gracefully, a second Ctrl-C at once.

    Args:
        config: the job, as a ``Config`` or the path of its TOML file.
        run_dir: the run folder to write (default: a new one under ``runs/``).
        **options: the keyword arguments of ``train_async`` (``resume``,
            ``progress``, ``servers``...).

    Returns:
        A ``TrainResult``: the final parameters, test loss and metrics, the records.

    Raises:
        ConfigError: the config cannot run.
        UsageError: the run folder or the options cannot work together.
        PsfwError: training failed, in one line that says where.

    Example::

        result = psfw.train("examples/digits_mlp.toml")
        print(result.summary())
    """
    if not isinstance(config, Config):
        config = load_config(config)
    return run_job(train_async(config, run_dir, **options))  # Ctrl-C: a graceful stop, a second one at once
