"""The embedded default: shards, stubs and workers of a whole job in one OS process.

``train(config)`` starts one gRPC shard per ``cluster.servers`` on 127.0.0.1 (or
uses the addresses given), one stub per worker process and the workers, trains,
evaluates on the test split, and writes the run folder.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from psfw.base.security import NO_SECURITY, Security
from psfw.jobs.config import Config, load_config
from psfw.jobs.embedded_run import EmbeddedRun
from psfw.jobs.stopping import run_job
from psfw.jobs.train_result import TrainResult
from psfw.runtime.grpc_channel import Locate


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
    locate: Locate | None = None,
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
        locate: where shard I of ``servers`` listens now (``await locate(I)``), for
            shards that an engine restarts elsewhere (``psfw ray``).

    Returns:
        A ``TrainResult``.

    Raises:
        ConfigError: the config cannot run (the model, the data, the memory it needs).
        UsageError: the run folder or the options cannot work together.
        PsfwError: training failed (a shard's refusal, a worker's model error),
            in one line that says where.
    """
    run = EmbeddedRun(
        config,
        run_dir,
        outputs=outputs,
        servers=servers,
        processes=processes,
        resume=resume,
        overwrite=overwrite,
        change_optimizer=change_optimizer,
        locate=locate,
    )
    run.check()  # before anything is touched
    async with AsyncExitStack() as stack:
        addresses, step = await run.shards(stack)
        records = run.records(stack, step, progress, done)
        evaluator = run.evaluator(stack, records, step)
        devices: dict[int, str] = {}
        stubs = await run.train_workers(addresses, records, evaluator, security, devices)
        rpcs = [dict(s.rpcs) for s in stubs]
        steps = min([s.stop_at for s in stubs if s.stop_at] + [run.job.steps])  # what was trained: an early end too
        if evaluator is None:  # not worker process 0's OS process: no evaluation, no parameters
            return TrainResult({}, steps, float("nan"), {}, records.reporter.records, None, rpcs, devices=devices)
        final = await run.final_evaluation(stack, addresses, evaluator, steps, security)
    result = run.result(final, evaluator, records, rpcs, addresses, devices)
    if run.folder is not None:
        await run.write_outputs(result, records.metrics)
    return result


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
