"""Lockstep: a stub's pipelined Updates of one step to its shards, kept in step on
the wire (``psfw.runtime.link_client`` waits on it before each message it sends)."""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
import threading
import time


class Lockstep:
    """The pipelined Updates of one step to several shards, kept in step on the
    wire: a call writes its next message only while it is at most ``ahead`` bytes
    past what the slowest of them has had delivered (its bytes written less those its
    socket still holds, ``TIOCOUTQ``). Every stub sends its slices in the layout's
    order, so each shard then gets a slice from every worker at about the same time,
    and answers it; a flow that ran ahead would take link the others need, and only
    make its shard wait for them."""

    POLL_S = 0.002
    STALL_S = 1.0  # a slowest flow that delivers nothing for this long is not waited for

    def __init__(self, ahead: int = 512 << 10):
        self.ahead = ahead
        self._lock = threading.Lock()
        self._calls: dict[int, tuple[socket.socket, list[int]]] = {}  # socket, bytes written

    def join(self, sock: socket.socket) -> list[int]:
        """A call begins; returns its count of bytes written, for it to keep."""
        written = [0]
        with self._lock:
            self._calls[id(sock)] = (sock, written)
        return written

    def leave(self, sock: socket.socket) -> None:
        with self._lock:
            self._calls.pop(id(sock), None)

    def wait(self, written: list[int], deadline: float) -> None:
        """Until a call that has written ``written`` bytes may write more: the
        slowest has caught up, or has delivered nothing for ``STALL_S`` (a shard
        that is slow or gone holds up its own Update, not the others)."""
        last, since = None, time.monotonic()
        while True:
            with self._lock:
                calls = list(self._calls.values())
            slowest = min((count[0] - _unsent(sock) for sock, count in calls), default=written[0])
            if written[0] - slowest <= self.ahead:
                return
            now = time.monotonic()
            if slowest != last:
                last, since = slowest, now
            if now - since >= self.STALL_S or now >= deadline:
                return
            time.sleep(self.POLL_S)


def _unsent(sock: socket.socket) -> int:
    """The bytes a socket holds that its peer has not acknowledged yet (0 once closed)."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except (OSError, ValueError):
        return 0
