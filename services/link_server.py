"""A shard's link: Put, Get and Update over a socket beside gRPC (see
``psfw.protocol.link`` for why and for the frames).

One listener, two sockets: an abstract Unix socket for clients on this host and a
TCP port of the gRPC host for the others. A thread accepts connections on both and
each connection has a thread of its own that reads a whole call straight into its
buffers, hands it to the shard's event loop, where the request core serves it (the
same checks, counts, refusal log and answers as over gRPC), and sends the answer. It
checks the bearer token once, in the connection's HELLO; with TLS, each connection is
wrapped in TLS (the shard's certificate, and the client CA it requires) first.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import secrets
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable

import grpc

from psfw.base.errors import WireError
from psfw.protocol.chunks import ChunkedMessage
from psfw.protocol.link import (
    CALL,
    END,
    HELLO,
    MESSAGE,
    METHODS,
    OK,
    KeptPages,
    LinkBroken,
    LinkClosed,
    error_frame,
    framed,
    fresh_buffer,
    listen_tcp,
    listen_unix,
    recv_frame,
    send_pieces,
    socket_name,
    token_refusal,
)
from psfw.services.pipelined import UPDATE_REQUEST, pipelined
from psfw.services.requests import ShardRequests

log = logging.getLogger("psfw.server")

HELLO_S = 10.0  # a client says its whole HELLO (and does its TLS handshake) at once after connecting
HELLO_BYTES = 4096  # a token is shorter
FRAME_S = 120.0  # the most one frame of a call's request may take
MAX_CONNECTIONS = 256  # more are closed at once (their clients go on over gRPC)
MAX_GREETING = 32  # connections that have not said a HELLO yet: more are closed at once
ACCEPT_POLL_S = 1.0  # how soon the accepting thread notices a stop where shutdown does not wake it
ACCEPT_RETRY_S = 0.1  # after an accept that failed (out of files, say): not a busy loop

__all__ = ["LinkListener"]


class LinkListener:
    """Serves ``requests``' Put, Get and Update on a Unix socket (``socket``) and a
    TCP port (``port``), once started; with ``tls`` (a server context) over TLS."""

    def __init__(self, requests: ShardRequests, token: str | None, tls: ssl.SSLContext | None = None):
        self.requests = requests
        self._expected = (token or "").encode()
        self._tls = tls
        self.port, self.socket = 0, ""
        self.id = ""  # new at each start: a client that reaches another shard's link there knows
        self._listening: list[socket.socket] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._greeting = 0  # connections that have not passed their HELLO yet
        self._held = 0  # bytes of requests read and not yet served, over all connections
        self._busy: dict[socket.socket, concurrent.futures.Future | None] = {}  # connections in a call
        # a connection's thread that sends a pipelined Update's answer while the request arrives
        self._writers: dict[socket.socket, concurrent.futures.ThreadPoolExecutor] = {}
        self._idle = threading.Condition(self._lock)  # told when a call ends
        self._accepting: threading.Thread | None = None
        self._closing = False
        self._cut = False  # the stop's grace is over: calls still running are cancelled

    async def start(self, host: str | None, port: int = 0) -> None:
        """Listen on this host's Unix socket and, unless ``host`` is None, on ``host``
        (the gRPC listen host) at ``port`` (0: a free one). Raises OSError when the
        TCP port cannot be had; a Unix socket that cannot (no abstract sockets here)
        leaves clients of this host on TCP or gRPC."""
        self._loop = asyncio.get_running_loop()
        self.id, self._closing, self._cut = secrets.token_hex(16), False, False
        try:
            name = socket_name()
            self._listening.append(await asyncio.to_thread(listen_unix, name))
            self.socket = name
        except OSError as err:
            log.info("shard %d: no Unix socket for the link (%s)", self.requests.store.shard, err)
        if host is not None:
            try:
                tcp = await asyncio.to_thread(listen_tcp, host, port)
            except BaseException:
                self._close_listening()
                raise
            self._listening.append(tcp)
            self.port = tcp.getsockname()[1]
        self._accepting = threading.Thread(target=self._accept, name="psfw-link-accept", daemon=True)
        self._accepting.start()

    async def stop(self, grace: float | None = None) -> None:
        """Stop listening; let calls in flight finish within ``grace`` seconds (None:
        as long as they take), then end every connection. A call cut off is sent
        again by its client over gRPC, and the shard adds a contribution once."""
        if self._accepting is None:
            return
        with self._lock:
            self._closing = True
            for conn in [c for c in self._connections if c not in self._busy]:
                _shut(conn)  # idle: its thread ends at once
        for sock in self._listening:
            _shut(sock)  # Linux: a blocked accept returns at once (elsewhere: within ACCEPT_POLL_S)
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
            await asyncio.to_thread(thread.join, 30)
        self._close_listening()
        self._accepting, self.port, self.socket = None, 0, ""

    def _close_listening(self) -> None:
        for sock in self._listening:
            sock.close()
        self._listening = []

    def _drain(self, grace: float | None) -> None:
        with self._idle:
            self._idle.wait_for(lambda: not self._busy, grace)

    def _accept(self) -> None:
        while not self._closing:
            try:
                ready, _, _ = select.select(self._listening, [], [], ACCEPT_POLL_S)
            except (OSError, ValueError):
                return
            for sock in ready:
                try:
                    conn, peer = sock.accept()
                except (BlockingIOError, TimeoutError):
                    continue
                except OSError as err:  # a connection that failed before it was taken, no file left
                    if self._closing:
                        return
                    log.warning("shard %d: the link could not take a connection: %s", self.requests.store.shard, err)
                    time.sleep(ACCEPT_RETRY_S)  # the listener goes on: Describe names it still
                    continue
                self._take(conn, _peer_name(sock, peer))

    def _take(self, conn: socket.socket, name: str) -> None:
        with self._lock:
            if self._closing or len(self._connections) >= MAX_CONNECTIONS or self._greeting >= MAX_GREETING:
                conn.close()
                return
            self._greeting += 1
            thread = threading.Thread(target=self._serve, args=(conn, name), name="psfw-link", daemon=True)
            self._connections[conn] = thread
        thread.start()

    def _serve(self, conn: socket.socket, name: str) -> None:
        try:
            try:  # every greeting ends here, even one whose socket fails at once
                conn.setblocking(True)
                if conn.family != socket.AF_UNIX:
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self._tls is not None:
                    conn = self._secured(conn)
                    conn.do_handshake()  # within HELLO_S
                welcome = self._hello(conn, name)
            finally:
                with self._lock:
                    self._greeting -= 1
            if welcome:
                while self._call(conn, name):
                    pass
        except (LinkBroken, OSError) as err:  # ssl.SSLError is an OSError
            if not self._closing:
                log.info("shard %d: a %s ended: %s", self.requests.store.shard, name, err)
        except concurrent.futures.CancelledError:
            pass  # the shard's loop stopped the call: the connection ends
        except Exception:  # a bug: logged once; the client goes on over gRPC
            log.exception("shard %d: the %s failed", self.requests.store.shard, name)
        finally:
            with self._lock:
                self._connections.pop(conn, None)
                self._busy.pop(conn, None)
                writer = self._writers.pop(conn, None)
                self._idle.notify_all()
            if writer is not None:
                writer.shutdown(wait=False)
            conn.close()

    def _secured(self, conn: socket.socket) -> ssl.SSLSocket:
        """The connection in TLS, its handshake still to come (within HELLO_S). The
        TLS socket takes over the connection (the one it took over is closed) before
        the handshake, in the listener's list too: a stop shuts a connection whose
        handshake never ends."""
        conn.settimeout(HELLO_S)
        secured = self._tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        with self._lock:
            self._connections[secured] = self._connections.pop(conn)
            if self._closing:
                _shut(secured)  # the stop has shut the others already
        return secured

    def _hello(self, conn: socket.socket, name: str) -> bool:
        kind, token = recv_frame(conn, HELLO_BYTES, time.monotonic() + HELLO_S)
        if kind != HELLO:
            raise LinkBroken(f"a connection began with frame kind {kind}, not HELLO")
        refusal = token_refusal(bytes(token), self._expected)
        if refusal is not None:
            self.requests.refused(name, "", refusal.code, refusal.message)
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
            counted = [0]  # the request's bytes held so far: let go once it is served
            frames = self._frames(conn, KeptPages().take if method == "Put" else fresh_buffer, counted)
            try:
                first = next(frames, None)
                # a pipelined Update is answered while it arrives: reading and writing at
                # once, which one TLS connection cannot do from two threads
                streams = method == "Update" and self._tls is None and first is not None
                head = UPDATE_REQUEST(first) if streams else None
                if head is not None and pipelined(head):
                    outcome = self._stream(conn, head, frames, name)
                else:
                    payloads = [first, *frames] if first is not None else []
                    outcome = self._serve_whole(conn, method, payloads, name)
            finally:
                self._release(counted[0])
            conn.settimeout(FRAME_S)  # a client that stops reading the answer lets go of the thread
            if isinstance(outcome, WireError):
                send_pieces(conn, [error_frame(outcome)])
            elif outcome is not None:
                # values go from the shard's arrays as they are: ``outcome`` holds
                # them (and so keeps an update from writing over them) until sent
                for pieces in outcome.replies:
                    send_pieces(conn, framed(MESSAGE, pieces))
            if not isinstance(outcome, WireError):
                send_pieces(conn, framed(END, []))
        finally:
            with self._lock:
                self._busy.pop(conn, None)
                self._idle.notify_all()
        return True

    def _serve_whole(self, conn: socket.socket, method: str, payloads: list[memoryview], name: str):
        """A call read whole: its answer (an Answer) or its refusal (a WireError)."""
        return self._running(conn, self.requests.answer(method, payloads, name)).result()

    def _stream(self, conn: socket.socket, first: ChunkedMessage, frames, name: str) -> WireError | None:
        """A pipelined Update: its messages go to the shard's loop as they arrive,
        and a thread of its own sends the answer's messages as the loop makes them;
        returns None once every one is sent (the END is the caller's), or the
        refusal."""
        loop = self._loop
        feed: asyncio.Queue = asyncio.Queue()
        with self._lock:
            writer = self._writers.get(conn)
            if writer is None:
                writer = self._writers[conn] = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="psfw-link-answer"
                )
        sends: list[concurrent.futures.Future] = []

        def write(messages: Callable[[], Iterable[list]]) -> None:  # the writer's: encoded there
            for pieces in messages():
                send_pieces(conn, framed(MESSAGE, pieces))

        def send(messages: Callable[[], Iterable[list]]) -> None:  # on the loop, in the answer's order
            try:
                sends.append(writer.submit(write, messages))
            except RuntimeError:  # the connection has ended: its writer with it
                raise WireError(grpc.StatusCode.UNAVAILABLE, "the link connection closed") from None

        serving = self._running(conn, self.requests.answer_stream(first, feed, send, name))
        try:
            try:
                for payload in frames:
                    loop.call_soon_threadsafe(feed.put_nowait, payload)
            except BaseException:
                serving.cancel()
                raise
            finally:
                loop.call_soon_threadsafe(feed.put_nowait, None)
            outcome = serving.result()
            for sent in list(sends):
                sent.result()  # every answer's message is out, or the connection failed
            return outcome
        except BaseException:
            for sent in sends:
                sent.cancel()
            raise

    def _running(self, conn: socket.socket, coroutine) -> concurrent.futures.Future:
        """A call's coroutine running on the shard's loop, where a stop can cancel it."""
        serving = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        with self._lock:
            self._busy[conn] = serving
            cut = self._cut
        if cut:
            serving.cancel()  # the stop's grace is over already
        return serving

    def _frames(self, conn: socket.socket, buffer, counted: list[int]):
        """A call's messages, up to its END, each frame within FRAME_S and in a
        buffer of ``buffer`` (a Put's are kept: ``KeptPages``): what all connections
        hold at once stays within the shard's request limit (``counted[0]``: this
        call's part, for the caller to let go)."""
        while True:
            kind, payload = recv_frame(conn, deadline=time.monotonic() + FRAME_S, buffer=buffer)
            if kind == END:
                return
            if kind != MESSAGE:
                raise LinkBroken(f"frame kind {kind} inside a call")
            with self._lock:
                if self._held + len(payload) > self.requests.max_request_bytes:
                    raise LinkBroken(
                        f"calls of {self._held + len(payload)} bytes at once: over the shard's request limit"
                    )
                self._held += len(payload)
            counted[0] += len(payload)
            yield payload

    def _release(self, nbytes: int) -> None:
        with self._lock:
            self._held -= nbytes


def _peer_name(listening: socket.socket, peer) -> str:
    """How the refusal log names a caller: its address, or this host."""
    if listening.family == socket.AF_UNIX:
        return "link from this host"
    return f"link from {peer[0]}:{peer[1]}"


def _shut(conn: socket.socket) -> None:
    """End a connection's reads and writes (its thread's blocking call returns). A
    TLS socket's own shutdown would also drop its TLS state, under a thread that may
    be about to use it (its handshake): the socket's is shut instead."""
    try:
        socket.socket.shutdown(conn, socket.SHUT_RDWR)
    except OSError:
        pass
