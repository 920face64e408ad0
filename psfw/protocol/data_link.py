"""The data link: Put, Get and Update over a plain TCP connection beside gRPC.

gRPC in Python copies every message several times on each side (into the core's
buffers, out of them, into Python bytes): on a 2-core machine that holds loopback
throughput near 1-1.5 GB/s each way, where a socket read straight into its buffer
does 3-4 GB/s. So a shard also listens on a TCP port of its gRPC host, named in its
Describe answer (``data_port``); a client on the network path sends its bulk calls
there and everything else (Describe, Restore, health) over gRPC.

The bytes are the messages of ``ps.proto`` in the frames of the same-host link
(``psfw.protocol.local_link``): a connection starts with a HELLO (the bearer token)
answered OK or ERROR; a call is a CALL frame (the method's name), the request's
MESSAGE frames and an END; its answer is MESSAGE frames and an END, or one ERROR.
Both ends use blocking sockets in threads of their own: a frame is read with one
``recv_into`` into its own buffer (tensors are then views of it), and a client sends
tensors from the arrays themselves (``sendmsg``), so the kernel's are the only copies.

The link carries no TLS: a shard with TLS offers none, and a client with TLS
credentials uses none. Anything amiss ends the connection; the client goes on over
gRPC (the shard adds an Update's contribution once, whichever way it came).
"""

from __future__ import annotations

import mmap
import socket
import time
from collections.abc import Callable

import numpy as np

from psfw.protocol.frames import ALIGN
from psfw.protocol.local_link import HEAD, KINDS, MAX_FRAME_BYTES, LinkBroken
from psfw.protocol.wire import aligned_empty

METHODS = ("Put", "Get", "Update")  # what a CALL may name
IOV_MAX = 1024  # pieces per sendmsg (Linux's limit)


def data_host(address: str) -> str | None:
    """The host of a gRPC target ``host:port`` (``[v6]:port``), where its shard's
    data port is; None for a target that names no host and port (``unix:...``)."""
    if "/" in address or address.startswith("unix:") or ":" not in address:
        return None
    host = address.rsplit(":", 1)[0]
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


class LinkClosed(LinkBroken):
    """The other end closed the connection between frames (a client that is done)."""


def fresh_buffer(size: int) -> memoryview:
    """A new buffer (not zeroed first: the bytes come in over it), aligned as
    ``frame_encoder`` aligns tensors, so JAX adopts the tensors in it."""
    return memoryview(aligned_empty((size,), np.uint8))


class KeptPages:
    """Buffers for the bytes of one call that are kept once read (a Put's values):
    carved, aligned, from mappings whose pages the kernel puts in place in one go
    (``MAP_POPULATE``), where a socket read into fresh heap memory takes a fault
    per 4 KiB page (about 2 us each here: 70 ms of a 128 MB Put). A mapping is as
    large as what the call took so far (at least the frame, at most ``chunk``
    bytes), so what a call leaves unused of its last one is under both; a mapping
    goes when the last array that views it does."""

    def __init__(self, chunk: int = 8 << 20):
        self.chunk = chunk
        self._free = memoryview(b"")  # the rest of the current mapping
        self._taken = 0

    def take(self, size: int) -> memoryview:
        whole = -(-size // ALIGN) * ALIGN
        if len(self._free) < whole:
            mapping = mmap.mmap(-1, max(whole, min(self.chunk, self._taken)), flags=POPULATED)
            self._free = memoryview(np.frombuffer(mapping, np.uint8))
        view, self._free = self._free[:size], self._free[whole:]
        self._taken += whole
        return view


POPULATED = getattr(mmap, "MAP_POPULATE", 0) | mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS


def recv_exactly(
    sock: socket.socket, size: int, deadline: float | None = None, buffer: Callable[[int], memoryview] = fresh_buffer
) -> memoryview:
    """``size`` bytes into a buffer of ``buffer`` (a new aligned one by default);
    LinkBroken if the peer closes first, TimeoutError once ``deadline``
    (``time.monotonic()``) has passed."""
    view = buffer(size)
    got = 0
    while got < size:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{size - got} bytes of a frame still missing at its deadline")
            sock.settimeout(left)
        n = sock.recv_into(view[got:])
        if n == 0:
            raise LinkBroken("the connection closed mid-frame")
        got += n
    return view


def recv_frame(
    sock: socket.socket,
    max_bytes: int = MAX_FRAME_BYTES,
    deadline: float | None = None,
    buffer: Callable[[int], memoryview] = fresh_buffer,
) -> tuple[int, memoryview]:
    """The next frame's kind and payload (in a buffer of ``buffer``), whole by
    ``deadline`` (``time.monotonic()``; None: the socket's own timeout for each
    read); LinkBroken if the bytes are not one (LinkClosed: the connection closed
    before it began)."""
    try:
        kind, size = HEAD.unpack(recv_exactly(sock, HEAD.size, deadline))
    except LinkBroken:
        raise LinkClosed("the connection closed") from None
    if kind not in KINDS or size > max_bytes:
        raise LinkBroken(f"not a psfw frame (kind {kind}, {size} bytes)")
    return kind, recv_exactly(sock, size, deadline, buffer) if size else memoryview(b"")


def framed(kind: int, pieces: list[bytes | memoryview]) -> list[bytes | memoryview]:
    """A frame as pieces: its head, then ``pieces`` (the message, not joined)."""
    return [HEAD.pack(kind, sum(len(p) for p in pieces)), *pieces]


def send_pieces(sock: socket.socket, pieces: list[bytes | memoryview]) -> None:
    """Send every piece, in order, without joining them (``sendmsg``; a piece may
    be a view of an array: it is read where it lies)."""
    views = [memoryview(p).cast("B") for p in pieces if len(p)]
    while views:
        sent = sock.sendmsg(views[:IOV_MAX])
        while sent:  # drop what went, cut the piece that went in part
            if sent >= len(views[0]):
                sent -= len(views.pop(0))
            else:
                views[0], sent = views[0][sent:], 0
