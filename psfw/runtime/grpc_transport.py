"""The network transport: one gRPC channel to one shard, tensors in the messages,
and the shard's data link for Put, Get and Update where it offers one.

Every RPC has a deadline; UNAVAILABLE and deadlines gRPC ran out of are retried with
exponential backoff and jitter up to ``retries`` times (a retried Update is safe: the
shard adds a contribution once).
Failures surface as ShardError naming the shard, the RPC and the server's message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TypeVar

import grpc
import numpy as np

from psfw.base.errors import Reason, ShardError, WireError
from psfw.base.security import NO_SECURITY, Link, Security, link_problem
from psfw.base.service import REASON_KEY, SERVICE_NAME, grpc_options
from psfw.proto import ps_pb2 as pb
from psfw.proto import ps_pb2_grpc as pb_grpc
from psfw.protocol.calls import (
    DECODE,
    PUT_PIECES,
    assemble,
    fresh_answer,
    get_request,
    pipelined_update,
    put_answer,
    put_frames,
    row_pieces_messages,
    shared_update_messages,
    update_messages,
)
from psfw.protocol.compression import COMPRESSIONS, ErrorFeedback
from psfw.protocol.frames import CHUNK_BYTES, Frame, frame_serializer
from psfw.protocol.layout import SliceKey
from psfw.protocol.messages import Fresh, Gradients, TableIds, UpdateHeader
from psfw.protocol.row_wire import RowCollector, row_messages
from psfw.protocol.wire import Assembler, Expect, update_request
from psfw.runtime.data_client import ShardLink
from psfw.runtime.transport import Capabilities, Items

T = TypeVar("T")
RPC_MARGIN_S = 10.0  # the client's deadline exceeds the shard's own wait by this much
log = logging.getLogger(__name__)


REPORT_EVERY_S = 5.0  # while a shard cannot be reached, say so this often
# a shard that closes this many new connections in a row at once, over at least this
# long, refuses our TLS handshake (a restarting shard refuses connections instead; a
# proxy in front of one may close them too, hence a few seconds: gRPC also repeats
# one connection's error to every call until it tries again)
CLOSED_IN_A_ROW, CLOSED_FOR_S = 3, 5.0


def reason_of(err: grpc.aio.AioRpcError) -> Reason:
    """The shard's reason code of a refusal (its ``psfw-reason`` trailing metadata)."""
    for key, value in err.trailing_metadata() or ():
        if key == REASON_KEY:
            try:
                return Reason(value)
            except ValueError:
                return Reason.NONE  # a newer shard's reason: none this client acts on
    return Reason.NONE


def _transient(err: grpc.aio.AioRpcError) -> bool:
    """UNAVAILABLE, or a deadline that gRPC itself ran out of (a shard's own waits
    end in DEADLINE_EXCEEDED too: those are answers, not losses)."""
    if err.code() == grpc.StatusCode.UNAVAILABLE:
        return True
    return err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and reason_of(err) != Reason.SHARD_WAIT


