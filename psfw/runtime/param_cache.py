"""The parameters of one worker process, shared by all its workers without copies."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from psfw.base.errors import PsfwError, WaitTimeout
from psfw.protocol.messages import TableRows


@dataclass(frozen=True)
class StepValues:
    """What the cache hands its workers for one step: the dense parameters and, for a
    model with embedding tables, the rows the step's sub-batches look up."""

    params: dict[str, Any]  # whole parameters by name
    rows: TableRows = field(default_factory=dict)  # {table: RowBlock}: the rows of the workers' ids
    test_rows: TableRows | None = None  # the test split's rows, at a step that is evaluated


class Rewind(Exception):
    """The stub re-synced with the shards: go on from ``step`` in ``generation``."""

    def __init__(self, step: int, generation: int):
        super().__init__(f"re-synced: continue from step {step}")
        self.step, self.generation = step, generation


class ParamCache:
    """Full parameter values by name (and table rows) and the group step they reflect.

    The stub (on the event loop) writes values and step together (``publish``),
    which wakes the workers waiting in ``fresh``: they run in threads of their own
    and wait on a thread condition, so waking them costs no trip through the event
    loop. A publish replaces the values, it never writes into an array a worker may
    still be reading; but they may be views of a transport's buffers that the
    publish after next writes over (``psfw.runtime.step_region``), so a watcher that
    keeps values longer than its call copies them. A re-sync (``rewind``) starts a new
    generation: workers of the old one get ``Rewind``.
    """

    def __init__(self, group: int = 0, process: int = 0):
        self.group, self.process = group, process
        self.values = StepValues({})
        self.step = -1
        self.generation = 0
        self.stop_at = 0  # an early end of the job: workers stop at this step (0: at the job's steps)
        self._changed = threading.Condition()
        self._error: BaseException | None = None
        self._doing = ("starting", time.monotonic())  # what the stub is busy with, and since when
        # called with (step, values) after each publish and rewind (the evaluation of
        # process 0); the values are theirs only during the call (see above)
        self.watchers: list[Callable[[int, StepValues], None]] = []

    def doing(self, what: str | Callable[[], str]) -> None:
        """Note what the stub is busy with (named when a worker's wait runs out); a
        worker gives up only ``timeout_s`` after the stub's last note. ``what`` may
        be a function that says it: called only when a wait runs out, so the stub's
        steps pay no formatting."""
        self._doing = (what, time.monotonic())

    def start(self, timeout_s: float) -> tuple[int, int]:
        """Wait for the first values; returns ``(step, generation)`` to start from."""
        self._wait(lambda: self.step >= 0, timeout_s, "the first parameters")
        with self._changed:
            return self.step, self.generation

    def fresh(self, step: int, generation: int, timeout_s: float) -> StepValues:
        """The values once they reflect ``step`` completed steps of the group (blocks).

        Raises Rewind if the stub re-synced since ``generation``, WaitTimeout naming
        the group, process, step and what the stub was doing once ``timeout_s``
        passed without a note from the stub (see ``doing``), or PsfwError with the
        reason the process stopped (the stub's error, or the job's end).
        """
        with self._changed:
            self._wait(
                lambda: self.step >= step or self.generation != generation, timeout_s, f"parameters of step {step}"
            )
            if self.generation != generation:
                raise Rewind(self.step, self.generation)
            return self.values

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        with self._changed:  # reentrant: ``fresh`` holds it already
            started = time.monotonic()
            # a wait beyond what the thread library takes (train.wait_s may be huge) has no limit
            limit = None if timeout_s >= threading.TIMEOUT_MAX else timeout_s
            # the limit counts from the stub's last note: a stub that is getting
            # somewhere (group 0's warmup advancing) keeps its workers waiting
            while not self._changed.wait_for(lambda: ready() or self._error is not None, limit):
                doing, since = self._doing
                doing = doing() if callable(doing) else doing
                now = time.monotonic()
                limit = since + timeout_s - now
                if limit <= 0:
                    raise WaitTimeout(
                        f"group {self.group} process {self.process}: waited {now - started:.1f} s for {what}; "
                        f"the cache holds step {self.step}; the stub has been {doing} for {now - since:.1f} s"
                    )
            if self._error is not None:
                raise PsfwError(f"process {self.process} stopped: {self._error}") from self._error

    def publish(self, step: int, values: StepValues) -> None:
        """Install fresh values for ``step`` and wake the waiting workers."""
        with self._changed:
            self.values, self.step = values, step
            self._changed.notify_all()
        for watch in self.watchers:
            watch(step, values)

    def rewind(self, step: int, values: StepValues) -> int:
        """Start a new generation at ``step`` (after a re-sync); returns it."""
        with self._changed:
            self.values, self.step = values, step
            self.generation += 1
            self._changed.notify_all()
        for watch in self.watchers:
            watch(step, values)
        return self.generation

    def fail(self, error: BaseException) -> None:
        """Wake every waiting worker with ``error`` (the stub's, or the job's end)."""
        with self._changed:
            if self._error is None:
                self._error = error
            self._changed.notify_all()
