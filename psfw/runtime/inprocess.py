"""The in-process transport: the shard runs in this very process.

The embedded default has its shards, stubs and workers in one process; there the
stub calls the shard's store directly: no serialization, no sockets; an Update is
answered with the shard's own immutable arrays, and the stub's one jitted call puts
whole parameters together from them (the only copy). Requests are checked exactly as
the servicer checks them (the store's own validation), errors are the same
ShardErrors, and RPCs are counted alike.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterable
from typing import Any, Protocol

import grpc
import numpy as np

from psfw.base.errors import ShardError, WireError
from psfw.proto import ps_pb2 as pb
from psfw.protocol.layout import SliceKey
from psfw.protocol.messages import Fresh, Gradients, UpdateHeader
from psfw.protocol.row_wire import as_ids, as_rows
from psfw.protocol.wire import Expect, slice_name, wire_dtype
from psfw.runtime.transport import Capabilities

INLINE_COPY_BYTES = 8 << 20


class LocalShard(Protocol):
    """What the in-process transport needs of a shard that runs in this process
    (``psfw.services.server.ShardServer``, handed in by the trainer)."""

    address: str
    store: Any  # the shard's ShardStore: put, read, update, restore, expect

    def count(self, rpc: str) -> None:
        """Count an RPC as the gRPC service counts its own."""

    def description(self) -> pb.DescribeReply:
        """The Describe answer of the shard as it is now."""


class InProcessClient:
    """A ``Transport`` that calls a shard's store directly."""

    kind = "in-process"
    # the workers' parts are added inside the shard's jitted update, and the answer
    # is the shard's own immutable arrays
    capabilities = Capabilities(fuses_sum=True, shares_arrays=True)
    step_buffers = None

    def __init__(self, local: LocalShard, shard: int, timeout_s: float = 60.0):
        self.local, self.store, self.shard = local, local.store, shard
        self.address, self.timeout_s = local.address, timeout_s

    async def close(self) -> None:
        return None

    async def _call(self, rpc: str, coroutine):
        self.local.count(rpc)
        try:
            return await coroutine
        except WireError as err:
            raise ShardError(
                f"shard {self.shard} (in-process) {rpc}: {err.code.name}: {err.message}", err.code, err.reason
            ) from None

    def _checked(self, items: Iterable[tuple[str, int, np.ndarray | tuple]], known: bool) -> dict[SliceKey, object]:
        """Validate like the servicer does; a tuple of arrays (the workers' parts of
        one process's sum) stays a tuple: the shard adds the parts up itself."""
        arrays: dict[SliceKey, object] = {}
        for key, index, value in items:
            parts = tuple(np.asarray(p) for p in value) if isinstance(value, tuple) else (np.asarray(value),)
            want = self.store.expect((key, index)) if known else None
            for array in parts:
                if want is not None and array.dtype == want[0] and array.shape == tuple(want[1]):
                    continue  # a held slice's dtype is one the wire takes
                wire_dtype(array.dtype.name)  # the dtypes the wire takes
                if want is not None:
                    raise WireError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"{slice_name((key, index))} is {want[0].name}{list(want[1])}, "
                        f"the request sent {array.dtype.name}{list(array.shape)}",
                    )
            arrays[(key, index)] = parts if isinstance(value, tuple) else parts[0]
        return arrays

    async def put(self, items, optimizer: str, job: str = "", tables: str = "") -> int:
        async def put():
            return await self.store.put(self._checked(items, known=False), optimizer, job=job, tables=tables)

        return await self._call("Put", put())

    async def get(self, group, step, keys, expect, wait_s, into=None, wait_for_put=False, job="", pull=None) -> Fresh:
        async def get():
            wanted = as_ids(pull or {})
            done, values, rows = await self.store.read(list(keys), group, step, wait_s, wait_for_put, job, wanted)
            return Fresh(done, await _deliver(values, into), table_rows=rows)

        return await self._call("Get", get())

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

        return await self._call("Update", update())

    async def describe(self) -> pb.DescribeReply:
        self.local.count("Describe")
        return self.local.description()

    async def restore(self, step: int, epoch: int) -> None:
        await self._call("Restore", self.store.restore(step, epoch))


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
