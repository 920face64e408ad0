"""A group's steps at one shard: the round of contributions in progress, what is
kept of the last applied step, and the checks an Update passes before it may
change anything.

A round holds one contribution per process: its workers, rows, metrics x rows,
and its gradient sum per slice (a tuple of parts where the transport fused the sum,
see psfw.runtime.transport.Capabilities). The update kernel adds them up when the
round is full.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import jax
import numpy as np

from psfw.base.errors import Reason, WireError
from psfw.protocol.layout import SliceKey
from psfw.protocol.messages import Parts, RowBlock, UpdateHeader
from psfw.protocol.wire import slice_name

MAX_ROWS = 2**53  # the mean divides by the rows: beyond this, a float64 no longer counts them exactly
MAX_METRICS = 64


def refusal(code: grpc.StatusCode, message: str) -> WireError:
    """A refused request. The shard's own waits that ran out are answers, not lost
    connections: they carry Reason.SHARD_WAIT, and a client does not retry them."""
    return WireError(code, message, Reason.SHARD_WAIT if code == grpc.StatusCode.DEADLINE_EXCEEDED else Reason.NONE)


def nonfinite(group: int, step: int, what: str) -> WireError:
    return refusal(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"group {group} step {step}: the gradient of {what} has NaN or Inf values (policy: reject)",
    )


@dataclass
class Contribution:
    """One process's part of a group step."""

    workers: int
    rows: int
    sums: dict[SliceKey, Parts]  # kept as received, no copy: the update adds them up
    metrics: dict[str, float]  # x rows
    push: Mapping[str, RowBlock] = field(default_factory=dict)  # table rows' gradient sums, x rows


@dataclass
class Round:
    """The contributions to one group step that is not complete yet."""

    step: int
    workers_per_group: int
    contributions: dict[int, Contribution] = field(default_factory=dict)  # by process
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())

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
        if not self.done.done():
            self.done.set_exception(error)
            self.done.exception()


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


