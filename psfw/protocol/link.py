"""The bulk link: Put, Get and Update over a socket of their own beside gRPC.

gRPC in Python copies every message several times on each side (into the core's
buffers, out of them, into Python bytes) and hops between threads for each call; a
socket read straight into its buffer does several times the throughput and costs one
hop. So a shard also listens on a socket and names it in its Describe answer: an
abstract Unix socket (``link_socket``: a name, no file, gone with the process,
reachable only from its network namespace) for clients on its host, and a TCP port of
its gRPC host (``link_port``) for the others. The socket depends only on distance;
what travels is the same. Where the shard has TLS, the link speaks TLS with the same
certificates (Python's ``ssl`` over the socket).

The bytes are the messages of ``ps.proto``, each in a frame: a kind (one byte) and a
length (four bytes, little-endian), then the message. A connection starts with a HELLO
(the bearer token, empty when the shard has none) that the shard answers OK (with the
link's id, new at each start of the shard) or ERROR. A call is a CALL frame (the
method's name), the request's MESSAGE frames and an END; its answer is MESSAGE frames
and an END, or one ERROR (the status code's name, the message, the reason: JSON).
Anything else ends the connection; the client then goes on over gRPC.

Both ends use blocking sockets in threads of their own: a frame is read with one
``recv_into`` into its own buffer (tensors are then views of it), and a client sends
tensors from the arrays themselves (``sendmsg``), so the kernel's are the only copies.
"""

from __future__ import annotations

import hmac
import json
import mmap
import os
import socket
import ssl
import struct
import time
import uuid
from collections.abc import Callable

import grpc
import numpy as np

from psfw.base.errors import Reason, WireError
from psfw.protocol.chunks import ALIGN
from psfw.protocol.wire import aligned_empty

HELLO, MESSAGE, END, ERROR, OK, CALL = 1, 2, 3, 4, 5, 6
KINDS = frozenset((HELLO, MESSAGE, END, ERROR, OK, CALL))
HEAD = struct.Struct("<BI")
MAX_FRAME_BYTES = 64 << 20  # a message carries about 1 MiB of tensors, or table rows cut to fit
METHODS = ("Put", "Get", "Update")  # what a CALL may name
IOV_MAX = 1024  # pieces per sendmsg (Linux's limit)
TLS_RECORD_BYTES = 1 << 16  # over TLS, small pieces are joined up to this (one record, not one per piece)
SOCKET_PREFIX = "@psfw-shard-"


class LinkBroken(ConnectionError):
    """The other end sent what no psfw peer sends, or went away mid-call."""


class LinkClosed(LinkBroken):
    """The other end closed the connection between frames (a client that is done)."""


class LinkTimeout(LinkBroken):
    """A call got no answer within its deadline (the link is closed: its state is unknown)."""


def socket_name() -> str:
    """A fresh name for a shard's Unix socket, as the Describe answer carries it
    (``@`` stands for the leading NUL of an abstract socket)."""
    return f"{SOCKET_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"


def socket_address(name: str) -> str:
    """The address a socket binds or connects to for a name from ``socket_name``."""
    if not name.startswith(SOCKET_PREFIX):
        raise ValueError(f"{name!r} is not the name of a psfw shard's socket")
    return "\0" + name[1:]


def link_host(address: str) -> str | None:
    """The host of a gRPC target ``host:port`` (``[v6]:port``), where its shard's
    link port is; None for a target that names no host and port (``unix:...``)."""
    if "/" in address or address.startswith("unix:") or ":" not in address:
        return None
    host = address.rsplit(":", 1)[0]
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def token_refusal(token: bytes, expected: bytes) -> WireError | None:
    """The refusal of a HELLO's bearer token (compared in constant time); None when
    it is the shard's, or the shard has none (as its gRPC port takes any then)."""
    if not expected or hmac.compare_digest(token, expected):
        return None
    reason = "missing bearer token" if not token else "wrong bearer token"
    return WireError(grpc.StatusCode.UNAUTHENTICATED, f"{reason}: send the shard's token")


