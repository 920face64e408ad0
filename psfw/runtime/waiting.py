"""Saying whom a step waits for: while a stub's Update waits for the rest of its
group, which processes of the group have not reported that step, and since when
(``psfw: group 0 step 12: waiting for process 1 since 14:02:31 (6 s)``), every
``REPORT_EVERY_S``. The shards know who reported: the stub asks the ones that have
not answered yet (a Describe), only once a wait lasts. And how a stop ends a step's
Updates on their way: whole or not at all (``whole_or_none``)."""

from __future__ import annotations

import asyncio
import logging
import time

from psfw.base.errors import ShardError
from psfw.runtime.transport import Transport

log = logging.getLogger("psfw")
REPORT_EVERY_S = 5.0  # a step of a healthy group takes far less; tests lower it


class GroupWait:
    """The worker processes of one stub's group, and how to find the ones a step waits for."""

    def __init__(self, clients: list[Transport], group: int, process: int, group_processes: int):
        self.clients, self.group, self.process = clients, group, process
        self.members = range(group * group_processes, (group + 1) * group_processes)

    def watch(self, step: int, waiting: set[int]) -> Watch | None:
        """Say every few seconds which processes the Update of ``step`` waits for,
        while shards ``waiting`` (their indices, emptied as they answer) have not
        answered, until the watch is cancelled; None for a group of one process."""
        return Watch(self, step, waiting) if len(self.members) > 1 else None

    async def missing(self, step: int, shards: list[int]) -> list[int]:
        """The group's processes that have not reported ``step`` to one of ``shards``
        (this one excepted: its report is on its way)."""
        replies = await asyncio.gather(*(self.clients[i].describe() for i in shards), return_exceptions=True)
        missing: set[int] = set()
        for reply in replies:
            if isinstance(reply, ShardError):
                continue  # the Update's own error says more, when it comes
            if isinstance(reply, BaseException):
                raise reply
            held = next((g for g in reply.groups if g.group == self.group), None)
            if held is None or held.step == step:  # the step is open there (or nobody reported yet)
                reported = set(held.pending_processes) if held is not None else set()
                missing |= set(self.members) - reported - {self.process}
        return sorted(missing)


class Watch:
    """One step's wait: quiet for ``REPORT_EVERY_S``, then a line every ``REPORT_EVERY_S``."""

    def __init__(self, wait: GroupWait, step: int, waiting: set[int]):
        self.wait, self.step, self.waiting = wait, step, waiting
        self.since, self.started = time.time(), time.monotonic()
        self._task: asyncio.Task | None = None
        self._timer = asyncio.get_running_loop().call_later(REPORT_EVERY_S, self._start)

    def _start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._say(), name="psfw-group-wait")

    async def _say(self) -> None:
        while self.waiting:
            try:
                missing = await self.wait.missing(self.step, sorted(self.waiting))
            except Exception as err:  # the wait goes on: only the note is lost
                log.warning("group %d step %d: cannot tell whom it waits for: %s", self.wait.group, self.step, err)
                return
            if missing:
                who = ", ".join(map(str, missing))
                log.warning(
                    "group %d step %d: waiting for process%s %s since %s (%.0f s)",
                    self.wait.group,
                    self.step,
                    "es" if len(missing) > 1 else "",
                    who,
                    time.strftime("%H:%M:%S", time.localtime(self.since)),
                    time.monotonic() - self.started,
                )
            await asyncio.sleep(REPORT_EVERY_S)

    def cancel(self) -> None:
        self._timer.cancel()
        if self._task is not None:
            self._task.cancel()


SEND_GRACE_S = 2.0  # a stop lets a step's Updates that are on their way reach every shard


async def whole_or_none(sending: asyncio.Future):
    """``sending`` (a step's Updates to every shard), not cut off halfway by a stop:
    a contribution that reached some shards and not others would leave the shards
    at different steps, and their final checkpoints would make no complete one. A
    stop lets it go on for ``SEND_GRACE_S`` (the answers may wait for processes that
    stopped: then it is cancelled after all)."""
    try:
        return await asyncio.shield(sending)
    except asyncio.CancelledError:
        try:
            await asyncio.wait({sending}, timeout=SEND_GRACE_S)
        finally:  # a second cancellation ends the grace, never leaves the Updates running
            sending.cancel()
        raise
