"""A client's end of a shard's data link (``psfw.protocol.data_link``): one TCP
connection, one call at a time, in a thread of its own (``DataLink``), and when a
network client opens, uses and drops it (``ShardLink``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc

from psfw.base.errors import ShardError, WireError, said
from psfw.protocol.data_link import data_host, framed, recv_frame, send_pieces
from psfw.protocol.local_link import CALL, END, ERROR, HELLO, MESSAGE, OK, LinkBroken, LinkTimeout, read_error

T = TypeVar("T")
log = logging.getLogger(__name__)
REOPEN_S, MAX_REOPEN_S = 1.0, 60.0  # a link that failed is opened again after this back-off
HELLO_ANSWER_BYTES = 1 << 16  # an OK (the link's id) or a refusal
CONNECT_S = 3.0  # a shard that offers the link answers at once; one that is not reachable there costs this once

Pieces = list  # one message, as pieces (psfw.protocol.frames.frame_encoder)


class DataLink:
    """An open data link to one shard. ``call`` returns the shard's refusal as a
    WireError (the link stays open) and raises for a link that failed (an OSError:
    LinkBroken, LinkTimeout): then it is closed, and the caller goes on over gRPC."""

    def __init__(self, sock: socket.socket, thread: ThreadPoolExecutor, link_id: str | None = None):
        self._sock, self._thread, self.id = sock, thread, link_id
        self._lock = asyncio.Lock()
        self.closed = False

    @classmethod
    async def open(cls, host: str, port: int, token: str | None, link_id: str | None = None) -> DataLink:
        """Connect to a shard's data port and say the token. Raises OSError if the
        shard cannot be reached there (or another one answers: not ``link_id``, its
        Describe's ``data_id``), WireError if it refuses the token."""
        thread = ThreadPoolExecutor(1, thread_name_prefix="psfw-data-link")

        def connect() -> socket.socket:
            sock = socket.create_connection((host, port), CONNECT_S)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                send_pieces(sock, framed(HELLO, [(token or "").encode()]))
                kind, payload = recv_frame(sock, HELLO_ANSWER_BYTES)
                if kind == ERROR:
                    raise read_error(bytes(payload))
                if kind != OK:
                    raise LinkBroken(f"the shard answered HELLO with frame kind {kind}")
                if link_id is not None and bytes(payload) != link_id.encode():
                    raise LinkBroken(f"another shard's data link answers on port {port}")
            except BaseException:
                sock.close()
                raise
            return sock

        try:
            return cls(await asyncio.get_running_loop().run_in_executor(thread, connect), thread, link_id)
        except BaseException:
            thread.shutdown(wait=False)
            raise

    async def call(
        self,
        method: str,
        messages: Callable[[], Iterable[Pieces]],
        answer: Callable[[list[memoryview]], T],
        timeout: float,
    ) -> T | WireError:
        """Send a call's ``messages`` (made in the link's thread as they are sent)
        and return ``answer(its messages)`` (also run there), or the shard's refusal.
        A call that fails, runs out of ``timeout`` or is cancelled midway closes the link."""
        async with self._lock:  # a call waits for the one before (a caller that must not: see ``busy``)
            if self.closed:
                raise LinkBroken("the link is closed")
            deadline = time.monotonic() + timeout
            running = self._thread.submit(self._exchange, method, messages, answer, deadline)
            try:
                return await asyncio.wrap_future(running)
            except BaseException as err:
                self._abort()
                if isinstance(err, asyncio.CancelledError):
                    # the thread may still be writing the answer into the caller's buffers:
                    # with the socket shut it ends at once; only then is the caller let go
                    with contextlib.suppress(BaseException):
                        await asyncio.shield(asyncio.wrap_future(running))
                if isinstance(err, TimeoutError):
                    raise LinkTimeout(f"no answer in {timeout:.0f} s") from None
                raise

    @property
    def busy(self) -> bool:
        """Whether a call is under way (another one would wait for it)."""
        return self._lock.locked()

    def _exchange(self, method: str, messages, answer, deadline: float):
        sock = self._sock

        def bounded() -> socket.socket:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
            return sock

        send_pieces(bounded(), framed(CALL, [method.encode()]))
        for message in messages():
            send_pieces(bounded(), framed(MESSAGE, message))
        send_pieces(bounded(), framed(END, []))
        replies = []
        while True:
            kind, payload = recv_frame(sock, deadline=deadline)  # TimeoutError once it passes
            if kind == END:
                return answer(replies)
            if kind == ERROR:
                return read_error(bytes(payload))
            if kind != MESSAGE:
                raise LinkBroken(f"frame kind {kind} in an answer")
            replies.append(payload)

    def _abort(self) -> None:
        """Close the link at once: a call still running in its thread fails there."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        if self._lock.locked():
            self._thread.submit(self._sock.close)  # once the call has left it, in the link's thread
        else:
            self._sock.close()
        self._thread.shutdown(wait=False)

    async def close(self) -> None:
        self._abort()


class ShardLink:
    """A network client's data link to its shard: opened when a Describe answer names
    one (once ``wanted``: a client for status or health opens none), used while it
    works. One that fails is dropped (its calls go over gRPC) and opened again after
    a back-off (1 s, doubling to a minute); one that cannot be opened is tried again
    only when a Describe names it anew; a Describe that names another link (a
    restarted shard) opens that one at once."""

    def __init__(self, shard: int, address: str, token: str | None, allowed: bool):
        self.shard, self.address, self.token = shard, address, token
        self.allowed = allowed and data_host(address) is not None
        self.wanted = False
        self._link: DataLink | None = None
        self._named = (0, "")  # the port and id of the link the last Describe named
        self._retry_at, self._backoff = 0.0, REOPEN_S
        self._opening = asyncio.Lock()

    @property
    def up(self) -> bool:
        return self._link is not None

    async def relink(self, reply) -> None:
        """Open the link a Describe answer names, unless it is the one open already."""
        named = (reply.data_port, reply.data_id)
        if not self.wanted or not named[0] or (named == self._named and self._link is not None):
            return
        if named != self._named:
            self._named, self._retry_at, self._backoff = named, 0.0, REOPEN_S
        await self._open()

    async def _open(self) -> None:
        async with self._opening:  # one at a time: two Describes never leave two links
            if self._link is not None and not self._link.closed and self._link.id == self._named[1]:
                return
            await self.drop()
            port, link_id = self._named
            if time.monotonic() < self._retry_at:
                return
            try:
                self._link = await DataLink.open(data_host(self.address), port, self.token, link_id)
            except (OSError, ValueError, WireError) as err:
                # not again until a Describe names a link: a port that a firewall drops
                # would cost every attempt the whole connect timeout
                self._retry_at = math.inf
                log.warning("shard %d: no data link on port %d (%s); tensors go over gRPC", self.shard, port, said(err))

    def _failed(self) -> None:
        """An open link failed: open it again after the back-off."""
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(2 * self._backoff, MAX_REOPEN_S)

    async def drop(self) -> None:
        if self._link is not None:
            link, self._link = self._link, None
            await link.close()

    async def call(self, rpc: str, messages, answer: Callable, timeout: float, retries: int):
        """The call over the link: ``answer``'s result, or None when there is no link,
        it is busy (the call goes beside it, as gRPC's calls do) or it failed (then the
        caller goes over gRPC: a shard adds an Update's contribution once). The shard's
        refusal is a ShardError, as over gRPC."""
        if self._link is None and self.wanted and self._named[0] and time.monotonic() >= self._retry_at:
            await self._open()  # after a failure's back-off
        link = self._link
        if link is None or link.busy:
            return None
        try:
            result = await link.call(rpc, messages, answer, timeout)
        except WireError as err:  # the answer did not parse
            await self.drop()
            self._failed()
            raise ShardError(f"shard {self.shard} ({self.address}) {rpc}: bad reply: {err.message}") from None
        except (OSError, ValueError) as err:  # LinkBroken and LinkTimeout are ConnectionErrors
            await self.drop()
            self._failed()
            if isinstance(err, LinkTimeout) and not retries:  # as gRPC's deadline would end it
                raise ShardError(
                    f"shard {self.shard} ({self.address}) {rpc}: DEADLINE_EXCEEDED: {err}",
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ) from None
            log.warning("shard %d: the data link failed (%s); tensors go over gRPC", self.shard, said(err))
            return None
        self._backoff = REOPEN_S
        if isinstance(result, WireError):
            if result.code == grpc.StatusCode.UNAVAILABLE:
                return None  # a shard that loads its checkpoint: gRPC retries
            raise ShardError(
                f"shard {self.shard} ({self.address}) {rpc}: {result.code.name}: {result.message}",
                result.code,
                result.reason,
            )
        return result
