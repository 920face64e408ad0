"""Shard processes on this machine, for benchmarks, load tests and tests."""

from __future__ import annotations

import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from psfw.jobs.children import START_TIMEOUT_S, Tail, child_env, describe_exit, psfw_command, read_ready, shard_args


def _pump(proc: subprocess.Popen, tail: Tail) -> None:
    while chunk := proc.stdout.read1(1 << 16):
        tail.feed(chunk)
    tail.close()


def _wait_ready(proc: subprocess.Popen, tail: Tail, reader: threading.Thread, ready_file: Path) -> str:
    """The address of a shard once it is ready; PsfwError (with its last lines)
    when it ends or hangs before."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while (ready := read_ready(ready_file)) is None:
        code = proc.poll()
        if code is not None:
            reader.join(10)  # every line it printed
            raise tail.not_ready(describe_exit(code))
        if time.monotonic() > deadline:
            raise tail.not_ready(f"did not start within {START_TIMEOUT_S:.0f} s")
        time.sleep(0.02)
    tail.start_echo()
    return ready["address"]


@contextmanager
def shard_processes(count: int, *extra: str):
    """Start ``count`` ``psfw server`` processes on 127.0.0.1 (free ports); yields
    ``(addresses, processes)``, and stops them afterwards. What a shard prints once
    it is ready goes to stderr behind its name; a shard that fails to start is one
    PsfwError with its last lines."""
    procs, readers = [], []
    try:
        addresses = []
        with tempfile.TemporaryDirectory(prefix="psfw-shards-") as ready_dir:
            for i in range(count):
                ready_file = Path(ready_dir) / f"shard-{i}.json"
                proc = subprocess.Popen(
                    psfw_command(*shard_args(i, count, ready_file, "--grace", "0", *extra)),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    env=child_env(),
                )
                procs.append(proc)
                tail = Tail(f"shard {i}")
                readers.append(threading.Thread(target=_pump, args=(proc, tail), daemon=True))
                readers[-1].start()
                addresses.append(_wait_ready(proc, tail, readers[-1], ready_file))
        yield addresses, procs
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for reader in readers:
            reader.join(10)
        for proc in procs:
            proc.stdout.close()


def rss_bytes(pid: int, field: str = "VmHWM") -> int:
    """A process's resident memory from /proc: peak (VmHWM) or current (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field} for process {pid}")
