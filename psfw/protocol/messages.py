"""What a stub and a shard say to each other, whatever carries it.

Value types built once by the stub and read by the shard; protobuf appears only where
they become messages (``psfw.protocol.calls`` and ``psfw.protocol.wire``), whichever
carrier then takes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from psfw.protocol.layout import SliceKey


class RowBlock(NamedTuple):
    """Rows of one embedding table: sorted unique int64 ``ids`` and float32
    ``values`` ``[len(ids), dim]`` (their values, or their gradient sums)."""

    ids: np.ndarray
    values: np.ndarray


TableRows = Mapping[str, RowBlock]  # by table
TableIds = Mapping[str, np.ndarray]  # rows wanted, by table: sorted unique int64 ids
Parts = tuple[np.ndarray, ...]  # one process's workers' gradients of a slice, not added up yet
Gradients = Mapping[SliceKey, np.ndarray | Parts]  # a process's contribution to one shard, by slice


@dataclass(frozen=True, slots=True)
class UpdateHeader:
    """One worker process's Update of one group step, its gradients aside: what a
    ``Transport.update`` sends with them. Built once per worker process and
    replaced per step (``dataclasses.replace``); protobuf only at the gRPC edge.

    Attributes:
        group, step, process: whose contribution to which step (a shard adds it once).
        workers: how many of the group's ``workers_per_group`` workers it sums.
        rows: the rows its workers' gradients were summed over (the shard divides
            the group's sum by the group's rows).
        workers_per_group: the group's workers (the step completes when they reported).
        worker_groups: the job's groups.
        staleness: >= 0 bounds how far the group may run ahead of the slowest
            group (-1: unbounded).
        group_processes: the group's worker processes (named in a wait that runs out).
        epoch: the shards' restore count the stub is synced to.
        checkpoint_every: group 0's steps between checkpoints (0: none).
        metrics: the worker process's metrics, each x rows.
        job: the job's fingerprint ('' names none).
        wait_s: how long the shard may wait for the rest of the group.
        push: the worker process's gradient sums of table rows (x rows, as the
            slices').
        pull: the table rows the worker process wants after this step (the next
            step's), answered with the update.
        stop_at: an early end of the job: groups stop once they completed this
            many steps (0: none).
        group_timeout_s: a group that sent no Update for this long is gone: it
            no longer bounds the staleness (0: never).
        max_groups: the groups that may train: 0 as many as ``worker_groups``
            (none joins), -1 any number.
        pipelined: the shard may answer each slice as soon as the group's slice
            is complete, while the rest still arrives (``psfw.services.parts``).
    """

    group: int
    step: int
    process: int
    workers: int
    rows: int
    workers_per_group: int
    worker_groups: int = 1
    staleness: int = -1
    group_processes: int = 0
    epoch: int = 0
    checkpoint_every: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)
    job: str = ""
    wait_s: float = 60.0
    push: TableRows = field(default_factory=dict)
    pull: TableIds = field(default_factory=dict)
    stop_at: int = 0
    group_timeout_s: float = 0.0
    max_groups: int = 0
    pipelined: bool = False


@dataclass(frozen=True, slots=True)
class GetHeader:
    """One Get: the values of ``keys`` once ``group`` has completed ``step`` steps.

    ``wait_s``: how long the shard may wait for the group to get there;
    ``wait_for_put``: also wait for slices not put yet (a worker that starts before
    their owner); ``job``: the job's fingerprint (a shard of another job refuses; ''
    names none); ``pull``: table rows wanted too (``keys`` empty then means no slices).
    """

    group: int
    step: int
    keys: list[SliceKey]
    wait_s: float = 60.0
    wait_for_put: bool = False
    job: str = ""
    pull: TableIds = field(default_factory=dict)


class Fresh(NamedTuple):
    """Values a shard answered with."""

    step: int  # the group's completed steps they reflect
    values: dict[SliceKey, np.ndarray]
    slowest_step: int = 0  # Update only: the slowest group's completed steps
    metrics: dict[str, float] = {}  # Update only: the whole group's metrics of the step, x rows
    rows: int = 0  # Update only: the group's rows of the step
    table_rows: dict[str, RowBlock] = {}  # the table rows pulled, by table
    stop_at: int = 0  # Update only: the early end of the job the shard knows of (0: none)
