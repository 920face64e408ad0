"""Which groups train against a shard now: the groups that bound the staleness.

Groups are asynchronous between each other, so one may leave and another join while
the rest go on. A shard counts a group as gone once it has sent no Update for the
job's ``cluster.group_timeout_s`` (a group that never reported counts from when the
shard learnt the timeout): from then on it no longer holds the others back under a
staleness bound. A gone group that reports again is back: at once where the groups
are unbounded, else once its step is within the bound of the slowest group counted
(a group stopped for long would otherwise hold every other one until it caught up).
A group the job did not start with (``cluster.max_groups``) joins at the step where
the job stands and counts from its first Update. Each change is one log line.

Nothing here is checkpointed: it is about the processes alive now. A shard started
again gives every group a whole timeout before it counts it as gone.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc

from psfw.protocol.messages import UpdateHeader
from psfw.services.request_checks import check_group, refusal
from psfw.services.rounds import GroupState

if TYPE_CHECKING:
    from psfw.services.store import ShardStore

log = logging.getLogger("psfw.server")


class GroupPresence:
    """The groups of ``store``'s job that count now (see the module docstring).

    What the job says of its groups comes with its Updates (``report``): how many it
    started with, the timeout, how many may join."""

    def __init__(self, store: ShardStore, clock: Callable[[], float] = time.monotonic):
        self.store, self.clock = store, clock
        self.worker_groups = 0  # the groups the job started with, as its Updates say
        self.timeout_s = 0.0  # cluster.group_timeout_s (0: a group is never gone)
        self.since: float | None = None  # when the shard learnt the timeout
        self.seen: dict[int, float] = {}  # group -> when its last Update came (clock)
        self.gone: set[int] = set()

    # -- the groups ------------------------------------------------------------

    def groups(self) -> list[int]:
        """The job's groups: the ones it started with and those that joined."""
        return sorted(set(range(self.worker_groups)) | set(self.store.groups))

    def counted(self) -> list[int]:
        """The groups that bound the staleness: every group of the job but the gone ones."""
        return [g for g in self.groups() if g not in self.gone]

    def slowest_step(self, worker_groups: int) -> int:
        """The completed steps of the slowest group counted, among groups
        0..worker_groups-1 and those that joined; with every group gone, the
        furthest group's (nothing holds a group back then)."""
        store = self.store
        groups = set(range(max(worker_groups, 1))) | set(store.groups)
        steps = [store.group_step(g) for g in sorted(groups) if g not in self.gone]
        return min(steps) if steps else max((store.group_step(g) for g in groups), default=0)

    # -- an Update -------------------------------------------------------------

    def admit(self, head: UpdateHeader) -> GroupState:
        """The state of ``head.group``, which the shard does not hold yet: a group of
        the job at step 0, or a group that joins at the step its first Update names.
        A group beyond the job's ``max_groups`` is INVALID_ARGUMENT, a join past
        every group's step FAILED_PRECONDITION (the stub re-syncs)."""
        check_group(head)
        if not head.worker_groups or head.group < head.worker_groups:
            return GroupState()
        furthest = max((state.step for state in self.store.groups.values()), default=0)
        if head.step > furthest:
            raise refusal(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"shard {self.store.shard}: group {head.group} cannot join at step {head.step}: no group is past step "
                f"{furthest}: join where the job stands (re-sync)",
            )
        return GroupState(step=head.step)

    def report(self, head: UpdateHeader) -> None:
        """An Update of ``head.group`` came: the group is seen now, and a gone one
        may be back."""
        now, group = self.clock(), head.group
        self.worker_groups = head.worker_groups
        timeout = head.group_timeout_s if head.staleness != 0 else 0.0  # groups in lockstep wait for each other
        if timeout != self.timeout_s:
            self.timeout_s = timeout
            self.since = now if timeout else None
        self.seen[group] = now
        if group in self.gone and self._within_bound(group, head.step, head.staleness):
            self.gone.discard(group)
            self._say(f"group {group} is back at step {head.step}")

    def waits(self, group: int) -> None:
        """``group`` is held back by the staleness bound now: it is there, not quiet."""
        if group in self.seen:
            self.seen[group] = self.clock()

    def joined(self, group: int, step: int) -> None:
        """A group the job did not start with took its place at ``step``: counted from now."""
        self.seen[group] = self.clock()
        self.gone.discard(group)
        self._say(f"group {group} joined at step {step}")

    def _within_bound(self, group: int, step: int, bound: int) -> bool:
        """Whether a gone group at ``step`` may count again: always where the groups
        are unbounded, else once it is at most ``bound`` steps behind the slowest
        group counted."""
        if bound < 0:
            return True
        others = [self.store.group_step(g) for g in self.counted() if g != group]
        return not others or step >= min(others) - bound

    # -- time ----------------------------------------------------------------

    def sweep(self) -> list[int]:
        """Count the groups that sent no Update for the timeout as gone, each said in
        one line; returns them."""
        if not self.timeout_s or self.since is None:
            return []
        now = self.clock()
        left = [g for g in self.counted() if now - self.seen.get(g, self.since) > self.timeout_s]
        for group in left:
            self.gone.add(group)
            quiet = now - self.seen.get(group, self.since)
            self._say(
                f"group {group} left: no Update for {quiet:.1f} s (cluster.group_timeout_s = {self.timeout_s:g}); "
                "it no longer bounds the staleness"
            )
        return left

    def next_change_s(self) -> float:
        """Seconds until the next counted group would be gone (inf: none can be)."""
        if not self.timeout_s or self.since is None:
            return math.inf
        now = self.clock()
        ends = [self.seen.get(g, self.since) + self.timeout_s for g in self.counted()]
        return max(0.0, min(ends) - now) if ends else math.inf

    def _say(self, what: str) -> None:
        log.warning("shard %d: %s; groups active: %s", self.store.shard, what, self.counted())
