"""The in-process transport: the shard runs in this very process.

The embedded default has its shards, stubs and workers in one process; there the
stub calls the shard's store directly: no serialization, no sockets; an Update is
answered with the shard's own immutable arrays, and the stub's one jitted call puts
whole parameters together from them (the only copy). Each slice passes the checks a
received one passes (``psfw.protocol.wire.check_slice``), then the store's own; the
calls go through the shard's request core (``served``): counted, timed and refused
in the same words as over gRPC or the link.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol, TypeVar

import numpy as np

from psfw.base.errors import ShardError, WireError
from psfw.proto import ps_pb2 as pb
from psfw.protocol.layout import SliceKey
from psfw.protocol.messages import Fresh, GetHeader, Gradients, UpdateHeader
from psfw.protocol.row_wire import as_ids, as_rows
from psfw.protocol.wire import Expect, check_slice
from psfw.runtime.transport import Capabilities

T = TypeVar("T")
INLINE_COPY_BYTES = 8 << 20


PEER = "this process"  # how a refusal is logged


class ShardHere(Protocol):
    """What the in-process transport needs of a shard that runs in this process
    (``psfw.services.server.ShardServer``, handed in by the trainer)."""

    address: str
    store: Any  # the shard's ShardStore: put, read, update, restore, expect
    requests: Any  # the shard's request core: ``served`` counts, times and logs a call as every carrier's

    def description(self) -> pb.DescribeReply:
        """The Describe answer of the shard as it is now."""


class InProcessClient:
    """A ``Transport`` that calls a shard's store directly, through the same checks
    and counts as the shard's other carriers."""

    kind = "in-process"
    # the workers' parts are added inside the shard's jitted update, and the answer
    # is the shard's own immutable arrays
    capabilities = Capabilities(fuses_sum=True, shares_arrays=True)
    step_buffers = None
    pipelines = False  # a call hands the whole Update over at once

    def __init__(self, here: ShardHere, shard: int, timeout_s: float = 60.0):
        self.here, self.store, self.shard = here, here.store, shard
        self.address, self.timeout_s = here.address, timeout_s

    async def close(self) -> None:
        return None

    async def _call(self, rpc: str, call: Callable[[], Awaitable[T]]) -> T:
        try:
            async with self.here.requests.served(rpc, lambda: PEER):
                return await call()
        except WireError as err:
            raise ShardError(
                f"shard {self.shard} (in-process) {rpc}: {err.code.name}: {err.message}", err.code, err.reason
            ) from None

    def _checked(self, items: Iterable[tuple[str, int, np.ndarray | tuple]], known: bool) -> dict[SliceKey, object]:
        """Check each slice as the wire's receiver does (``check_slice``); a tuple of
        arrays (the workers' parts of one process's sum) stays a tuple: the shard
        adds the parts up itself."""
        expect = self.store.expect if known else None
        arrays: dict[SliceKey, object] = {}
        for key, index, value in items:
            parts = tuple(np.asarray(p) for p in value) if isinstance(value, tuple) else (np.asarray(value),)
            for array in parts:
                check_slice((key, index), array.dtype.name, array.shape, expect)
            arrays[(key, index)] = parts if isinstance(value, tuple) else parts[0]
        return arrays

    async def put(self, items, optimizer: str, job: str = "", tables: str = "") -> int:
        async def put():
            return await self.store.put(self._checked(items, known=False), optimizer, job=job, tables=tables)

        return await self._call("Put", put)

    async def get(self, header: GetHeader, expect: Expect, into: dict[SliceKey, np.ndarray] | None = None) -> Fresh:
        async def get():
            h = header
            wanted = as_ids(h.pull)
            done, values, rows = await self.store.read(
                list(h.keys), h.group, h.step, h.wait_s, h.wait_for_put, h.job, wanted
            )
            return Fresh(done, await _deliver(values, into), table_rows=rows)

        return await self._call("Get", get)

    async def update(
        self, header: UpdateHeader, grads: Gradients, expect: Expect, into: dict[SliceKey, np.ndarray] | None = None
    ) -> Fresh:
        items = [(key, index, value) for (key, index), value in grads.items()]

        async def update():
            # table rows as the wire would deliver them (int64 ids, float32 rows)
            head = dataclasses.replace(header, push=as_rows(header.push), pull=as_ids(header.pull))
            result = await self.store.update(head, self._checked(items, known=True))
            values = await _deliver(result.values, into)
            return Fresh(
                result.step,
                values,
                result.slowest_step,
                dict(result.metrics),
                result.rows,
                result.table_rows,
                result.stop_at,
            )

        return await self._call("Update", update)

    async def describe(self) -> pb.DescribeReply:
        return await self._call("Describe", self.here.requests.describe)

    async def restore(self, step: int, epoch: int) -> None:
        await self._call("Restore", lambda: self.here.requests.restore(step, epoch))


async def _deliver(values: dict, into: dict | None) -> dict[SliceKey, np.ndarray]:
    """The shard's (immutable) values, copied into the caller's buffers where it
    has them (in a thread unless they are small); other slices are handed over as
    they are. With ``into`` None: the shard's own arrays as they are (they never
    change; a caller that keeps them copies them: the stub, with one jitted call)."""
    if into is None:
        return dict(values)
    if not into:
        return {k: np.asarray(v) for k, v in values.items()}

    def copy() -> dict[SliceKey, np.ndarray]:
        out = {}
        for key, value in values.items():
            target = into.get(key)
            if target is None:
                out[key] = np.asarray(value)
            else:
                np.copyto(target, np.asarray(value).reshape(target.shape))
                out[key] = target
        return out

    if sum(np.asarray(v).nbytes for v in values.values()) <= INLINE_COPY_BYTES:
        return copy()  # a millisecond or less: cheaper than a hop to a thread and back
    return await asyncio.to_thread(copy)
