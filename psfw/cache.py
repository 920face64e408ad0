"""The parameters of one process, shared by all its workers without copies."""

from __future__ import annotations

import asyncio
from typing import Any

from psfw.errors import PsfwError, WaitTimeout


class ParamCache:
    """Full parameter values by name and the group step they reflect.

    The stub writes values first, then the step (``publish``), which wakes the
    workers waiting in ``fresh``. Values are immutable arrays: a publish replaces
    them, it never writes into an array a worker may still be reading.
    """

    def __init__(self, group: int = 0, process: int = 0):
        self.group, self.process = group, process
        self.values: dict[str, Any] = {}
        self.step = -1
        self._changed = asyncio.Condition()
        self._error: BaseException | None = None

    async def fresh(self, step: int, timeout_s: float) -> dict[str, Any]:
        """The values once they reflect ``step`` completed steps of the group.

        Raises WaitTimeout naming the group, process and step after ``timeout_s``,
        or the stub's error if the stub failed.
        """
        if self.step < step and self._error is None:
            try:
                async with self._changed:
                    await asyncio.wait_for(
                        self._changed.wait_for(lambda: self.step >= step or self._error is not None), timeout_s
                    )
            except TimeoutError:
                raise WaitTimeout(
                    f"group {self.group} process {self.process}: waited {timeout_s:.1f} s for parameters "
                    f"of step {step}; the cache holds step {self.step}"
                ) from None
        if self._error is not None:
            raise PsfwError(f"the stub of process {self.process} failed: {self._error}") from self._error
        return self.values

    async def publish(self, step: int, values: dict[str, Any]) -> None:
        """Install fresh values for ``step`` and wake the waiting workers."""
        self.values = values
        self.step = step
        async with self._changed:
            self._changed.notify_all()

    async def fail(self, error: BaseException) -> None:
        """Wake every waiting worker with the stub's error."""
        self._error = error
        async with self._changed:
            self._changed.notify_all()
