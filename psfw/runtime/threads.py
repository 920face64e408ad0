"""Threads whose every ending reaches the event loop.

asyncio cannot set a StopIteration on a future (``next()`` of an empty iterator in a
model's or a data source's code): the task that awaits it would wait forever. A
SystemExit or KeyboardInterrupt raised in a thread would end the event loop instead of
the task. ``Threads`` hands each of them back as a ``ThreadError``.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["ThreadError", "Threads", "cause_of"]


class Threads(ThreadPoolExecutor):
    """A thread pool (the default executor of a job's event loop, and its workers')
    whose calls end only with a value or an ``Exception`` (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._busy = 0  # calls running now
        self._count = threading.Lock()

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        return super().submit(self._call, fn, *args, **kwargs)

    def _call(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Any:
        with self._count:
            self._busy += 1
        try:
            return _plain_ending(fn, *args, **kwargs)
        finally:
            with self._count:
                self._busy -= 1

    def close(self) -> None:
        """Shut the pool down; wait for its threads to end unless one is still in a
        call (left behind by a stop): that one ends alone when its call returns."""
        self.shutdown(wait=not self._busy, cancel_futures=True)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        # asyncio.Runner's close waits for its default executor without a bound: a
        # call still running (a final evaluation cut short by Ctrl-C) is left to end
        # alone rather than hold the stop
        super().shutdown(wait=wait and not self._busy, cancel_futures=cancel_futures)


class ThreadError(Exception):
    """What a thread raised that a future cannot hold, as an error that it can."""


def _plain_ending(fn: Callable, /, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except Exception as err:
        if not isinstance(err, StopIteration | StopAsyncIteration):
            raise
        raise ThreadError(f"{_name(fn)} raised {cause_of(err)}") from None
    except BaseException as err:  # noqa: BLE001 - SystemExit and the like: the thread's end, not the loop's
        raise ThreadError(f"{_name(fn)} raised {cause_of(err)}") from None


def _name(fn: Any) -> str:
    """The name of the function a thread ran (``asyncio.to_thread`` wraps it in a
    ``partial`` of its context's ``run``)."""
    while isinstance(fn, functools.partial):
        fn = fn.args[0] if getattr(fn.func, "__name__", "") == "run" and fn.args else fn.func
    return getattr(fn, "__qualname__", type(fn).__name__)


def cause_of(err: BaseException) -> str:
    """``RuntimeError: what it says``, in one line: the error's type and its first line,
    or the last line of a traceback the message carries (a failed ``jax.debug.callback``
    carries the callback's whole traceback)."""
    if isinstance(err, ThreadError):
        return str(err)
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    if len(lines) > 1 and "Traceback (most recent call last)" in lines[0]:
        return lines[-1].strip()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
