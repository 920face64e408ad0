"""One gRPC channel to one shard, with the three verbs put, get and update.

Every RPC has a deadline; UNAVAILABLE is retried with exponential backoff and jitter
up to ``retries`` times (a retried Update is safe: the shard adds a contribution once).
Failures surface as ShardError naming the shard, the RPC and the server's message.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import grpc
import numpy as np

from psfw.errors import ShardError
from psfw.layout import SliceKey
from psfw.proto import ps_pb2 as pb
from psfw.proto import ps_pb2_grpc as pb_grpc
from psfw.services.server import grpc_options
from psfw.wire import CHUNK_BYTES, Assembler, Expect, encode_chunks

T = TypeVar("T")
Items = Iterable[tuple[str, int, np.ndarray]]
RPC_MARGIN_S = 10.0  # the client's deadline exceeds the shard's own wait by this much


class ShardClient:
    def __init__(
        self,
        address: str,
        shard: int,
        *,
        timeout_s: float = 60.0,
        retries: int = 5,
        chunk_bytes: int = CHUNK_BYTES,
    ):
        self.address, self.shard = address, shard
        self.timeout_s, self.retries, self.chunk_bytes = timeout_s, retries, chunk_bytes
        self.channel = grpc.aio.insecure_channel(address, options=grpc_options())
        self._stub = pb_grpc.ParameterServerStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def _call(self, rpc: str, attempt: Callable[[], Awaitable[T]]) -> T:
        delay = 0.05
        for tries in range(self.retries + 1):
            try:
                return await attempt()
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.UNAVAILABLE and tries < self.retries:
                    await asyncio.sleep(delay * (0.5 + random.random()))
                    delay = min(delay * 2, 2.0)
                    continue
                raise ShardError(
                    f"shard {self.shard} ({self.address}) {rpc}: {err.code().name}: {err.details()}", err.code()
                ) from None
        raise AssertionError("unreachable")

    async def put(self, items: Items, optimizer: str) -> int:
        """Store initial values; the shard's optimizer is fixed by its first Put."""
        items = list(items)

        def requests():
            for i, chunks in enumerate(encode_chunks(items, self.chunk_bytes)):
                yield pb.PutRequest(optimizer=optimizer if i == 0 else "", chunks=chunks)

        async def attempt():
            return (await self._stub.Put(requests(), timeout=self.timeout_s)).slices

        return await self._call("Put", attempt)

    async def get(
        self, group: int, step: int, keys: list[SliceKey], expect: Expect, wait_s: float
    ) -> tuple[int, dict[SliceKey, np.ndarray]]:
        """Values of ``keys`` once ``group`` has completed ``step`` steps."""
        request = pb.GetRequest(
            group=group, step=step, slices=[pb.SliceRef(key=k, slice=i) for k, i in keys], wait_s=wait_s
        )

        async def attempt():
            assembler, step_seen = Assembler(expect), step
            async for reply in self._stub.Get(request, timeout=wait_s + RPC_MARGIN_S):
                step_seen = reply.step
                for chunk in reply.chunks:
                    assembler.add(chunk)
            return step_seen, assembler.finish()

        return await self._call("Get", attempt)

    async def update(
        self,
        *,
        group: int,
        step: int,
        process: int,
        workers: int,
        rows: int,
        workers_per_group: int,
        items: Items,
        expect: Expect,
        wait_s: float,
    ) -> tuple[int, dict[SliceKey, np.ndarray]]:
        """Send one process's gradient sums for a step; returns the fresh values."""
        items = list(items)

        def requests():
            for i, chunks in enumerate(encode_chunks(items, self.chunk_bytes)):
                if i == 0:
                    yield pb.UpdateRequest(
                        group=group,
                        step=step,
                        process=process,
                        workers=workers,
                        rows=rows,
                        workers_per_group=workers_per_group,
                        wait_s=wait_s,
                        chunks=chunks,
                    )
                else:
                    yield pb.UpdateRequest(chunks=chunks)

        async def attempt():
            assembler, new_step = Assembler(expect), step
            async for reply in self._stub.Update(requests(), timeout=wait_s + RPC_MARGIN_S):
                new_step = reply.step
                for chunk in reply.chunks:
                    assembler.add(chunk)
            return new_step, assembler.finish()

        return await self._call("Update", attempt)

    async def describe(self) -> pb.DescribeReply:
        return await self._call("Describe", lambda: self._stub.Describe(pb.DescribeRequest(), timeout=self.timeout_s))
