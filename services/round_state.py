"""The state of a shard's rounds: each process's contribution to a group step, the
round that collects them, a group's state, who reported, and what an Update
answers (``psfw.services.rounds`` is the protocol over them)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import jax

from psfw.base.errors import WireError
from psfw.protocol.layout import SliceKey
from psfw.protocol.messages import Parts, RowBlock, UpdateHeader


@dataclass
class Contribution:
    """One process's part of a group step."""

    workers: int
    rows: int
    sums: dict[SliceKey, Parts]  # kept as received, no copy: the update adds them up
    metrics: dict[str, float]  # x rows
    push: Mapping[str, RowBlock] = field(default_factory=dict)  # table rows' gradient sums, x rows


@dataclass
class Progress:
    """A pipelined round's slices (``psfw.services.slice_rounds``): whose part of
    each has arrived, which are applied (each once, as soon as every process's part
    is in), the futures that get each one's value after the step, and whose
    requests have ended (their table rows are all in)."""

    arrived: dict[SliceKey, set[int]]
    ready: dict[SliceKey, asyncio.Future]
    applied: set[SliceKey] = field(default_factory=set)
    ended: set[int] = field(default_factory=set)
    finite: dict[SliceKey, jax.Array] = field(default_factory=dict)  # each applied slice: was its sum finite

    @classmethod
    def of(cls, keys: Iterable[SliceKey], contributors: Iterable[int]) -> Progress:
        """Progress over ``keys``; ``contributors`` sent whole Updates (every slice, ended)."""
        loop, whole = asyncio.get_running_loop(), set(contributors)
        keys = list(keys)
        return cls({k: set(whole) for k in keys}, {k: loop.create_future() for k in keys}, ended=set(whole))


@dataclass
class Round:
    """The contributions to one group step that is not complete yet."""

    step: int
    workers_per_group: int
    contributions: dict[int, Contribution] = field(default_factory=dict)  # by process
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    progress: Progress | None = None  # slice by slice, once a pipelined Update joined

    @property
    def workers(self) -> int:
        return sum(c.workers for c in self.contributions.values())

    @property
    def rows(self) -> int:
        return sum(c.rows for c in self.contributions.values())

    def gradients(self, keys: Iterable[SliceKey]) -> dict[SliceKey, Parts]:
        """Every contribution's parts of each slice, to be added up."""
        return {key: tuple(p for c in self.contributions.values() for p in c.sums[key]) for key in keys}

    def metric_sums(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for c in self.contributions.values():
            for name, value in c.metrics.items():
                metrics[name] = metrics.get(name, 0.0) + value
        return metrics

    def fail(self, error: WireError) -> None:
        """Every waiter gets ``error`` (marked as seen: waiters that left do not warn)."""
        waiting = [self.done, *(self.progress.ready.values() if self.progress is not None else ())]
        for future in waiting:
            if not future.done():
                future.set_exception(error)
                future.exception()


@dataclass
class GroupState:
    step: int = 0  # completed steps
    round: Round | None = None
    last: list[int] = field(default_factory=list)  # processes of the last applied step (the dedup state)
    last_metrics: tuple[dict[str, float], int] = ({}, 0)  # the last applied step's metric sums and rows


class Reports:
    """When each process of each group last sent an Update, and how many it sent:
    a process started a second time sees the first one report again (not
    checkpointed: it is about processes alive now)."""

    def __init__(self) -> None:
        self._seen: dict[tuple[int, int], tuple[int, float]] = {}  # (group, process) -> (updates, monotonic)

    def seen(self, group: int, process: int) -> None:
        count = self._seen.get((group, process), (0, 0.0))[0]
        self._seen[(group, process)] = (count + 1, time.monotonic())

    def of(self, group: int) -> list[tuple[int, int, float]]:
        """``(process, updates, seconds since the last)`` for the processes of ``group``."""
        now = time.monotonic()
        return [(p, n, now - at) for (g, p), (n, at) in sorted(self._seen.items()) if g == group]


@dataclass(frozen=True)
class UpdateResult:
    step: int  # the group's completed steps after the update
    values: dict[SliceKey, jax.Array]  # a snapshot right after the update
    shared: bool  # True: every process of the group gets this answer (False: an acknowledged retry)
    slowest_step: int = 0  # the slowest group's completed steps when the answer left
    metrics: dict[str, float] = field(default_factory=dict)  # the group's metrics of the step, x rows
    rows: int = 0  # the group's rows of the step
    table_rows: dict[str, RowBlock] = field(default_factory=dict)  # the rows the Update pulled (its own)
    stop_at: int = 0  # the early end of the job some process asked for (0: none)
    # the encoded answer, built once for all the group's processes; the result holds
    # no reference to its round, so that old values are freed without the cycle collector
    cache: dict = field(default_factory=dict)


def bounded(head: UpdateHeader) -> bool:
    """Whether the Update's group waits for the slowest group (a staleness bound
    where there are other groups, or may be)."""
    return head.staleness >= 0 and (head.worker_groups > 1 or head.max_groups != 0)
