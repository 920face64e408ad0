"""The seam between a stub and one shard: a ``Transport`` and ``connect``.

Three implementations speak the same verbs (put, get, update, describe, restore,
close):

- ``InProcessClient`` (``psfw.runtime.inprocess``): the shard runs in this very
  process; its store is called directly, no bytes are made;
- ``SharedMemoryClient`` (``psfw.runtime.shm_transport``): the shard runs on this
  host; tensors go through a shared-memory region, the headers over gRPC;
- ``ShardClient`` (``psfw.runtime.grpc_transport``): anywhere, over gRPC.

What differs between them that a caller must know is declared in ``Capabilities``;
nothing outside a transport tests which one it is. ``connect`` picks one per shard,
once, and says which.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from psfw.protocol.layout import SliceKey
from psfw.protocol.messages import Fresh, Gradients, UpdateHeader
from psfw.protocol.security import NO_SECURITY, Security

if TYPE_CHECKING:
    from psfw.proto import ps_pb2 as pb
    from psfw.protocol.wire import Expect
    from psfw.runtime.inprocess import LocalShard

log = logging.getLogger("psfw")

Items = Iterable[tuple[str, int, np.ndarray]]  # (parameter, slice index, values)
SliceSpecs = list[tuple[SliceKey, np.dtype, tuple[int, ...]]]


@dataclass(frozen=True)
class Capabilities:
    """What a transport does that its callers must know.

    ``fuses_sum``: an Update may carry a process's workers' gradients of a slice as
    they are (a tuple of arrays): the shard adds them up inside its own update (no
    sum on the way). ``shares_arrays``: answers are the shard's own immutable arrays,
    handed over as they are (never written into the caller's buffers)."""

    fuses_sum: bool = False
    shares_arrays: bool = False


class Transport(Protocol):
    """One shard, as a stub sees it. Every method raises ShardError naming the
    shard and the verb; UNAVAILABLE is retried inside a transport, as it can be."""

    shard: int
    address: str
    kind: str  # for people: "in-process", "shared-memory", "grpc"
    capabilities: Capabilities

    async def put(self, items: Items, optimizer: str, job: str = "") -> int:
        """Store initial values; the first Put fixes the shard's optimizer (JSON spec)
        and job (its identity, JSON). Returns the slices stored."""
        ...

    async def get(
        self,
        group: int,
        step: int,
        keys: list[SliceKey],
        expect: Expect,
        wait_s: float,
        into: dict[SliceKey, np.ndarray] | None = None,
        wait_for_put: bool = False,
        job: str = "",
    ) -> Fresh:
        """Values of ``keys`` once ``group`` has completed ``step`` steps, written into
        ``into`` where it has the slice; ``wait_for_put``: also wait for slices not put
        yet; ``job``: the job's fingerprint (a shard of another job refuses)."""
        ...

    def gradient_buffers(self, slices: SliceSpecs) -> dict[SliceKey, np.ndarray] | None:
        """Where the caller should add up an Update's gradients of ``slices`` (a
        shared region, say), or None: anywhere."""
        ...

    async def update(
        self,
        header: UpdateHeader,
        grads: Gradients,
        expect: Expect,
        into: dict[SliceKey, np.ndarray] | None = None,
    ) -> Fresh:
        """One process's gradient sums of a step for every slice the shard holds;
        returns the fresh values (written into ``into`` where it has the slice)."""
        ...

    async def describe(self) -> pb.DescribeReply: ...

    async def restore(self, step: int, epoch: int) -> None:
        """Roll the shard back to its complete checkpoint of ``step``, at ``epoch``."""
        ...

    async def close(self) -> None: ...


async def connect(
    address: str,
    shard: int,
    *,
    timeout_s: float = 60.0,
    retries: int = 5,
    security: Security = NO_SECURITY,
    local: LocalShard | None = None,
    shared_memory: SliceSpecs | None = None,
) -> Transport:
    """A transport to the shard at ``address``: in-process when ``local`` (that
    shard, running in this process) is given; through shared memory when
    ``shared_memory`` (the slices the shard holds) is given and the shard runs on
    this host; else over gRPC."""
    if local is not None:
        from psfw.runtime.inprocess import InProcessClient

        return InProcessClient(local, shard, timeout_s)
    from psfw.runtime.grpc_transport import ShardClient

    client = ShardClient(address, shard, timeout_s=timeout_s, retries=retries, security=security)
    if shared_memory is not None:
        from psfw.runtime.shm_transport import SharedMemoryClient

        shared = await SharedMemoryClient.attach(client, shared_memory)
        if shared is not None:
            return shared
    return client


async def connect_all(
    addresses: list[str],
    *,
    who: str,
    local: Callable[[str], LocalShard | None] = lambda address: None,
    shard_slices: Callable[[int], SliceSpecs] | None = None,
    **options: Any,
) -> list[Transport]:
    """A transport per shard (see ``connect``); ``local``: the shard of an address
    that runs in this process, if any; ``shard_slices``: the slices a shard holds,
    to move them through shared memory where it can (None: never). Logs which
    transports ``who`` uses, once ('' : not at all)."""
    transports = []
    for i, address in enumerate(addresses):
        slices = shard_slices(i) if shard_slices is not None else None
        transports.append(await connect(address, i, local=local(address), shared_memory=slices, **options))
    if who:
        log.info("%s: %s", who, describe_transports(transports))
    return transports


def describe_transports(transports: list[Transport]) -> str:
    """How a stub reaches its shards, per kind: ``shards 0-1 in-process``."""
    by_kind: dict[str, list[int]] = {}
    for t in transports:
        by_kind.setdefault(t.kind, []).append(t.shard)
    return ", ".join(f"{shard_ranges(shards)} {kind}" for kind, shards in by_kind.items())


def shard_ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``shards 0-2, 5``; a scattered set is only counted, so the
    text stays short for any number of shards."""
    if len(indices) == 1:
        return f"shard {indices[0]}"
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    if len(runs) > 3:
        return f"{len(indices)} shards"
    return "shards " + ", ".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)
