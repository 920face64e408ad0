"""How a job's event loop runs and stops: the first Ctrl-C stops it gracefully, the
second at once.

The first SIGINT (``psfw.cli.main`` turns a SIGTERM into one) cancels the job's main
task as ``asyncio.run`` does: its cleanups run (workers stop at their next step,
channels close, shared memory is removed, shards stop) and the caller gets
KeyboardInterrupt. A second one, while that runs, says its line and ends the OS process
at once: nothing of a stop is worth more than the user's word. Calls into threads
(``asyncio.to_thread``) end as plain errors (``psfw.runtime.threads``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from psfw.runtime.threads import Threads

__all__ = ["last_words", "run_job"]

T = TypeVar("T")

# what the OS process says when a second signal ends it at once (set by the command)
_last_words: list[Callable[[int], str]] = []


def last_words(line: Callable[[int], str] | None) -> None:
    """Set the line said (given the signal) when a second signal ends the OS process
    at once; None: a plain ``psfw: stopped at once``."""
    _last_words[:] = [] if line is None else [line]


def run_job(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` with the two-stage stop of the module docstring (in the
    main thread, where Ctrl-C is Python's default; elsewhere it is not ours)."""

    async def job() -> T:
        asyncio.get_running_loop().set_default_executor(Threads(thread_name_prefix="psfw-thread"))
        return await main

    ours = threading.current_thread() is threading.main_thread()
    if not ours or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return asyncio.run(job())
    signals: list[int] = []
    task: asyncio.Task | None = None

    def on_sigint(signum: int, frame: Any) -> None:
        signals.append(signum)
        if len(signals) == 1 and task is not None and not task.done():
            task.cancel()
            task.get_loop().call_soon_threadsafe(lambda: None)  # wake a loop that waits in select()
            return
        _stop_at_once(signum)

    # set until the loop is closed: its closing (the tasks' cleanups, the threads)
    # is part of the graceful stop that a second signal cuts short
    signal.signal(signal.SIGINT, on_sigint)
    try:
        with asyncio.Runner() as runner:
            task = runner.get_loop().create_task(job())
            try:
                return runner.get_loop().run_until_complete(task)
            except asyncio.CancelledError:
                if signals:
                    raise KeyboardInterrupt from None
                raise
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _stop_at_once(signum: int) -> None:
    try:  # whatever saying the line costs, the OS process ends
        line = _last_words[0](signum) if _last_words else "psfw: stopped at once"
        sys.stdout.flush()
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    finally:
        os._exit(128 + signum)
