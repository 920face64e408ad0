"""One open link to a shard (``psfw.protocol.link``), the client's end: where the
shard's link listens (``Place``, from its Describe answer), and a connection that
makes one call at a time in a thread of its own (``LinkConnection``): a pipelined
Update's request sent while its answer is read, paced by ``psfw.runtime.lockstep``.

The socket depends on distance only: the shard's Unix socket when the Describe
answer says the shard runs on this host, its TCP port otherwise; TLS over either when
this client has TLS credentials (as its gRPC channel does).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, TypeVar

from psfw.base.errors import WireError
from psfw.protocol.link import (
    CALL,
    END,
    ERROR,
    HELLO,
    MESSAGE,
    OK,
    LinkBroken,
    LinkTimeout,
    framed,
    link_host,
    read_error,
    recv_frame,
    send_pieces,
    socket_address,
)
from psfw.protocol.shm import host_id
from psfw.runtime.lockstep import Credit, Lockstep

T = TypeVar("T")
HELLO_ANSWER_BYTES = 1 << 16  # an OK (the link's id) or a refusal
CONNECT_S = 3.0  # a shard that offers the link answers at once; one that is not reachable there costs this once

Pieces = list  # one message, as pieces (psfw.protocol.chunks.chunked_encoder)


class Place(NamedTuple):
    """Where a shard's link listens, as its Describe answer says: a Unix socket of
    this host (``socket``) or a TCP port (``host``, ``port``), and the link's id."""

    socket: str
    host: str
    port: int
    id: str

    @property
    def kind(self) -> str:
        return "unix" if self.socket else "tcp"

    def connect(self) -> socket.socket:
        if self.socket:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(CONNECT_S)
                sock.connect(socket_address(self.socket))
            except BaseException:
                sock.close()
                raise
            return sock
        sock = socket.create_connection((self.host, self.port), CONNECT_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


def link_place(reply, address: str, same_host: bool = True) -> Place | None:
    """Where to reach the link of the shard at ``address`` whose Describe answer is
    ``reply``: its Unix socket on this host (unless not ``same_host``), else its TCP
    port; None: it offers none."""
    host = link_host(address) or ""
    if same_host and reply.link_socket and reply.host and reply.host == host_id():
        return Place(reply.link_socket, host, 0, reply.link_id)
    if reply.link_port and host:
        return Place("", host, reply.link_port, reply.link_id)
    return None


class LinkConnection:
    """An open link to one shard. ``call`` returns the shard's refusal as a
    WireError (the link stays open) and raises for a link that failed (an OSError:
    LinkBroken, LinkTimeout): then it is closed, and the caller goes on over gRPC."""

    def __init__(self, sock: socket.socket, thread: ThreadPoolExecutor, place: Place):
        self._sock, self._thread, self.place = sock, thread, place
        self._sender: ThreadPoolExecutor | None = None  # sends a duplex call's request while its answer arrives
        self._lock = asyncio.Lock()
        self.closed = False

    @classmethod
    async def open(cls, place: Place, token: str | None, tls: ssl.SSLContext | None) -> LinkConnection:
        """Connect to a shard's link and say the token (in TLS with ``tls``). Raises
        OSError if the shard cannot be reached there (or another one answers: not
        ``place.id``), WireError if it refuses the token."""
        thread = ThreadPoolExecutor(1, thread_name_prefix="psfw-link")

        def connect() -> socket.socket:
            sock = place.connect()
            try:
                if tls is not None:
                    sock = tls.wrap_socket(sock, server_hostname=place.host or None)
                send_pieces(sock, framed(HELLO, [(token or "").encode()]))
                kind, payload = recv_frame(sock, HELLO_ANSWER_BYTES, time.monotonic() + CONNECT_S)
                if kind == ERROR:
                    raise read_error(bytes(payload))
                if kind != OK:
                    raise LinkBroken(f"the shard answered HELLO with frame kind {kind}")
                if bytes(payload) != place.id.encode():
                    raise LinkBroken(f"another shard's link answers at {place.socket or place.port}")
            except BaseException:
                sock.close()
                raise
            return sock

        try:
            return cls(await asyncio.get_running_loop().run_in_executor(thread, connect), thread, place)
        except BaseException:
            thread.shutdown(wait=False)
            raise

    async def call(
        self,
        method: str,
        messages: Callable[[], Iterable[Pieces]],
        answer: Callable[[list[memoryview]], T],
        timeout: float,
        duplex: bool = False,
        lockstep: Lockstep | None = None,
        credit: Credit | None = None,
    ) -> T | WireError:
        """Send a call's ``messages`` (made in the link's thread as they are sent)
        and return ``answer(its messages)`` (also run there), or the shard's refusal.
        ``duplex``: the answer may begin while the request is still going (a
        pipelined Update): it is read meanwhile, unless the link is in TLS (one TLS
        connection is not for two threads at once; the shard then answers after
        the request); ``lockstep``: its messages go in step with the other calls
        of it (not over TLS); ``credit``: begun anew, and told of each answer
        message as it is read. A call that fails, runs out of ``timeout`` or is
        cancelled midway closes the link."""
        async with self._lock:  # a call waits for the one before (a caller that must not: see ``busy``)
            if self.closed:
                raise LinkBroken("the link is closed")
            deadline = time.monotonic() + timeout
            running = self._thread.submit(self._exchange, method, messages, answer, deadline, duplex, lockstep, credit)
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

    @property
    def duplex(self) -> bool:
        """Whether a call may read its answer while its request is still being sent."""
        return not isinstance(self._sock, ssl.SSLSocket)

    def _exchange(
        self,
        method: str,
        messages,
        answer,
        deadline: float,
        duplex: bool = False,
        lockstep: Lockstep | None = None,
        credit: Credit | None = None,
    ):
        sock = self._sock
        if credit is not None:  # where no answer is read until the request is sent, nothing is waited for
            credit.begin(deadline, waits=duplex and self.duplex)

        def bounded() -> socket.socket:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
            return sock

        def send() -> None:
            stepped = lockstep if duplex and self.duplex else None
            written = stepped.join(sock) if stepped is not None else [0]
            try:
                send_pieces(bounded(), framed(CALL, [method.encode()]))
                for message in messages():
                    if stepped is not None:
                        stepped.wait(written, deadline)
                    frame = framed(MESSAGE, message)
                    send_pieces(bounded(), frame)
                    written[0] += sum(len(p) for p in frame)
                send_pieces(bounded(), framed(END, []))
            finally:
                if stepped is not None:
                    stepped.leave(sock)

        failed: list[BaseException] = []  # why the request failed, before the answer's wait ends

        def send_or_shut() -> None:  # a request that fails ends the answer's wait too
            try:
                send()
            except BaseException as err:
                failed.append(err)
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
                raise

        sending = None
        if duplex and self.duplex:
            if self._sender is None:
                self._sender = ThreadPoolExecutor(1, thread_name_prefix="psfw-link-send")
            sending = self._sender.submit(send_or_shut)
        else:
            send()
        try:
            replies = []
            while True:
                kind, payload = recv_frame(sock, deadline=deadline)  # TimeoutError once it passes
                if kind == END:
                    outcome = answer(replies)
                    break
                if kind == ERROR:
                    outcome = read_error(bytes(payload))
                    break
                if kind != MESSAGE:
                    raise LinkBroken(f"frame kind {kind} in an answer")
                replies.append(payload)
                if credit is not None:
                    credit.answer(len(payload))
        except BaseException:
            if credit is not None:
                credit.release()  # a message waiting for room fails at once
            if failed:
                raise failed[0] from None  # what failed first
            if sending is not None and not sending.done():
                with contextlib.suppress(OSError):  # the request stops too: the link is closed after this
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
            raise
        if sending is not None:
            if credit is not None:
                credit.release()  # a refusal: no more answers, the rest goes at once
            sending.result()  # the shard answers after the request's END: it is sent
        return outcome

    def _abort(self) -> None:
        """Close the link at once: a call still running in its thread fails there."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError):
            # beneath any TLS: SSLSocket.shutdown drops the TLS state a call in the
            # link's thread may be using, whose next send would then go out in clear
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)
        if self._lock.locked():
            self._thread.submit(self._sock.close)  # once the call has left it, in the link's thread
        else:
            self._sock.close()
        self._thread.shutdown(wait=False)
        if self._sender is not None:
            self._sender.shutdown(wait=False)

    async def close(self) -> None:
        self._abort()


__all__ = ["LinkConnection", "Place", "link_place"]