def check_update(shard: int, state: GroupState, head: UpdateHeader, held: Iterable[SliceKey], sums) -> Round | None:
    """Refuse an Update that cannot be added to its group's step (a WireError that
    says why); returns the round in progress, if any."""
    step, process, workers, rows, wpg = head.step, head.process, head.workers, head.rows, head.workers_per_group
    where = f"group {head.group} step {step}"
    if step > state.step:
        raise refusal(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"shard {shard}: {where} is ahead of the group, which has completed {state.step} steps",
        )
    if wpg < 1 or workers < 1 or workers > wpg:
        raise refusal(
            grpc.StatusCode.INVALID_ARGUMENT, f"{where}: workers={workers} of workers_per_group={wpg} is impossible"
        )
    if rows < workers:
        raise refusal(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: {rows} rows cannot come from {workers} workers")
    if rows > MAX_ROWS:
        raise refusal(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: {rows} rows is more than the limit of 2^53")
    if head.worker_groups and head.group >= head.worker_groups:
        raise refusal(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: group {head.group} of {head.worker_groups} groups")
    if len(head.metrics) > MAX_METRICS or any(len(name) > 100 for name in head.metrics):
        raise refusal(
            grpc.StatusCode.INVALID_ARGUMENT, f"{where}: at most {MAX_METRICS} metrics of names up to 100 characters"
        )
    if head.staleness < -1:
        raise refusal(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: staleness {head.staleness} (use -1 for none)")
    missing = sorted(set(held) - set(sums))
    if missing:
        names = ", ".join(slice_name(k) for k in missing[:5])
        raise refusal(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{where}: the update lacks {len(missing)} slices of shard {shard} ({names}): "
            "send a gradient for every slice the shard holds",
        )
    rnd = state.round
    if rnd is not None:
        if rnd.workers_per_group != wpg:
            raise refusal(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{where}: workers_per_group={wpg} disagrees with {rnd.workers_per_group} from other processes",
            )
        if process not in rnd.contributions and rnd.workers + workers > wpg:
            raise refusal(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{where}: {rnd.workers} + {workers} workers exceed workers_per_group={wpg}",
            )
    return rnd


def incomplete(shard: int, group: int, rnd: Round, head: UpdateHeader) -> WireError:
    """The wait for the rest of the group ran out: who reported, who did not."""
    n = head.group_processes
    missing = sorted(set(range(group * n, group * n + n)) - set(rnd.contributions)) if n else "unknown"
    return refusal(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"shard {shard}: group {group} step {rnd.step} is incomplete after {head.wait_s:.1f} s: "
        f"{rnd.workers} of {rnd.workers_per_group} workers reported (processes {sorted(rnd.contributions)}); "
        f"missing processes: {missing}",
    )


def training(groups: Mapping[int, GroupState]) -> str:
    """Why new slices can no longer be put ('' while they can): every Update carries
    every slice the shard holds, so a slice added once a step is open or done
    could never be added up with the others."""
    for group, state in sorted(groups.items()):
        if state.round is not None:
            return f"group {group} has step {state.round.step} open"
        if state.step:
            return f"group {group} has completed {state.step} steps"
    return ""


def check_put(
    shard: int,
    values: Mapping[SliceKey, jax.Array],
    specs: Mapping[SliceKey, tuple[np.dtype, tuple[int, ...]]],
    arrays: Mapping[SliceKey, np.ndarray],
    groups: Mapping[int, GroupState],
) -> dict[SliceKey, np.ndarray]:
    """The slices of a Put that are new to the shard. A retried Put of identical
    values is acknowledged; a different value for a held slice is ALREADY_EXISTS, a
    value that is not finite INVALID_ARGUMENT, a new slice once a step is open or
    done FAILED_PRECONDITION."""
    new = {}
    for key, value in arrays.items():
        if key in values:
            same = specs[key] == (value.dtype, value.shape) and np.array_equal(np.asarray(values[key]), value)
            if not same:
                raise refusal(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"shard {shard} already holds {slice_name(key)} with other values: "
                    "a parameter is put once, by its owner",
                )
            continue
        if not np.isfinite(value).all():
            raise refusal(grpc.StatusCode.INVALID_ARGUMENT, f"initial value of {slice_name(key)} is not finite")
        new[key] = value
    busy = training(groups) if new else ""
    if busy:
        raise refusal(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"shard {shard} is already training ({busy}): slices can only be put before the "
            f"first update, and {slice_name(next(iter(new)))} is new; every owner puts its parameters "
            "before any worker updates (restart the job to add parameters)",
        )
    return new


def fingerprint_of(job: str) -> str:
    """The fingerprint of a job identity ('' for none); INVALID_ARGUMENT for one
    that is not an identity."""
    if not job:
        return ""
    try:
        fingerprint = json.loads(job)["fingerprint"]
    except (ValueError, TypeError, KeyError, RecursionError):
        raise refusal(grpc.StatusCode.INVALID_ARGUMENT, "the Put's job is not a psfw job identity (JSON)") from None
    if not isinstance(fingerprint, str) or not fingerprint:
        raise refusal(grpc.StatusCode.INVALID_ARGUMENT, "the Put's job identity has no fingerprint")
    return fingerprint


def parse_spec(optimizer: str) -> Any:
    """An optimizer spec's JSON; INVALID_ARGUMENT for one that is not JSON."""
    try:
        return json.loads(optimizer)
    except (ValueError, RecursionError) as err:
        raise refusal(grpc.StatusCode.INVALID_ARGUMENT, f"the Put's optimizer spec is not JSON: {err}") from None


def same_form(new: Any, old: Any) -> bool:
    """Whether two optimizer states have the same tree, shapes and dtypes."""

    def forms(tree: Any) -> list[tuple[tuple[int, ...], np.dtype]]:
        return [(tuple(x.shape), np.dtype(x.dtype)) for x in jax.tree.leaves(tree)]

    return jax.tree.structure(new) == jax.tree.structure(old) and forms(new) == forms(old)
