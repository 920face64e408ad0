"""One gRPC channel to one shard, with the three verbs put, get and update.

Every RPC has a deadline; UNAVAILABLE and deadlines gRPC ran out of are retried with
exponential backoff and jitter up to ``retries`` times (a retried Update is safe: the
shard adds a contribution once).
Failures surface as ShardError naming the shard, the RPC and the server's message.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import NamedTuple, TypeVar

import grpc
import numpy as np

from psfw.proto import ps_pb2 as pb
from psfw.proto import ps_pb2_grpc as pb_grpc
from psfw.protocol.errors import ShardError
from psfw.protocol.layout import SliceKey
from psfw.protocol.security import NO_SECURITY, Link, Security, link_problem
from psfw.protocol.shm import Region, host_id, slot_layout
from psfw.protocol.wire import (
    CHUNK_BYTES,
    Assembler,
    Expect,
    Frame,
    WireError,
    batched,
    encode_chunks,
    encoded_ahead,
    frame_deserializer,
    frame_serializer,
)
from psfw.services.server import SERVICE_NAME, grpc_options

T = TypeVar("T")
Items = Iterable[tuple[str, int, np.ndarray]]
RPC_MARGIN_S = 10.0
log = logging.getLogger(
    "psfw.runtime.grpc_transport"
)  # the client's deadline exceeds the shard's own wait by this much


UPDATE_REQUEST = frame_serializer(pb.UpdateRequest)
REPORT_EVERY_S = 5.0  # while a shard cannot be reached, say so this often
# a shard that closes this many new connections in a row at once, over at least this
# long, refuses our TLS handshake (a restarting shard refuses connections instead; a
# proxy in front of one may close them too, hence a few seconds: gRPC also repeats
# one connection's error to every call until it tries again)
CLOSED_IN_A_ROW, CLOSED_FOR_S = 3, 5.0


def _transient(err: grpc.aio.AioRpcError) -> bool:
    """UNAVAILABLE, or a deadline that gRPC itself ran out of (a shard's own waits
    end in DEADLINE_EXCEEDED too, but name the shard: those are answers, not losses)."""
    if err.code() == grpc.StatusCode.UNAVAILABLE:
        return True
    return err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and not (err.details() or "").startswith("shard ")


def _sum_into(out: np.ndarray | None, parts: tuple[np.ndarray, ...]) -> np.ndarray:
    """Add ``parts`` up into ``out`` (a new array when None)."""
    if out is None:
        out = np.add(parts[0], parts[1]) if len(parts) > 1 else parts[0]
        rest = parts[2:]
    elif len(parts) == 1:
        np.copyto(out, parts[0])
        return out
    else:
        np.add(parts[0], parts[1], out=out)
        rest = parts[2:]
    for part in rest:
        np.add(out, part, out=out)
    return out


class Fresh(NamedTuple):
    """Values a shard answered with."""

    step: int  # the group's completed steps they reflect
    values: dict[SliceKey, np.ndarray]
    slowest_step: int = 0  # Update only: the slowest group's completed steps
    metrics: dict[str, float] = {}  # Update only: the whole group's metrics of the step, x rows
    rows: int = 0  # Update only: the group's rows of the step


def _assemble(frames: list[Frame], expect: Expect, into) -> Fresh:
    assembler = Assembler(expect, into=into)
    head = None
    for frame in frames:
        head = assembler.add_frame(frame)
    values = assembler.finish()
    if head is None:
        raise WireError(grpc.StatusCode.INTERNAL, "the shard answered with no message")
    return _fresh(head, values)


def _fresh(head, values: dict[SliceKey, np.ndarray]) -> Fresh:
    if isinstance(head, pb.UpdateReply):
        return Fresh(head.step, values, head.slowest_step, dict(head.metrics), head.rows)
    return Fresh(head.step, values)


PIPELINE_BYTES = 4 << 20  # the request is summed and encoded this much at a time


async def _pipelined(items: list, head: pb.UpdateRequest, chunk_bytes: int) -> AsyncIterator[bytes]:
    """The Update's messages, summed and encoded in a thread a batch of slices at a
    time, the next batch while gRPC sends this one: the early slices travel while
    later ones are still being added up."""

    def nbytes(item) -> int:
        value = item[2]
        return (value[0] if isinstance(value, tuple) else value).nbytes

    def encode(batch: list, index: int) -> list[bytes]:
        summed = [(k, i, _sum_into(None, v) if isinstance(v, tuple) else v) for k, i, v in batch]
        chunked = list(encode_chunks(summed, chunk_bytes)) or ([[]] if index == 0 else [])  # the header, always
        return [
            UPDATE_REQUEST(Frame(head if index == n == 0 else pb.UpdateRequest(), c)) for n, c in enumerate(chunked)
        ]

    async for message in encoded_ahead(batched(items, nbytes, PIPELINE_BYTES), encode):
        yield message


class ShardClient:
    def __init__(
        self,
        address: str,
        shard: int,
        *,
        timeout_s: float = 60.0,
        retries: int = 5,
        chunk_bytes: int = CHUNK_BYTES,
        security: Security = NO_SECURITY,
    ):
        self.address, self.shard = address, shard
        self.timeout_s, self.retries, self.chunk_bytes = timeout_s, retries, chunk_bytes
        self.security = security
        self.channel = security.channel(address, grpc_options())
        self._down_since: float | None = None  # since when the shard cannot be reached
        self._said = 0.0  # when that was last said
        self._closed = 0  # connections it closed at once, in a row
        self._md = security.metadata()
        self._shm: Region | None = None
        self._offsets: dict[SliceKey, int] = {}
        self._stub = pb_grpc.ParameterServerStub(self.channel)
        method = f"/{SERVICE_NAME}/"
        self._put = self.channel.stream_unary(
            method + "Put",
            request_serializer=frame_serializer(pb.PutRequest),
            response_deserializer=pb.PutReply.FromString,
        )
        self._get = self.channel.unary_stream(
            method + "Get",
            request_serializer=pb.GetRequest.SerializeToString,
            response_deserializer=frame_deserializer(pb.GetReply),
        )
        self._update = self.channel.stream_stream(
            method + "Update",
            request_serializer=frame_serializer(pb.UpdateRequest),
            response_deserializer=frame_deserializer(pb.UpdateReply),
        )
        # the same method for an Update of one message (through shared memory): called
        # with a unary request, the message and the end of the stream leave together
        # (gRPC does not carry a method's cardinality on the wire)
        self._update_one = self.channel.unary_stream(
            method + "Update",
            request_serializer=frame_serializer(pb.UpdateRequest),
            response_deserializer=frame_deserializer(pb.UpdateReply),
        )

    @property
    def transport(self) -> str:
        return "shared-memory" if self._shm is not None else "grpc"

    async def use_shared_memory(self, specs: list[tuple[SliceKey, np.dtype, tuple[int, ...]]]) -> bool:
        """Move tensors through shared memory from now on if the shard runs on this
        host (``specs``: the slices it holds); returns whether it does."""
        try:
            reply = await self.describe()
        except ShardError:
            return False  # not up yet: the network path works once it is
        if not reply.host or reply.host != host_id():
            return False
        self._offsets, area = slot_layout(specs)
        try:
            self._shm = Region.create(area)
        except OSError as err:
            log.warning("shard %d: no shared memory (%s); tensors go over the network", self.shard, err)
            return False
        return True

    def _drop_shared_memory(self, err: ShardError) -> bool:
        """The shard cannot map our region: go back to the network path."""
        if self._shm is None or err.code != grpc.StatusCode.FAILED_PRECONDITION or "shared-memory" not in str(err):
            return False
        log.warning("shard %d: %s; tensors go over the network from now on", self.shard, err)
        self._shm.close()
        self._shm = None
        return True

    def _from_region(self, keys, expect: Expect, into) -> dict[SliceKey, np.ndarray]:
        out = {}
        for key in keys:
            dtype, shape = expect(key)
            view = self._shm.view(True, self._offsets[key], dtype, shape)
            target = (into or {}).get(key)
            if target is None:
                out[key] = view.copy()
            else:
                np.copyto(target, view.reshape(target.shape))
                out[key] = target
        return out

    async def close(self) -> None:
        if self._shm is not None:
            self._shm.close()
            self._shm = None
        await self.channel.close()

    async def _call(self, rpc: str, attempt: Callable[[], Awaitable[T]]) -> T:
        delay = 0.05
        for tries in range(self.retries + 1):
            try:
                result = await attempt()
            except grpc.aio.AioRpcError as err:
                link = self._connection_failed(err)
                if _transient(err) and tries < self.retries:
                    await asyncio.sleep(delay * (0.5 + random.random()))
                    delay = min(delay * 2, 2.0)
                    continue
                said = f"cannot connect: {link.cause}" if link.kind else f"{err.code().name}: {err.details()}"
                raise ShardError(f"shard {self.shard} ({self.address}) {rpc}: {said}", err.code()) from None
            except WireError as err:
                raise ShardError(f"shard {self.shard} ({self.address}) {rpc}: bad reply: {err.message}") from None
            self._reached()
            return result
        raise AssertionError("unreachable")

    def _connection_failed(self, err: grpc.aio.AioRpcError) -> Link:
        """Read a failed RPC as news of the connection: a failed TLS handshake (or a
        shard that keeps closing connections at once) is a ShardError now, since
        retrying cannot fix it; a shard that cannot be reached is said every few
        seconds, with how long it has been and the client's patience."""
        link = link_problem(err.details() or "", self.security) if err.code() == grpc.StatusCode.UNAVAILABLE else None
        if link is None or not link.kind:
            self._closed = 0
            return link or Link("", "")
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
        self._closed = self._closed + 1 if link.kind == "closed" else 0
        persists = self._closed >= CLOSED_IN_A_ROW and now - self._down_since >= CLOSED_FOR_S
        if link.kind == "handshake" or persists:
            raise ShardError(
                f"shard {self.shard} at {self.address}: cannot connect: {link.cause}", grpc.StatusCode.UNAUTHENTICATED
            )
        waited = now - self._down_since
        if waited >= 1.0 and now - self._said >= REPORT_EVERY_S:
            self._said = now
            reason = link.cause if link.kind == "down" else "it closed the connection"
            log.warning(
                "waiting for shard %d at %s: %s, %.0f s of %.0f",
                self.shard,
                self.address,
                reason,
                waited,
                self.timeout_s,
            )
        return link

    def _reached(self) -> None:
        """The shard answered: say so if its absence was said."""
        if self._down_since is not None and self._said:
            log.warning(
                "shard %d at %s answered after %.0f s", self.shard, self.address, time.monotonic() - self._down_since
            )
        self._down_since, self._said, self._closed = None, 0.0, 0

    async def put(self, items: Items, optimizer: str, job: str = "") -> int:
        """Store initial values; the shard's optimizer and job (its identity, JSON)
        are fixed by its first Put."""
        items = list(items)

        def requests():
            for i, chunks in enumerate(encode_chunks(items, self.chunk_bytes)):
                yield Frame(pb.PutRequest(optimizer=optimizer, job=job) if i == 0 else pb.PutRequest(), chunks)

        async def attempt():
            return (await self._put(requests(), timeout=self.timeout_s, metadata=self._md)).slices

        return await self._call("Put", attempt)

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
        """Values of ``keys`` once ``group`` has completed ``step`` steps (written
        into ``into`` where it has the slice, see ``Assembler``). With
        ``wait_for_put`` the shard also waits for slices that are not put yet.
        ``job``: this job's fingerprint (a shard of another job refuses)."""
        request = pb.GetRequest(
            group=group,
            step=step,
            slices=[pb.SliceRef(key=k, slice=i) for k, i in keys],
            wait_s=wait_s,
            wait_for_put=wait_for_put,
            job=job,
        )

        async def attempt():
            frames = [f async for f in self._get(request, timeout=wait_s + RPC_MARGIN_S, metadata=self._md)]
            if not request.shm:
                return await asyncio.to_thread(_assemble, frames, expect, into)
            step = _assemble(frames, expect, None).step
            return Fresh(step, await asyncio.to_thread(self._from_region, keys, expect, into))

        if self._shm is not None:
            request.shm = self._shm.name
            try:
                return await self._call("Get", attempt)
            except ShardError as err:
                if not self._drop_shared_memory(err):
                    raise
                request.shm = ""
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
        worker_groups: int = 1,
        staleness: int = -1,
        group_processes: int = 0,
        epoch: int = 0,
        checkpoint_every: int = 0,
        metrics: dict[str, float] | None = None,
        job: str = "",
        items: Items,  # (key, slice, array), or (key, slice, tuple of arrays to add up)
        expect: Expect,
        wait_s: float,
        into: dict[SliceKey, np.ndarray] | None = None,
    ) -> Fresh:
        """Send one process's gradient sums for a step; returns the fresh values
        (written into ``into`` where it has the slice). ``staleness`` >= 0 bounds how
        far this group may run ahead of the slowest of ``worker_groups``."""
        items = list(items)
        head = pb.UpdateRequest(
            group=group,
            step=step,
            process=process,
            workers=workers,
            rows=rows,
            workers_per_group=workers_per_group,
            wait_s=wait_s,
            worker_groups=worker_groups,
            staleness=staleness,
            group_processes=group_processes,
            epoch=epoch,
            checkpoint_every=checkpoint_every,
            metrics=metrics or {},
            job=job,
        )

        def encode_shm() -> list[bytes]:
            for key, index, value in items:
                parts = value if isinstance(value, tuple) else (value,)
                view = self._shm.view(False, self._offsets[(key, index)], parts[0].dtype, parts[0].shape)
                _sum_into(view, parts)  # the workers' parts are added straight into the region
            shared = pb.UpdateRequest()
            shared.CopyFrom(head)
            shared.shm = self._shm.name
            return [UPDATE_REQUEST(Frame(shared, []))]

        async def send_shared(messages: list[bytes]) -> Fresh:
            call = self._update_one(messages[0], timeout=wait_s + RPC_MARGIN_S, metadata=self._md)
            reply = _assemble([f async for f in call], expect, None)
            keys = [(key, index) for key, index, _ in items]
            values = await asyncio.to_thread(self._from_region, keys, expect, into)
            return reply._replace(values=values)

        async def send_network() -> Fresh:
            call = self._update(
                _pipelined(items, head, self.chunk_bytes), timeout=wait_s + RPC_MARGIN_S, metadata=self._md
            )
            assembler = Assembler(expect, into=into)
            reply = None
            async for frame in call:  # each message is taken in as it arrives, while the next one travels
                reply = assembler.add_frame(frame)
            if reply is None:
                raise WireError(grpc.StatusCode.INTERNAL, "the shard answered with no message")
            return _fresh(reply, assembler.finish())

        if self._shm is not None:
            # the gradients go into the shared region, the message carries only its name
            messages = await asyncio.to_thread(encode_shm)
            try:
                return await self._call("Update", lambda: send_shared(messages))
            except ShardError as err:
                if not self._drop_shared_memory(err):
                    raise
        return await self._call("Update", send_network)

    async def restore(self, step: int, epoch: int) -> pb.RestoreReply:
        """Roll the shard back to its complete checkpoint of ``step``, at ``epoch``."""
        request = pb.RestoreRequest(step=step, epoch=epoch)
        return await self._call(
            "Restore", lambda: self._stub.Restore(request, timeout=self.timeout_s, metadata=self._md)
        )

    async def describe(self) -> pb.DescribeReply:
        return await self._call(
            "Describe", lambda: self._stub.Describe(pb.DescribeRequest(), timeout=self.timeout_s, metadata=self._md)
        )