def error_frame(err: WireError) -> bytes:
    said = {"code": err.code.name, "message": err.message, "reason": err.reason.value}
    payload = json.dumps(said).encode()
    return HEAD.pack(ERROR, len(payload)) + payload


def read_error(payload: bytes) -> WireError:
    """The refusal an ERROR frame carries."""
    try:
        said = json.loads(payload)
        code = grpc.StatusCode[said["code"]]
        message = str(said["message"])
        reason = Reason(said["reason"]) if said["reason"] in {r.value for r in Reason} else Reason.NONE
    except (ValueError, KeyError, TypeError) as err:
        raise LinkBroken(f"an unreadable refusal ({err})") from None
    return WireError(code, message, reason)


def fresh_buffer(size: int) -> memoryview:
    """A new buffer (not zeroed first: the bytes come in over it), aligned as
    ``chunked_encoder`` aligns tensors, so JAX adopts the tensors in it."""
    return memoryview(aligned_empty((size,), np.uint8))


class KeptPages:
    """Buffers for the bytes of one call that are kept once read (a Put's values):
    carved, aligned, from mappings whose pages the kernel puts in place in one go
    (``MAP_POPULATE``), where a socket read into fresh heap memory takes a fault per
    4 KiB page. A mapping is as large as what the call took so far (at least the
    frame, at most ``chunk`` bytes), so what a call leaves unused of its last one is
    under both; a mapping goes when the last array that views it does."""

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


def listen_unix(name: str) -> socket.socket:
    """A listening socket (non-blocking) on the abstract Unix socket ``name`` names."""
    return _listening(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), socket_address(name))


def listen_tcp(host: str, port: int) -> socket.socket:
    """A listening socket on ``host`` (the gRPC listen host: a name, an IPv4 or an
    IPv6 address, the wildcard of all interfaces)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    return _listening(socket.socket(family, kind, proto), address, reuse=True)


def _listening(sock: socket.socket, address, reuse: bool = False) -> socket.socket:
    """``sock`` bound to ``address`` (``reuse``: with SO_REUSEADDR), listening,
    non-blocking; closed if that fails."""
    try:
        if reuse:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(64)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


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
    except ssl.SSLEOFError:
        raise LinkClosed("the connection closed") from None
    if kind not in KINDS or size > max_bytes:
        raise LinkBroken(f"not a psfw frame (kind {kind}, {size} bytes)")
    return kind, recv_exactly(sock, size, deadline, buffer) if size else memoryview(b"")


def framed(kind: int, pieces: list[bytes | memoryview]) -> list[bytes | memoryview]:
    """A frame as pieces: its head, then ``pieces`` (the message, not joined)."""
    return [HEAD.pack(kind, sum(len(p) for p in pieces)), *pieces]


def send_pieces(sock: socket.socket, pieces: list[bytes | memoryview]) -> None:
    """Send every piece, in order, without joining them (``sendmsg``; a piece may
    be a view of an array: it is read where it lies). Over TLS, small pieces are
    joined into records and large ones sent as they are."""
    views = [memoryview(p).cast("B") for p in pieces if len(p)]
    if isinstance(sock, ssl.SSLSocket):
        _send_records(sock, views)
        return
    while views:
        sent = sock.sendmsg(views[:IOV_MAX])
        while sent:  # drop what went, cut the piece that went in part
            if sent >= len(views[0]):
                sent -= len(views.pop(0))
            else:
                views[0], sent = views[0][sent:], 0


def _send_records(sock: ssl.SSLSocket, views: list[memoryview]) -> None:
    small: list[memoryview] = []
    for view in views:
        if len(view) < TLS_RECORD_BYTES:
            small.append(view)
            if sum(len(v) for v in small) < TLS_RECORD_BYTES:
                continue
        if small:
            sock.sendall(b"".join(small))
            small = []
        if len(view) >= TLS_RECORD_BYTES:
            sock.sendall(view)
    if small:
        sock.sendall(b"".join(small))
