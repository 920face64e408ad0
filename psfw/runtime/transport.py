"""The seam between a stub and one shard: a ``Transport`` and ``connect``.

Two implementations speak the same verbs (put, get, update, describe, restore,
close); an embedding table's rows ride on get and update (``pull``, ``push``):

- ``InProcessClient`` (``psfw.runtime.inprocess``): the shard runs in this very
  process; its store is called directly, no bytes are made;
- ``ShardClient`` (``psfw.runtime.shard_client``): anywhere; Put, Get and Update over
  the shard's link (a Unix socket on this host, TCP elsewhere) where it offers one,
  else gRPC. On this host an Update's tensors lie in the process's shared-memory
  region (``psfw.runtime.step_region``) instead of its messages.

What differs between them that a caller must know is declared in ``Capabilities``;
nothing outside a transport tests which one it is. ``psfw.runtime.connect`` picks one
per shard, once, and says which.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from psfw.protocol.layout import SliceKey
from psfw.protocol.messages import Fresh, GetHeader, Gradients, UpdateHeader

if TYPE_CHECKING:
    from psfw.proto import ps_pb2 as pb
    from psfw.protocol.wire import Expect

Items = Iterable[tuple[str, int, np.ndarray]]  # (parameter, slice index, values)


@dataclass(frozen=True)
class Capabilities:
    """What a transport does that its callers must know.

    ``fuses_sum``: an Update may carry a process's workers' gradients of a slice as
    they are (a tuple of arrays): the shard adds them up inside its own update (no
    sum on the way). ``shares_arrays``: answers are the shard's own immutable arrays,
    handed over as they are (never written into the caller's buffers)."""

    fuses_sum: bool = False
    shares_arrays: bool = False


class StepBuffers(Protocol):
    """Where a stub's steps should put their tensors for a transport (a shared
    region, say): whole parameters, by name."""

    def gradients(self) -> dict[str, np.ndarray]:
        """Where a step's gradient sums go."""
        ...

    def values(self, step: int) -> tuple[dict[str, np.ndarray], dict[SliceKey, np.ndarray]]:
        """Where the answer to the Update of ``step`` goes (and each slice's flat
        view in it): written over by the answer to the Update of ``step + 2``."""
        ...


class Transport(Protocol):
    """One shard, as a stub sees it. Every method raises ShardError naming the
    shard and the verb; UNAVAILABLE is retried inside a transport, as it can be."""

    shard: int
    address: str
    kind: str  # for people: "in-process", "link (unix, shared memory)", "grpc"...
    capabilities: Capabilities
    step_buffers: StepBuffers | None  # None: the stub's tensors may be anywhere
    pipelines: bool  # an Update may be answered slice by slice while it is sent (UpdateHeader.pipelined)

    async def put(self, items: Items, optimizer: str, job: str = "", tables: str = "") -> int:
        """Store initial values.

        Args:
            items: ``(parameter, slice index, values)`` for each slice to store.
            optimizer: the shard's optimizer as a JSON spec (fixed by the first Put).
            job: the job's identity, JSON (fixed by the first Put; '' names none).
            tables: the job's embedding tables, JSON (fixed by the first Put that
                declares them).

        Returns:
            How many slices (and tables) the shard stored.
        """
        ...

    async def get(self, header: GetHeader, expect: Expect, into: dict[SliceKey, np.ndarray] | None = None) -> Fresh:
        """The values (and table rows) ``header`` asks for, once its group has
        completed its step.

        Args:
            header: what is wanted (``GetHeader``: group, step, slices, wait...).
            expect: ``expect(key)`` gives the dtype and shape the caller holds for a
                slice (an answer that disagrees is refused).
            into: arrays to write each slice's values into, where the caller has
                one (others come as new arrays).

        Returns:
            ``Fresh``: the group's completed steps the values reflect, the values by
            slice, and the table rows pulled.
        """
        ...

    async def update(
        self,
        header: UpdateHeader,
        grads: Gradients,
        expect: Expect,
        into: dict[SliceKey, np.ndarray] | None = None,
    ) -> Fresh:
        """Send one process's gradient sums of a step.

        Args:
            header: the group, step, process, rows and the rest (``UpdateHeader``;
                its ``push`` and ``pull`` carry table rows).
            grads: the gradient sums by slice, for every slice the shard holds.
            expect: as for ``get``.
            into: as for ``get``: where the fresh values go.

        Returns:
            ``Fresh``: the fresh values once the whole group has reported, the
            slowest group's step, the group's metrics and rows, the table rows of
            ``header.pull``.
        """
        ...

    async def describe(self) -> pb.DescribeReply:
        """The shard as it is now: its index, slices, versions, groups, tables and
        where its link listens (``ps.proto``'s DescribeReply)."""
        ...

    async def restore(self, step: int, epoch: int) -> None:
        """Roll the shard back to its complete checkpoint of ``step``, at ``epoch``."""
        ...

    async def close(self) -> None:
        """Close the connections (a transport is not used after)."""
        ...
