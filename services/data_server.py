"""A shard's data link: Put, Get and Update over TCP beside gRPC (see
``psfw.protocol.data_link`` for why and for the frames).

A thread accepts connections and each connection has a thread of its own that reads
a whole call straight into its buffers, hands it to the shard's event loop, where the
same servicer code as the gRPC handlers serves it (checks, counts, refusal log,
answers), and sends the answer. It checks the bearer token once, in the connection's
HELLO. A shard with TLS does not start it: the link has no encryption.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import NamedTuple

from psfw.base.errors import WireError
from psfw.proto import ps_pb2 as pb
from psfw.protocol.data_link import METHODS, KeptPages, LinkClosed, framed, fresh_buffer, recv_frame, send_pieces
from psfw.protocol.frames import Frame, Malformed, frame_deserializer, frame_encoder, message_deserializer
from psfw.protocol.local_link import CALL, END, HELLO, MESSAGE, OK, LinkBroken, error_frame, token_refusal
from psfw.services.answers import get_replies
from psfw.services.servicer import ParameterServerServicer

log = logging.getLogger("psfw.server")

HELLO_S = 10.0  # a client says its whole HELLO at once after connecting
HELLO_BYTES = 4096  # a token is shorter
FRAME_S = 120.0  # the most one frame of a call's request may take
MAX_CONNECTIONS = 256  # more are closed at once (their clients go on over gRPC)
MAX_GREETING = 32  # connections that have not said a HELLO yet: more are closed at once
ACCEPT_POLL_S = 1.0  # how soon the accepting thread notices a stop where shutdown does not wake it
DECODERS = {
    "Put": frame_deserializer(pb.PutRequest),
    "Update": frame_deserializer(pb.UpdateRequest),
}
GET_REQUEST = message_deserializer(pb.GetRequest)
GET_PIECES = frame_encoder(pb.GetReply)

__all__ = ["DataListener"]


class DataListener:
    """Serves ``servicer``'s Put, Get and Update on a TCP port (``port``, once started)."""

    def __init__(self, servicer: ParameterServerServicer, token: str | None):
        self.servicer = servicer
        self._expected = (token or "").encode()
        self.port = 0
        self.id = ""  # new at each start: a client that reaches another shard's link on that port knows
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._greeting = 0  # connections that have not passed their HELLO yet
        self._held = 0  # bytes of requests read and not yet served, over all connections
        self._busy: dict[socket.socket, concurrent.futures.Future | None] = {}  # connections in a call
        self._idle = threading.Condition(self._lock)  # told when a call ends
        self._accepting: threading.Thread | None = None
        self._closing = False
        self._cut = False  # the stop's grace is over: calls still running are cancelled

    async def start(self, host: str, port: int = 0) -> int:
        """Listen on ``host`` (the gRPC listen host) at ``port`` (0: a free one)."""
        self._loop = asyncio.get_running_loop()
        self._sock = await asyncio.to_thread(_listen, host, port)
        self.port, self.id = self._sock.getsockname()[1], secrets.token_hex(16)
        self._closing = self._cut = False
        self._accepting = threading.Thread(target=self._accept, name="psfw-data-accept", daemon=True)
        self._accepting.start()
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Stop listening; let calls in flight finish within ``grace`` seconds (None:
        as long as they take), then end every connection. A call cut off is sent
        again by its client over gRPC, and the shard adds a contribution once."""
        if self._sock is None:
            return
        with self._lock:
            self._closing = True
            for conn in [c for c in self._connections if c not in self._busy]:
                _shut(conn)  # idle: its thread ends at once
        _shut(self._sock)  # Linux: a blocked accept returns at once (elsewhere: within ACCEPT_POLL_S)
        await asyncio.to_thread(self._drain, grace)
        with self._lock:
            threads = list(self._connections.values())
            for conn in self._connections:
                _shut(conn)
            self._cut = True
            running = [serving for serving in self._busy.values() if serving is not None]
        for serving in running:  # outside the lock: a cancelled call's callbacks take it
            serving.cancel()  # past the grace: as gRPC cancels its calls
        for thread in [*threads, self._accepting]:
            if thread is not None:
                await asyncio.to_thread(thread.join, 30)
        self._sock.close()
        self._sock, self._accepting, self.port = None, None, 0

    def _drain(self, grace: float | None) -> None:
        with self._idle:
            self._idle.wait_for(lambda: not self._busy, grace)

    def _accept(self) -> None:
        sock = self._sock
        while not self._closing:
            try:
                conn, peer = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                if self._closing or len(self._connections) >= MAX_CONNECTIONS or self._greeting >= MAX_GREETING:
                    conn.close()
                    continue
                self._greeting += 1
                thread = threading.Thread(target=self._serve, args=(conn, peer), name="psfw-data-link", daemon=True)
                self._connections[conn] = thread
            thread.start()

    def _serve(self, conn: socket.socket, peer: tuple) -> None:
        name = f"data link from {peer[0]}:{peer[1]}"
        try:
            conn.setblocking(True)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                welcome = self._hello(conn, name)
            finally:
                with self._lock:
                    self._greeting -= 1
            if welcome:
                while self._call(conn, name):
                    pass
        except (LinkBroken, OSError) as err:
            if not self._closing:
                log.info("shard %d: a %s ended: %s", self.servicer.store.shard, name, err)
        except concurrent.futures.CancelledError:
            pass  # the shard's loop stopped the call: the connection ends
        except Exception:  # a bug: logged once; the client goes on over gRPC
            log.exception("shard %d: the %s failed", self.servicer.store.shard, name)
        finally:
            with self._lock:
                self._connections.pop(conn, None)
                self._busy.pop(conn, None)
                self._idle.notify_all()
            conn.close()

    def _hello(self, conn: socket.socket, name: str) -> bool:
        kind, token = recv_frame(conn, HELLO_BYTES, time.monotonic() + HELLO_S)
        if kind != HELLO:
            raise LinkBroken(f"a connection began with frame kind {kind}, not HELLO")
        refusal = token_refusal(bytes(token), self._expected)
        if refusal is not None:
            self.servicer.refused(name, "", refusal.code, refusal.message)
            send_pieces(conn, [error_frame(refusal)])
            return False
        send_pieces(conn, framed(OK, [self.id.encode()]))
        return True

    def _call(self, conn: socket.socket, name: str) -> bool:
        """Serve one call; False once the client has closed the connection."""
        conn.settimeout(None)  # between calls a connection may idle as long as it likes
        try:
            kind, method = recv_frame(conn, 64)
        except LinkClosed:
            return False  # closed between calls: the client is done
        with self._lock:
            if self._closing:
                return False
            self._busy[conn] = None
        try:
            method = bytes(method).decode("ascii", "replace")
            if kind != CALL or method not in METHODS:
                raise LinkBroken(f"a call began with frame kind {kind} ({method!r}), not a CALL of {METHODS}")
            payloads = self._request(conn, KeptPages().take if method == "Put" else fresh_buffer)
            held = sum(len(p) for p in payloads)
            serving = asyncio.run_coroutine_threadsafe(self._served(method, payloads, name), self._loop)
            serving.add_done_callback(lambda _: self._release(held))
            with self._lock:
                self._busy[conn] = serving
                cut = self._cut
            if cut:
                serving.cancel()  # the stop's grace is over already
            outcome = serving.result()
            conn.settimeout(FRAME_S)  # a client that stops reading the answer lets go of the thread
            if isinstance(outcome, WireError):
                send_pieces(conn, [error_frame(outcome)])
            else:
                # a Get's values go from the shard's arrays as they are: ``outcome``
                # holds them (and so keeps an update from writing over them) until sent
                for pieces in outcome.replies:
                    send_pieces(conn, framed(MESSAGE, pieces))
                send_pieces(conn, framed(END, []))
        finally:
            with self._lock:
                self._busy.pop(conn, None)
                self._idle.notify_all()
        return True

    def _request(self, conn: socket.socket, buffer) -> list[memoryview]:
        """A call's messages, up to its END, each frame within FRAME_S and in a
        buffer of ``buffer`` (a Put's are kept: ``KeptPages``): what all connections
        hold at once stays within the shard's request limit."""
        payloads, total = [], 0
        try:
            while True:
                kind, payload = recv_frame(conn, deadline=time.monotonic() + FRAME_S, buffer=buffer)
                if kind == END:
                    return payloads
                if kind != MESSAGE:
                    raise LinkBroken(f"frame kind {kind} inside a call")
                with self._lock:
                    if self._held + len(payload) > self.servicer.max_request_bytes:
                        raise LinkBroken(
                            f"calls of {self._held + len(payload)} bytes at once: over the shard's request limit"
                        )
                    self._held += len(payload)
                total += len(payload)
                payloads.append(payload)
        except BaseException:
            self._release(total)
            raise

    def _release(self, nbytes: int) -> None:
        with self._lock:
            self._held -= nbytes

    async def _served(self, method: str, payloads: list[memoryview], name: str) -> Answer | WireError:
        """Serve a call on the shard's loop, as the gRPC handler would."""
        servicer = self.servicer
        try:
            if method == "Get":
                request = GET_REQUEST(bytes(payloads[0])) if len(payloads) == 1 else Malformed("a Get is one message")
                async with servicer.served("Get", lambda: name, request):
                    step, values, rows = await servicer.read_values(request)
                    return Answer([GET_PIECES(frame) for frame in get_replies(step, values, rows)], values)
            frames = [DECODERS[method](payload) for payload in payloads]
            async with servicer.served(method, lambda: name):
                if method == "Put":
                    return Answer([[(await servicer.apply_put(_each(frames))).SerializeToString()]])
                result, shared = await servicer.apply_update(_each(frames))
                if shared:  # through shared memory: the values are in the region already
                    return Answer([[reply] async for reply in servicer.update_replies(result, shared)])
                return Answer(servicer.answer_pieces(result), result)
        except WireError as err:
            return err


class Answer(NamedTuple):
    """A call's answer: its messages as pieces, and what they are views of."""

    replies: list[list[bytes | memoryview]]
    holds: object = None


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host`` (the gRPC listen host: a name, an IPv4 or an
    IPv6 address, the wildcard of all interfaces)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(64)
        sock.settimeout(ACCEPT_POLL_S)
    except BaseException:
        sock.close()
        raise
    return sock


def _shut(conn: socket.socket) -> None:
    """End a connection's reads and writes (its thread's blocking call returns)."""
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


async def _each(frames: list[Frame]) -> AsyncIterator[Frame]:
    for frame in frames:
        yield frame