class ShardClient:
    """A shard over the network: a ``Transport`` (psfw.runtime.transport) that works
    wherever the shard runs. Put, Get and Update go over the shard's data link
    (``psfw.protocol.data_link``) where it offers one and ``data_link`` allows, else
    over gRPC, as everything else does. ``compression="bf16"``: an Update's float32
    gradients travel as bfloat16 with error feedback (``psfw.protocol.compression``)."""

    capabilities = Capabilities()
    step_buffers = None  # the gradients are encoded from wherever they are

    def __init__(
        self,
        address: str,
        shard: int,
        *,
        timeout_s: float = 60.0,
        retries: int = 5,
        chunk_bytes: int = CHUNK_BYTES,
        security: Security = NO_SECURITY,
        compression: str = "none",
        data_link: bool = True,
    ):
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression {compression!r}: use one of {', '.join(COMPRESSIONS)}")
        self.address, self.shard = address, shard
        self.compression = compression
        # never beside TLS: the link has no encryption, and a client that has credentials would not downgrade
        self._data = ShardLink(shard, address, security.token, data_link and security.channel_credentials() is None)
        self._feedback = ErrorFeedback() if compression == "bf16" else None
        self.timeout_s, self.retries, self.chunk_bytes = timeout_s, retries, chunk_bytes
        self.security = security
        self.channel = security.channel(address, grpc_options())
        self._down_since: float | None = None  # since when the shard cannot be reached
        self._said = 0.0  # when that was last said
        self._closed = 0  # connections it closed at once, in a row
        self._md = security.metadata()
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
            response_deserializer=DECODE["Get"],
        )
        self._update = self.channel.stream_stream(
            method + "Update",
            request_serializer=frame_serializer(pb.UpdateRequest),
            response_deserializer=DECODE["Update"],
        )
        # the same method for an Update of one message (through shared memory): called
        # with a unary request, the message and the end of the stream leave together
        # (gRPC does not carry a method's cardinality on the wire)
        self._update_one = self.channel.unary_stream(
            method + "Update",
            request_serializer=frame_serializer(pb.UpdateRequest),
            response_deserializer=DECODE["Update"],
        )

    @property
    def data_link(self) -> bool:
        """Whether this client may use the shard's data link (not with TLS credentials)."""
        return self._data.allowed

    @property
    def kind(self) -> str:
        """``tcp`` while tensors go over the data link, else ``grpc`` (``+bf16``: compressed)."""
        kind = "tcp" if self._data.up else "grpc"
        return kind if self.compression == "none" else f"{kind}+{self.compression}"

    async def close(self) -> None:
        await self._data.drop()
        await self.channel.close()

    async def open_data_link(self, reply: pb.DescribeReply | None = None) -> None:
        """Move tensors over the shard's data link from now on: open the one its
        Describe answer ``reply`` names (None: ask the shard; one that is not up yet:
        the next Describe opens it)."""
        self._data.wanted = self._data.allowed
        if not self._data.wanted:
            return
        if reply is not None:
            await self._data.relink(reply)
            return
        with contextlib.suppress(ShardError):
            await self.describe()

    async def _linked(self, rpc: str, messages: Callable[[], Iterable[list]], answer: Callable, timeout: float):
        """The call over the data link (see ShardLink.call): its result, or None to go over gRPC."""
        result = await self._data.call(rpc, messages, answer, timeout, self.retries)
        if result is not None:
            self._reached()
        return result

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
                raise ShardError(
                    f"shard {self.shard} ({self.address}) {rpc}: {said}", err.code(), reason_of(err)
                ) from None
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

    async def put(self, items: Items, optimizer: str, job: str = "", tables: str = "") -> int:
        """Store initial values; the shard's optimizer and job (its identity, JSON)
        are fixed by its first Put, its embedding tables by the first that declares them."""
        items = list(items)

        def requests() -> Iterator[Frame]:
            return put_frames(items, optimizer, job, tables, self.chunk_bytes)

        def pieces() -> Iterator[list]:
            return (PUT_PIECES(frame) for frame in requests())

        stored = await self._linked("Put", pieces, put_answer, self.timeout_s)
        if stored is not None:
            return stored

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
        pull: TableIds | None = None,
    ) -> Fresh:
        """Values of ``keys`` once ``group`` has completed ``step`` steps (written
        into ``into`` where it has the slice, see ``Assembler``). With
        ``wait_for_put`` the shard also waits for slices that are not put yet.
        ``job``: this job's fingerprint (a shard of another job refuses); ``pull``:
        table rows wanted too."""
        request = get_request(group, step, keys, wait_s, wait_for_put, job, pull)

        def answer(replies: list[memoryview]) -> Fresh:
            return assemble([DECODE["Get"](reply) for reply in replies], expect, into)

        fresh = await self._linked("Get", lambda: [[request.SerializeToString()]], answer, wait_s + RPC_MARGIN_S)
        if fresh is not None:
            return fresh

        async def attempt():
            frames = [f async for f in self._get(request, timeout=wait_s + RPC_MARGIN_S, metadata=self._md)]
            return await asyncio.to_thread(assemble, frames, expect, into)

        return await self._call("Get", attempt)

    async def update(
        self,
        header: UpdateHeader,
        grads: Gradients,
        expect: Expect,
        into: dict[SliceKey, np.ndarray] | None = None,
    ) -> Fresh:
        """Send one process's gradient sums of a step (``grads``: by slice, every
        slice the shard holds); returns the fresh values, each taken in as it arrives
        while the next one travels (written into ``into`` where it has the slice)."""
        rows = row_messages(header.push, header.pull)
        head = update_request(header, rows=rows[0])
        if self._feedback is not None:
            grads = self._feedback.compressed(grads)  # once: a retry sends the same bytes

        def messages() -> Iterator[list]:
            yield from update_messages(grads, grads, head, self.chunk_bytes)
            yield from row_pieces_messages(rows[1:])

        def answer(replies: list[memoryview]) -> Fresh:
            return assemble([DECODE["Update"](reply) for reply in replies], expect, into)

        fresh = await self._linked("Update", messages, answer, header.wait_s + RPC_MARGIN_S)
        if fresh is not None:
            return fresh

        async def attempt() -> Fresh:
            call = self._update(
                pipelined_update(grads, expect, head, self.chunk_bytes, rows[1:]),
                timeout=header.wait_s + RPC_MARGIN_S,
                metadata=self._md,
            )
            assembler, pulled = Assembler(expect, into=into), RowCollector()
            reply = None
            async for frame in call:
                reply = assembler.add_frame(frame)
                pulled.add(reply.table_rows)
            if reply is None:
                raise WireError(grpc.StatusCode.INTERNAL, "the shard answered with no message")
            return fresh_answer(reply, assembler.finish(), pulled.rows())

        return await self._call("Update", attempt)

    async def update_shared(self, head: pb.UpdateRequest, expect: Expect, more_rows: list = ()) -> Fresh:
        """An Update whose gradients are in a shared region (named by ``head.shm``):
        one message (more when table rows do not fit in it: ``more_rows``, pieces as
        ``row_messages`` gives them), and an answer without values (they are in the
        region too)."""
        messages = shared_update_messages(head, more_rows)

        async def attempt() -> Fresh:
            timeout = head.wait_s + RPC_MARGIN_S
            if len(messages) == 1:
                call = self._update_one(messages[0], timeout=timeout, metadata=self._md)
            else:
                call = self._update(iter(messages), timeout=timeout, metadata=self._md)
            return assemble([f async for f in call], expect, None)

        return await self._call("Update", attempt)

    async def restore(self, step: int, epoch: int) -> None:
        """Roll the shard back to its complete checkpoint of ``step``, at ``epoch``."""
        request = pb.RestoreRequest(step=step, epoch=epoch)
        await self._call("Restore", lambda: self._stub.Restore(request, timeout=self.timeout_s, metadata=self._md))

    async def describe(self) -> pb.DescribeReply:
        reply = await self._call(
            "Describe", lambda: self._stub.Describe(pb.DescribeRequest(), timeout=self.timeout_s, metadata=self._md)
        )
        await self._data.relink(reply)
        return reply
