"""Pacing a pipelined Update on the wire: ``Lockstep`` keeps a stub's Updates of one
step to its shards in step (``psfw.runtime.link_connection`` waits on it before each
message it sends); ``Credit`` keeps one Update's slices no further ahead of the
shard's answers than a window (the Update's messages wait on it as they are made)."""

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


class Credit:
    """One pipelined Update's slices in flight: its next slice message is made only
    while the bytes of slices sent, less those the shard has answered, are within
    ``window``. A shard answers a slice once every process of the group has sent
    it, so a process that runs ahead of the others at one shard is held there, and
    its link carries what the shards that wait for it need; without it the answers
    of a shard lag the fastest process, and the step ends with the link down
    carrying the backlog while the link up is idle. Bytes are counted as the shard
    answers them: ``ratio`` is the request's bytes for one byte of answer (a half
    where the gradients travel as bfloat16).

    The window holds two of the largest slices at least (a slice is answered only
    once it is whole), and what the answer brings in ``SPAN_S`` at the pace it has
    come so far: a fast link keeps its answers flowing through the delays of the
    processes' threads. A shard that answers nothing for ``STALL_S`` (one that
    answers only at the end: a step it had complete already) is not waited for
    again in that attempt; nor is one whose answer is not read while the request
    is sent (TLS)."""

    STALL_S = 1.0
    SPAN_S = 0.1

    def __init__(self, window: int, ratio: float = 1.0):
        self.window, self.ratio = window, ratio
        self._answered = threading.Condition()
        self.begin(0.0, waits=False)

    def begin(self, deadline: float, waits: bool = True) -> None:
        """An attempt of the Update begins (nothing sent or answered yet), to end by
        ``deadline``; ``waits`` False: its answer is read only after the request,
        so its messages never wait."""
        self.deadline = deadline
        self.sent = 0.0  # in the answer's bytes
        self.answered = 0
        self.first = None  # when the first answer came
        self.waited = not waits  # True: sent without waiting from now on

    def answer(self, nbytes: int) -> None:
        """The shard's answer brought ``nbytes`` more (in the link's reading thread)."""
        with self._answered:
            if self.first is None:
                self.first = time.monotonic()
            self.answered += nbytes
            self._answered.notify()

    def release(self) -> None:
        """No more answers will come (the attempt failed, or was refused): the
        messages left go without waiting."""
        with self._answered:
            self.waited = True
            self._answered.notify()

    def send(self, nbytes: int) -> None:
        """Before a message of ``nbytes`` of slices is sent: wait for room for it."""
        more = nbytes / self.ratio
        with self._answered:
            since = time.monotonic()  # when the answer last moved
            while not self.waited and self.sent + more - self.answered > self._room():
                left = min(since + self.STALL_S, self.deadline) - time.monotonic()
                if left <= 0:
                    self.waited = True
                    break
                before = self.answered
                self._answered.wait(left)
                if self.answered != before:
                    since = time.monotonic()
            self.sent += more

    def _room(self) -> float:
        """The window now: at least ``window``, and ``SPAN_S`` of the answer's pace."""
        if self.first is None:
            return self.window
        pace = self.answered / max(time.monotonic() - self.first, self.SPAN_S)
        return max(self.window, pace * self.SPAN_S)


def _unsent(sock: socket.socket) -> int:
    """The bytes a socket holds that its peer has not acknowledged yet (0 once closed)."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except (OSError, ValueError):
        return 0
