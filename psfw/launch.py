"""``psfw launch``: a whole cluster on this machine as separate OS processes.

Starts one ``psfw server`` per shard on 127.0.0.1 (free ports), then one
``psfw worker`` per worker process, streams every process's output with a prefix,
and stops all of them when one fails (naming it) or when interrupted.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from psfw.config import Config
from psfw.errors import PsfwError
from psfw.launcher import CHECKPOINTS, check_run_dir

START_TIMEOUT_S = 120.0
STOP_GRACE_S = 10.0
# each stops every process gracefully once: Ctrl-C, a stop, a closed terminal
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass(eq=False)
class Child:
    name: str
    proc: asyncio.subprocess.Process
    pump: asyncio.Task | None = None


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


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


async def _spawn(name: str, args: list[str]) -> Child:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "psfw.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # a group of its own: a Ctrl-C in the terminal reaches launch alone, which
        # stops each child with one SIGTERM (a second signal would cut a shard's
        # graceful stop short)
        process_group=0,
        preexec_fn=_stop_with(os.getpid()),
    )
    return Child(name, proc)


async def _pump(child: Child) -> None:
    """Print the child's output line by line with its prefix. Read in chunks, not
    with readline: a line longer than asyncio's 64 KiB limit would end the pump, and
    the child would then block on a full pipe."""
    assert child.proc.stdout is not None
    rest = b""
    while chunk := await child.proc.stdout.read(1 << 16):
        *lines, rest = (rest + chunk).split(b"\n")
        for raw in lines:
            print(f"[{child.name}] {raw.decode(errors='replace').rstrip()}", flush=True)
    if rest:
        print(f"[{child.name}] {rest.decode(errors='replace').rstrip()}", flush=True)


async def _start_shard(index: int, shards: int, checkpoint_dir: Path | None) -> tuple[Child, str]:
    args = ["server", "--shard", str(index), "--of", str(shards), "--listen", "127.0.0.1:0", "--grace", "1"]
    if checkpoint_dir is not None:
        args += ["--checkpoint-dir", str(checkpoint_dir)]
    child = await _spawn(f"shard {index}", args)
    assert child.proc.stdout is not None
    try:
        while True:
            line = await asyncio.wait_for(child.proc.stdout.readline(), START_TIMEOUT_S)
            if not line:
                raise PsfwError(f"shard {index} {_describe_exit(await child.proc.wait())} before it listened")
            text = line.decode(errors="replace").rstrip()
            print(f"[{child.name}] {text}", flush=True)
            match = re.search(r"listening on (\S+)", text)
            if match:
                return child, match.group(1).rstrip(",")
    except TimeoutError:
        child.proc.kill()
        raise PsfwError(f"shard {index} did not start listening within {START_TIMEOUT_S:.0f} s") from None


async def _stop(children: list[Child]) -> None:
    for child in children:
        if child.proc.returncode is None:
            child.proc.terminate()
    for child in children:
        try:
            await asyncio.wait_for(child.proc.wait(), STOP_GRACE_S)
        except TimeoutError:
            child.proc.kill()
            await child.proc.wait()
    for child in children:
        if child.pump is not None:
            await asyncio.gather(child.pump, return_exceptions=True)


async def launch(config_path: Path, config: Config, run_dir: Path | None, resume: bool = False) -> int:
    """Run the cluster of ``config``; returns the exit code for ``psfw launch``.
    ``resume``: continue the run in ``run_dir`` from its newest checkpoint (without
    it, a run folder that holds checkpoints is refused)."""
    c = config.cluster
    if run_dir is not None:
        check_run_dir(run_dir, c.servers, resume)
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
        addresses = []
        keep = config.train.checkpoint_every or resume
        checkpoints = run_dir / CHECKPOINTS if run_dir is not None and keep else None
        for index in range(c.servers):
            child, address = await _start_shard(index, c.servers, checkpoints)
            children.append(child)
            addresses.append(address)
        shards = list(children)
        workers = []
        for process in range(c.worker_groups * c.processes_per_group):
            args = ["worker", str(config_path), "--process", str(process), "--servers", ",".join(addresses)]
            if process == 0 and run_dir is not None:
                args += ["--run-dir", str(run_dir)]
            workers.append(await _spawn(f"worker {process}", args))
        children.extend(workers)
        for child in children:
            child.pump = asyncio.create_task(_pump(child))
        waits = {asyncio.create_task(child.proc.wait()): child for child in children}
        stop = asyncio.create_task(interrupted.wait())
        running_workers = set(workers)
        while running_workers:
            done, _ = await asyncio.wait([*waits, stop], return_when=asyncio.FIRST_COMPLETED)
            if stop in done:
                print("psfw launch: interrupted, stopping every process", file=sys.stderr, flush=True)
                return 128 + signals[0]  # 130 for Ctrl-C, 143 for SIGTERM (as psfw train, worker), 129
            for task in done:
                child = waits.pop(task)
                code = task.result()
                if code != 0 or child in shards:
                    print(
                        f"psfw launch: {child.name} {_describe_exit(code)}; stopping the others",
                        file=sys.stderr,
                        flush=True,
                    )
                    return 1
                running_workers.discard(child)
        stop.cancel()
        print("psfw launch: every worker process finished", flush=True)
        return 0
    finally:
        await _stop(children)
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
