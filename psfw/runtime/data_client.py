"""A client's end of a shard's data link (``psfw.protocol.data_link``): one TCP
connection, one call at a time, in a thread of its own."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from psfw.protocol.data_link import framed, recv_frame, send_pieces
from psfw.protocol.errors import WireError
from psfw.protocol.local_link import CALL, END, ERROR, HELLO, MESSAGE, OK, LinkBroken, LinkTimeout, read_error

T = TypeVar("T")
CONNECT_S = 3.0  # a shard that offers the link answers at once; one that is not reachable there costs this once

Pieces = list  # one message, as pieces (psfw.protocol.frames.frame_encoder)


class DataLink:
    """An open data link to one shard. ``call`` returns the shard's refusal as a
    WireError (the link stays open) and raises for a link that failed (an OSError:
    LinkBroken, LinkTimeout): then it is closed, and the caller goes on over gRPC."""

    def __init__(self, sock: socket.socket, thread: ThreadPoolExecutor):
        self._sock, self._thread = sock, thread
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
                kind, payload = recv_frame(sock)
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
            return cls(await asyncio.get_running_loop().run_in_executor(thread, connect), thread)
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
            exchange = asyncio.get_running_loop().run_in_executor(
                self._thread, self._exchange, method, messages, answer, deadline
            )
            try:
                return await exchange
            except BaseException as err:
                self._abort()
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
            kind, payload = recv_frame(bounded())
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
