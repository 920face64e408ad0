"""gRPC to one shard: its channel, the verbs' method handles, and the retry rule.

Every RPC has a deadline; UNAVAILABLE and deadlines gRPC ran out of are retried with
exponential backoff and jitter up to ``retries`` times (a retried Update is safe: the
shard adds a contribution once). Failures surface as ShardError naming the shard, the
RPC and the server's message; a shard that cannot be reached is said every few
seconds, a TLS handshake that cannot succeed at once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from psfw.base.errors import Reason, ShardError, WireError
from psfw.base.security import ConnectionProblem, Security, connection_problem
from psfw.base.service import REASON_KEY, SERVICE_NAME, grpc_options
from psfw.proto import ps_pb2 as pb
from psfw.protocol.calls import DECODE
from psfw.protocol.chunks import chunked_serializer

T = TypeVar("T")
log = logging.getLogger("psfw.runtime.shard_client")

REPORT_EVERY_S = 5.0  # while a shard cannot be reached, say so this often
LOCATE_EVERY_S = 1.0  # while it cannot be reached, ask where it listens now this often
# where shard I listens now (``host:port``), for shards an engine may move (psfw ray)
Locate = Callable[[int], Awaitable[str]]
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


class GrpcChannel:
    """The gRPC channel to the shard ``shard`` at ``address``, and ``call``, which
    runs one RPC under the retry rule."""

    def __init__(
        self,
        address: str,
        shard: int,
        security: Security,
        timeout_s: float,
        retries: int,
        locate: Locate | None = None,
        on_moved: Callable[[str], None] | None = None,
    ):
        self.address, self.shard, self.security = address, shard, security
        self.timeout_s, self.retries = timeout_s, retries
        self.metadata = security.metadata()
        self.locate, self.on_moved = locate, on_moved
        self._down_since: float | None = None  # since when the shard cannot be reached
        self._said = 0.0  # when that was last said
        self._closed = 0  # connections it closed at once, in a row
        self._asked = 0.0  # when ``locate`` was last asked
        self._left: list = []  # channels a move left behind
        self._closing: set[asyncio.Future] = set()  # their graceful closes
        self._open(address)

    def _open(self, address: str) -> None:
        """The channel to ``address`` and the verbs' handles on it."""
        self.address = address
        self.channel = self.security.channel(address, grpc_options())
        method = f"/{SERVICE_NAME}/"
        self.put = self.channel.stream_unary(
            method + "Put",
            request_serializer=chunked_serializer(pb.PutRequest),
            response_deserializer=pb.PutReply.FromString,
        )
        self.get = self.channel.unary_stream(
            method + "Get",
            request_serializer=pb.GetRequest.SerializeToString,
            response_deserializer=DECODE["Get"],
        )
        self.update = self.channel.stream_stream(
            method + "Update",
            request_serializer=chunked_serializer(pb.UpdateRequest),
            response_deserializer=DECODE["Update"],
        )
        # the same method for an Update of one message (its tensors in shared memory):
        # called with a unary request, the message and the end of the stream leave
        # together (gRPC does not carry a method's cardinality on the wire)
        self.update_one = self.channel.unary_stream(
            method + "Update",
            request_serializer=chunked_serializer(pb.UpdateRequest),
            response_deserializer=DECODE["Update"],
        )
        self.describe = self.channel.unary_unary(
            method + "Describe",
            request_serializer=pb.DescribeRequest.SerializeToString,
            response_deserializer=pb.DescribeReply.FromString,
        )
        self.restore = self.channel.unary_unary(
            method + "Restore",
            request_serializer=pb.RestoreRequest.SerializeToString,
            response_deserializer=pb.RestoreReply.FromString,
        )

    async def close(self) -> None:
        await self.channel.close()
        for old in self._left:  # channels a move left behind: now at once
            await old.close()
        await asyncio.gather(*self._closing, return_exceptions=True)

    async def _moved(self) -> bool:
        """Whether the shard now listens elsewhere (``locate`` says; asked at most
        once a second): the channel then goes there."""
        now = time.monotonic()
        if self.locate is None or now - self._asked < LOCATE_EVERY_S:
            return False
        self._asked = now
        try:
            address = await self.locate(self.shard)
        except Exception as err:  # the engine that places the shards cannot say yet: retry as usual
            log.debug("shard %d: where it listens now is not known yet (%s)", self.shard, err)
            return False
        if not address or address == self.address:
            return False
        log.warning("shard %d moved: %s -> %s", self.shard, self.address, address)
        old = self.channel
        self._open(address)
        self._down_since, self._said, self._closed = None, 0.0, 0
        if self.on_moved is not None:
            self.on_moved(address)
        # calls still on the old channel end as they would (their retries come here);
        # closing it at once would cancel them under their callers
        self._left.append(old)
        closing = asyncio.ensure_future(old.close(grace=self.timeout_s))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)
        return True

    async def call(self, rpc: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """``attempt()``, retried while the shard cannot be reached (``retries``
        times, backing off; a shard that moved is tried where it listens now); its
        failure as a ShardError."""
        delay, tries = 0.05, 0
        while True:
            try:
                result = await attempt()
            except grpc.aio.AioRpcError as err:
                link = self._connection_failed(err)
                if _transient(err) and await self._moved():
                    continue  # at most once a second, and only to a new address
                if _transient(err) and tries < self.retries:
                    tries += 1
                    await asyncio.sleep(delay * (0.5 + random.random()))
                    delay = min(delay * 2, 2.0)
                    continue
                said = f"cannot connect: {link.cause}" if link.kind else f"{err.code().name}: {err.details()}"
                raise ShardError(
                    f"shard {self.shard} ({self.address}) {rpc}: {said}", err.code(), reason_of(err)
                ) from None
            except WireError as err:
                raise ShardError(f"shard {self.shard} ({self.address}) {rpc}: bad reply: {err.message}") from None
            self.reached()
            return result

    def _connection_failed(self, err: grpc.aio.AioRpcError) -> ConnectionProblem:
        """Read a failed RPC as news of the connection: a failed TLS handshake (or a
        shard that keeps closing connections at once) is a ShardError now, since
        retrying cannot fix it; a shard that cannot be reached is said every few
        seconds, with how long it has been and the client's patience."""
        link = (
            connection_problem(err.details() or "", self.security)
            if err.code() == grpc.StatusCode.UNAVAILABLE
            else None
        )
        if link is None or not link.kind:
            self._closed = 0
            return link or ConnectionProblem("", "")
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

    def reached(self) -> None:
        """The shard answered: say so if its absence was said."""
        if self._down_since is not None and self._said:
            log.warning(
                "shard %d at %s answered after %.0f s", self.shard, self.address, time.monotonic() - self._down_since
            )
        self._down_since, self._said, self._closed = None, 0.0, 0
