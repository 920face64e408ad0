"""psfw's own child processes: shards for ``psfw launch``, bench and load tests, and
the worker processes of ``psfw launch``.

A child runs ``python -P -m psfw.cli ...``: ``-P`` keeps the current folder off its
import path, so a child started in psfw's source folder imports the installed psfw
and not the folder ``psfw/`` there (which lacks ``psfw.compute`` and
``psfw.services``: the install maps them in). A shard says it is ready by writing a
JSON record with its bound address to a file (``psfw server --ready-file``), so no
one parses the sentences it prints. A child that ends before it is ready is reported
in one error with the last lines it printed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections import deque
from pathlib import Path
from typing import TextIO

from psfw.base.console import say
from psfw.base.errors import PsfwError

START_TIMEOUT_S = 120.0  # a shard loads a checkpoint before it is ready
TAIL_LINES = 12


def psfw_command(*args: str) -> list[str]:
    """The command line of a psfw child process."""
    return [sys.executable, "-P", "-m", "psfw.cli", *args]


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def shard_args(index: int, shards: int, ready_file: Path, *extra: str) -> list[str]:
    """``psfw server`` arguments for shard ``index`` of ``shards`` on a free port of
    127.0.0.1 that writes its ready record to ``ready_file``."""
    return [
        "server",
        "--shard",
        str(index),
        "--of",
        str(shards),
        "--listen",
        "127.0.0.1:0",
        "--ready-file",
        str(ready_file),
        *extra,
    ]


def read_ready(path: Path) -> dict | None:
    """A shard's ready record (``address``, ``metrics``, ``pid``, ...), or None while
    there is none. The file is written atomically: complete or absent."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def describe_exit(code: int) -> str:
    """``exited with code 1``, ``was killed by SIGKILL``."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class Tail:
    """What a child prints, line by line: the last lines are kept (for the error
    that reports a child that failed to start), and with ``echo`` each line is
    written to ``stream`` (default: stderr) behind the child's name."""

    def __init__(self, name: str, echo: bool = False, stream: TextIO | None = None):
        self.name = name
        self.echo = echo
        self.stream = stream
        self.lines: deque[str] = deque(maxlen=TAIL_LINES)
        self._rest = b""
        self._lock = threading.Lock()  # a reader thread feeds while another starts the echo

    def feed(self, data: bytes) -> None:
        """Take a piece of the child's output (lines may span pieces)."""
        *lines, self._rest = (self._rest + data).split(b"\n")
        for raw in lines:
            self._line(raw)

    def close(self) -> None:
        """The output ended: a last line without its newline counts too."""
        if self._rest:
            self._line(self._rest)
            self._rest = b""

    def _line(self, raw: bytes) -> None:
        text = raw.decode(errors="replace").rstrip()
        with self._lock:
            self.lines.append(text)
            if self.echo:
                say(f"[{self.name}] {text}", self.stream)

    def start_echo(self) -> None:
        """Echo from now on, starting with the lines kept so far."""
        with self._lock:
            for text in self.lines:
                say(f"[{self.name}] {text}", self.stream)
            self.echo = True

    def not_ready(self, how: str) -> PsfwError:
        """The error for a child that ``how`` (``exited with code 1``, ``did not
        start within 120 s``) before it was ready, with its last lines."""
        with self._lock:
            shown = "\n".join(f"  [{self.name}] {text}" for text in self.lines) or "  (it printed nothing)"
        return PsfwError(f"{self.name} {how} before it was ready; its last lines:\n{shown}")
