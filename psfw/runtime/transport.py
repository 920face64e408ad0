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

    async def put(self, items: Items, optimizer: str, job: str = "", tables: str = "") -> int:
        """Store initial values; the first Put fixes the shard's optimizer (JSON spec)
        and job (its identity, JSON), the first that declares them the job's
        embedding tables (JSON). Returns the slices (and tables) stored."""
        ...

    async def get(self, header: GetHeader, expect: Expect, into: dict[SliceKey, np.ndarray] | None = None) -> Fresh:
        """The values (and table rows) ``header`` asks for, once its group has
        completed its step, written into ``into`` where it has the slice."""
        ...

    async def update(
        self,
        header: UpdateHeader,
        grads: Gradients,
        expect: Expect,
        into: dict[SliceKey, np.ndarray] | None = None,
    ) -> Fresh:
        """One process's gradient sums of a step for every slice the shard holds
        (and its table rows, ``header.push``); returns the fresh values (written into
        ``into`` where it has the slice) and the rows of ``header.pull``."""
        ...

    async def describe(self) -> pb.DescribeReply: ...

    async def restore(self, step: int, epoch: int) -> None:
        """Roll the shard back to its complete checkpoint of ``step``, at ``epoch``."""
        ...

    async def close(self) -> None: ...
