"""Shard processes on this machine, for benchmarks and load tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from contextlib import contextmanager


@contextmanager
def shard_processes(count: int, *extra: str):
    """Start ``count`` ``psfw server`` processes on 127.0.0.1 (free ports); yields
    ``(addresses, processes)``, and stops them afterwards."""
    procs = []
    try:
        addresses = []
        for i in range(count):
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "psfw.cli",
                    "server",
                    "--shard",
                    str(i),
                    "--of",
                    str(count),
                    "--listen",
                    "127.0.0.1:0",
                    "--grace",
                    "0",
                    *extra,
                ],
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            procs.append(proc)
            line = proc.stdout.readline()
            match = re.search(r"listening on (\S+)", line)
            if not match:
                raise RuntimeError(f"shard process {i} did not start: {line!r}")
            addresses.append(match.group(1).rstrip(","))
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
            proc.stdout.close()


def rss_bytes(pid: int, field: str = "VmHWM") -> int:
    """A process's resident memory from /proc: peak (VmHWM) or current (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field} for process {pid}")
