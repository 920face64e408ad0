"""The put/get/update verbs for a shard that runs in this very process.

The embedded default has its shards, stubs and workers in one process; there the
stub calls the shard's store directly: no serialization, no sockets; an Update is
answered with the shard's own immutable arrays, and the stub's one jitted call puts
whole parameters together from them (the only copy). Requests are checked exactly as
the servicer checks them (the store's own validation), errors are the same
ShardErrors, and RPCs are counted alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import grpc
import numpy as np

from psfw.proto import ps_pb2 as pb
from psfw.protocol.errors import ShardError
from psfw.protocol.layout import SliceKey
from psfw.protocol.wire import WireError, slice_name, wire_dtype
from psfw.runtime.grpc_transport import Fresh
from psfw.services.server import ShardServer, in_process
from psfw.services.servicer import describe_store

INLINE_COPY_BYTES = 8 << 20


class LocalShardClient:
    """A ShardClient twin that calls an in-process ShardServer's store."""

    transport = "in-process"

    def __init__(self, server: ShardServer, shard: int, timeout_s: float = 60.0):
        self.server, self.store, self.shard = server, server.store, shard
        self.address, self.timeout_s = server.address, timeout_s

    async def close(self) -> None:
        return None

    async def _call(self, rpc: str, coroutine):
        self.server.servicer.rpc_counts[rpc] += 1
        try:
            return await coroutine
        except WireError as err:
            raise ShardError(
                f"shard {self.shard} (in-process) {rpc}: {err.code.name}: {err.message}", err.code
            ) from None

    def _checked(self, items: Iterable[tuple[str, int, np.ndarray | tuple]], known: bool) -> dict[SliceKey, object]:
        """Validate like the servicer does; a tuple of arrays (the workers' parts of
        one process's sum) stays a tuple: the shard adds the parts up itself."""
        arrays: dict[SliceKey, object] = {}
        for key, index, value in items:
            parts = tuple(np.asarray(p) for p in value) if isinstance(value, tuple) else (np.asarray(value),)
            for array in parts:
                wire_dtype(array.dtype.name)  # the dtypes the wire takes
                if known:
                    want_dtype, want_shape = self.store.expect((key, index))
                    if array.dtype != want_dtype or array.shape != tuple(want_shape):
                        raise WireError(
                            grpc.StatusCode.INVALID_ARGUMENT,
                            f"{slice_name((key, index))} is {want_dtype.name}{list(want_shape)}, "
                            f"the request sent {array.dtype.name}{list(array.shape)}",
                        )
            arrays[(key, index)] = parts if isinstance(value, tuple) else parts[0]
        return arrays

    async def put(self, items, optimizer: str, job: str = "") -> int:
        async def put():
            return await self.store.put(self._checked(items, known=False), optimizer, job=job)

        return await self._call("Put", put())

    async def get(self, group, step, keys, expect, wait_s, into=None, wait_for_put=False, job="") -> Fresh:
        async def get():
            done, values = await self.store.read(list(keys), group, step, wait_s, wait_for_put, job)
            return Fresh(done, await _deliver(values, into))

        return await self._call("Get", get())

    async def update(self, *, items, expect, wait_s, into=None, **header) -> Fresh:
        """ShardClient.update's verb; ``header`` are its keyword arguments (group,
        step, process, workers, rows, workers_per_group, ...): the Update's fields."""
        head = pb.UpdateRequest(wait_s=wait_s, **header)

        async def update():
            result = await self.store.update(head, self._checked(items, known=True), wait_s)
            values = await _deliver(result.values, into)
            return Fresh(result.step, values, result.slowest_step, dict(result.metrics), result.rows)

        return await self._call("Update", update())

    async def describe(self) -> pb.DescribeReply:
        self.server.servicer.rpc_counts["Describe"] += 1
        reply = describe_store(self.store)
        reply.rpc_counts.update(self.server.servicer.rpc_counts)
        return reply

    async def restore(self, step: int, epoch: int) -> pb.RestoreReply:
        await self._call("Restore", self.store.restore(step, epoch))
        return pb.RestoreReply(step=step, epoch=self.store.epoch)


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


def connect(address: str, shard: int, *, timeout_s: float, prefer_local: bool = True, **grpc_options):
    """A client for the shard at ``address``: in-process when that shard runs in this
    process (and ``prefer_local``), else over gRPC."""
    from psfw.runtime.grpc_transport import ShardClient

    server = in_process(address) if prefer_local else None
    if server is not None:
        return LocalShardClient(server, shard, timeout_s)
    return ShardClient(address, shard, timeout_s=timeout_s, **grpc_options)
