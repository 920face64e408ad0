"""The same-host link: an Update's messages over a Unix socket instead of gRPC.

A stub whose shard runs on its host sends the tensors through a shared-memory region
(``psfw.protocol.shm``); what is left to carry is a header of a few hundred bytes
each way. A gRPC call costs several thread hops on each side for that; a Unix socket
read on each event loop costs one. So a shard listens on an abstract Unix socket
(Linux: a name, no file, gone with the process; reachable from its network namespace
only, as loopback gRPC is) and says its name in its Describe answer
(``local_socket``); a stub that shares memory with it sends its Updates there.

The bytes are the messages of ``ps.proto``, each in a frame: a kind (one byte) and a
length (four bytes, little-endian), then the message. A connection starts with a
HELLO (the bearer token, empty when the shard has none) that the shard answers OK or
ERROR; then each call is its MESSAGEs and an END, answered by MESSAGEs and an END,
or by one ERROR (the status code's name, the message, the reason: JSON). Anything
else ends the connection; the stub then goes on over gRPC.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import struct
import uuid

import grpc

from psfw.base.errors import Reason, WireError

HELLO, MESSAGE, END, ERROR, OK, CALL = 1, 2, 3, 4, 5, 6  # CALL: the data link's (psfw.protocol.data_link)
KINDS = frozenset((HELLO, MESSAGE, END, ERROR, OK, CALL))
HEAD = struct.Struct("<BI")
MAX_FRAME_BYTES = 64 << 20  # headers and table rows (cut to fit a gRPC message), never tensors


class LinkBroken(ConnectionError):
    """The other end sent what no psfw peer sends, or went away mid-call."""


class LinkTimeout(LinkBroken):
    """A call got no answer within its deadline (the link is closed: its state is unknown)."""


def socket_name() -> str:
    """A fresh name for a shard's socket, as the Describe answer carries it (``@``
    stands for the leading NUL of an abstract socket)."""
    return f"@psfw-shard-{os.getpid()}-{uuid.uuid4().hex}"


def socket_address(name: str) -> str:
    """The address asyncio binds or connects to for a name from ``socket_name``."""
    if not name.startswith("@psfw-shard-"):
        raise ValueError(f"{name!r} is not the name of a psfw shard's socket")
    return "\0" + name[1:]


def frame(kind: int, payload: bytes = b"") -> bytes:
    return HEAD.pack(kind, len(payload)) + payload


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The next frame's kind and payload; LinkBroken if the bytes are not one."""
    try:
        kind, size = HEAD.unpack(await reader.readexactly(HEAD.size))
        if kind not in KINDS or size > MAX_FRAME_BYTES:
            raise LinkBroken(f"not a psfw frame (kind {kind}, {size} bytes)")
        return kind, await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        raise LinkBroken("the connection closed mid-frame") from None


def token_refusal(token: bytes, expected: bytes) -> WireError | None:
    """The refusal of a HELLO's bearer token (compared in constant time); None when
    it is the shard's."""
    if hmac.compare_digest(token, expected):
        return None
    reason = "missing bearer token" if not token else "wrong bearer token"
    return WireError(grpc.StatusCode.UNAUTHENTICATED, f"{reason}: send the shard's token")


def error_frame(err: WireError) -> bytes:
    said = {"code": err.code.name, "message": err.message, "reason": err.reason.value}
    return frame(ERROR, json.dumps(said).encode())


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
