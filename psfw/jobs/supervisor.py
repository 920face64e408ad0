"""``psfw launch``: a whole cluster on this machine as separate OS processes.

Starts one ``psfw server`` per shard on 127.0.0.1 (free ports), then one
``psfw worker`` per worker process, streams every process's output with a prefix,
and stops all of them when one fails (naming it) or when interrupted.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import shlex
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from psfw.base.console import say
from psfw.jobs.children import START_TIMEOUT_S, Tail, child_env, describe_exit, psfw_command, read_ready, shard_args
from psfw.jobs.config import Config
from psfw.jobs.outputs import CHECKPOINTS
from psfw.jobs.reshard import reshard_for_config
from psfw.jobs.run_dir import check_run_dir, resume_hint

log = logging.getLogger("psfw")

# each stops every child gracefully once: Ctrl-C, a stop, a closed terminal
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


STOP_GRACE_S = 10.0
RESTARTS = 3  # cluster.restart: how often one worker process is started again


@dataclass(eq=False)
class Child:
    name: str
    proc: asyncio.subprocess.Process
    tail: Tail
    pump: asyncio.Task | None = None
    args: list[str] | None = None  # a worker process's: how to start it again
    process: int = -1  # a worker process's index


def _stop_with(parent: int):
    """For a child, in the fork before exec: get SIGTERM when launch dies, however it
    dies (SIGKILL, a closed terminal): a child in a process group of its own would
    otherwise run on (Linux; elsewhere launch's own signal handlers must do)."""

    def prepare() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:  # launch died before the line above
            os._exit(1)

    return prepare


async def _spawn(name: str, args: list[str], echo: bool = True) -> Child:
    """Start a psfw child; its output is read at once, echoed to stdout behind its
    name (``echo``) and its last lines kept."""
    proc = await asyncio.create_subprocess_exec(
        *psfw_command(*args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=child_env(),
        # a group of its own: a Ctrl-C in the terminal reaches launch alone, which
        # stops each child with one SIGTERM (a second signal would cut a shard's
        # graceful stop short)
        process_group=0,
        preexec_fn=_stop_with(os.getpid()),
    )
    child = Child(name, proc, Tail(name, echo, sys.stdout))
    child.pump = asyncio.create_task(_pump(child))
    return child


async def _pump(child: Child) -> None:
    """Read the child's output in chunks, not with readline: a line longer than
    asyncio's 64 KiB limit would end the pump, and the child would then block on a
    full pipe."""
    assert child.proc.stdout is not None
    while chunk := await child.proc.stdout.read(1 << 16):
        child.tail.feed(chunk)
    child.tail.close()


async def _wait_ready(child: Child, ready_file: Path, interrupted: asyncio.Event) -> str | None:
    """Wait until the shard ``child`` is ready; returns its address (None when
    interrupted meanwhile). Its output is echoed from then on; a shard that ends or
    hangs before is one PsfwError with its last lines."""
    loop = asyncio.get_running_loop()
    exited = asyncio.create_task(child.proc.wait())
    deadline = loop.time() + START_TIMEOUT_S
    try:
        while (ready := read_ready(ready_file)) is None:
            if interrupted.is_set():
                return None
            if exited.done():
                await asyncio.gather(child.pump, return_exceptions=True)  # every line it printed
                raise child.tail.not_ready(describe_exit(exited.result()))
            if loop.time() > deadline:
                raise child.tail.not_ready(f"did not start within {START_TIMEOUT_S:.0f} s")
            await asyncio.wait({exited}, timeout=0.05)
    finally:
        exited.cancel()
    child.tail.start_echo()
    return ready["address"]


async def _stop(children: list[Child]) -> None:
    """Stop the workers, then the shards: a worker lets the Updates it has on their
    way reach every shard before it ends (``psfw.runtime.stub``), so the shards,
    stopped after, save their final checkpoints at one step."""
    shards = [c for c in children if c.name.startswith("shard")]
    await _stop_now([c for c in children if c not in shards])
    await _stop_now(shards)


async def _stop_now(children: list[Child]) -> None:
    for child in children:
        if child.proc.returncode is None:
            child.proc.terminate()
    for child in children:
        try:
            await asyncio.wait_for(child.proc.wait(), STOP_GRACE_S)
        except TimeoutError:
            child.proc.kill()
            await child.proc.wait()
    await asyncio.gather(*(c.pump for c in children if c.pump is not None), return_exceptions=True)


def _interrupted(signals: list[int]) -> int:
    say("psfw launch: interrupted, stopping every process")
    return 128 + signals[0]  # 130 for Ctrl-C, 143 for SIGTERM (as psfw train, worker), 129


async def launch(
    config_path: Path, config: Config, run_dir: Path | None, resume: bool = False, overwrite: bool = False
) -> int:
    """Run the cluster of ``config``; returns the exit code for ``psfw launch``.
    ``resume``: continue the run in ``run_dir`` from its newest checkpoint (without
    it, a run folder that holds checkpoints is refused); ``overwrite``: clear the
    run there first (see ``psfw.jobs.run_dir``)."""
    earlier = check_run_dir(run_dir, resume, overwrite=overwrite) if run_dir is not None else None
    # before the shards load it: a checkpoint made on another number of shards, re-cut for this one
    resharded = reshard_for_config(run_dir / CHECKPOINTS, config) if resume and run_dir is not None else None
    children: list[Child] = []
    interrupted = asyncio.Event()
    signals: list[int] = []
    loop = asyncio.get_running_loop()

    def on_signal(sig: int) -> None:
        signals.append(sig)
        interrupted.set()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        if earlier is not None:  # before the shards would load its checkpoints
            earlier.clear()
        addresses = await _start_shards(config, run_dir, resume, children, interrupted)
        if addresses is None:
            return _interrupted(signals)
        if resharded is not None:
            log.warning("%s", resharded.line())
        shards = list(children)
        workers = await _start_workers(config_path, config, addresses, run_dir, resume)
        children.extend(workers)
        code = await _Watch(config, children, shards, workers).until_done(interrupted)
        if code is None:
            return _interrupted(signals)
        if code == 0:
            print("psfw launch: every worker process finished", flush=True)
        return code
    finally:
        await _stop(children)
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
        if signals:  # after the stop: the shards' graceful stop may have written a newer checkpoint
            say(f"psfw launch: every process stopped; {_resume_hint(config_path, config, run_dir)}")


async def _start_shards(
    config: Config, run_dir: Path | None, resume: bool, children: list[Child], interrupted: asyncio.Event
) -> list[str] | None:
    """Start the shards one at a time (each added to ``children`` at once, so that a
    failure stops it) and return their addresses once each is ready; None when
    interrupted meanwhile."""
    c = config.cluster
    checkpoints = shard_checkpoints(config, run_dir, resume) if run_dir is not None else None
    extra = ["--grace", "1"] + (["--checkpoint-dir", str(checkpoints)] if checkpoints is not None else [])
    addresses = []
    with tempfile.TemporaryDirectory(prefix="psfw-launch-") as ready_dir:
        for index in range(c.servers):
            ready_file = Path(ready_dir) / f"shard-{index}.json"
            child = await _spawn(f"shard {index}", shard_args(index, c.servers, ready_file, *extra), echo=False)
            children.append(child)
            address = await _wait_ready(child, ready_file, interrupted)
            if address is None:
                return None
            addresses.append(address)
    return addresses


async def _start_workers(
    config_path: Path, config: Config, addresses: list[str], run_dir: Path | None, resume: bool
) -> list[Child]:
    """A ``psfw worker`` child per worker process of the job."""
    c = config.cluster
    workers = []
    for process in range(c.worker_groups * c.processes_per_group):
        args = ["worker", str(config_path), "--process", str(process), "--servers", ",".join(addresses)]
        args.append("--launched")  # launch, not each worker, says how to continue an interrupted run
        args += config.set_flags()  # the same job in every child
        if process % c.processes_per_group == 0 and run_dir is not None:  # each group's first: its records
            args += ["--run-dir", str(run_dir)]
        if resume:
            args.append("--resume")
        child = await _spawn(f"worker {process}", args)
        child.args, child.process = args, process
        workers.append(child)
    return workers


class _Watch:
    """The children of a launch while the job runs: every worker that ends is
    looked at. A worker process that fails is started again where the config asks
    for it (``cluster.restart``: with ``--resume``, up to ``RESTARTS`` times), or its
    group is left out where groups may leave (``cluster.group_timeout_s``; not group
    0, which evaluates and checkpoints), or every child stops, as when a shard ends."""

    def __init__(self, config: Config, children: list[Child], shards: list[Child], workers: list[Child]):
        self.cluster = config.cluster
        self.children, self.shards = children, shards
        self.running = set(workers)
        self.waits = {asyncio.create_task(child.proc.wait()): child for child in children}
        self.restarts: dict[int, int] = {}

    async def until_done(self, interrupted: asyncio.Event) -> int | None:
        """Wait until every worker finished or left (0), a child failed or a shard
        ended (1, said), or a stop signal came (None)."""
        stop = asyncio.create_task(interrupted.wait())
        try:
            while self.running:
                done, _ = await asyncio.wait([*self.waits, stop], return_when=asyncio.FIRST_COMPLETED)
                if stop in done:
                    return None
                for task in done:
                    child = self.waits.pop(task)
                    ended = child in self.running or child in self.shards  # not a worker left out or replaced
                    if ended and not await self._ended(child, task.result()):
                        return 1
            return 0
        finally:
            stop.cancel()
            for task in self.waits:
                task.cancel()

    async def _ended(self, child: Child, code: int) -> bool:
        """Whether the job goes on after ``child`` ended with ``code``."""
        self.running.discard(child)
        if code == 0 and child not in self.shards:
            return True
        how = f"psfw launch: {child.name} {describe_exit(code)}"
        c = self.cluster
        if child in self.shards or child.args is None:
            _tell(f"{how}; stopping the others")
            return False
        done = self.restarts.get(child.process, 0)
        if c.restart and done < RESTARTS:
            self.restarts[child.process] = done + 1
            _tell(f"{how}; starting it again ({done + 1} of {RESTARTS}): it rejoins its group")
            args = child.args if "--resume" in child.args else [*child.args, "--resume"]
            again = await _spawn(child.name, args)
            again.args, again.process = args, child.process
            self._add(again)
            return True
        group = child.process // c.processes_per_group
        if c.groups_leave and group != 0:
            mates = [w for w in self.running if w.process // c.processes_per_group == group]
            _tell(f"{how}; group {group} leaves the job and the others go on")
            self.running.difference_update(mates)
            await _stop_now(mates)
            return True
        _tell(f"{how}; stopping the others")
        return False

    def _add(self, child: Child) -> None:
        self.children.append(child)
        self.running.add(child)
        self.waits[asyncio.create_task(child.proc.wait())] = child


def _tell(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _resume_hint(config_path: Path, config: Config, run_dir: Path | None) -> str:
    """How to continue a run that was stopped: the command and its checkpoint."""
    if run_dir is None:
        return "the run kept no checkpoints"
    command = shlex.join(
        ["psfw", "launch", str(config_path), *config.set_flags(), "--run-dir", str(run_dir), "--resume"]
    )
    return resume_hint(command, run_dir / CHECKPOINTS, config.cluster.servers, config.train.checkpoint_every)


def shard_checkpoints(config: Config, run_dir: Path, resume: bool) -> Path | None:
    """The shards' checkpoint folder of a supervised run (``psfw launch``, ``psfw
    ray``): the run folder's, where the job checkpoints, resumes or keeps tables (a
    model's tables live on the shards only: their final checkpoint keeps them)."""
    keep = config.train.checkpoint_every or resume or _declares_tables(config)
    return run_dir / CHECKPOINTS if keep else None


def _declares_tables(config: Config) -> bool:
    """Whether the job's model keeps embedding tables (JAX is imported only to look
    at a model that may: the shipped ones say it by name)."""
    if config.model.name not in ("fm", "custom"):
        return False
    from psfw.jobs.job import declares_tables

    return declares_tables(config)
