"""A shard's same-host link: Updates over an abstract Unix socket (see
``psfw.protocol.local_link`` for why and for the frames).

The listener serves each connection on the shard's event loop, one call at a time,
through the same servicer code as the gRPC Update: the same checks, counts, refusal
log and answers. It checks the bearer token once, in the connection's HELLO.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from psfw.base.errors import WireError
from psfw.proto import ps_pb2 as pb
from psfw.protocol.frames import Frame, frame_deserializer
from psfw.protocol.local_link import (
    END,
    HELLO,
    MESSAGE,
    OK,
    LinkBroken,
    error_frame,
    frame,
    read_frame,
    socket_address,
    socket_name,
    token_refusal,
)
from psfw.services.servicer import ParameterServerServicer

log = logging.getLogger("psfw.server")

UPDATE_REQUEST = frame_deserializer(pb.UpdateRequest)
PEER = "same-host link"  # how the refusal log names a caller on this host


class LocalListener:
    """Serves ``servicer``'s Update on an abstract Unix socket (``name``, once started)."""

    def __init__(self, servicer: ParameterServerServicer, token: str | None):
        self.servicer = servicer
        self._expected = (token or "").encode()
        self.name = ""
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task] = set()
        self._busy: set[asyncio.Task] = set()  # connections in a call
        self._closing = False

    async def start(self) -> str:
        name = socket_name()
        self._server = await asyncio.start_unix_server(self._serve, socket_address(name))
        self.name, self._closing = name, False
        return name

    async def stop(self, grace: float | None = None) -> None:
        """Stop listening; let calls in flight finish within ``grace`` seconds (None:
        as long as they take), then end every connection. A call cut off is sent
        again by its stub over gRPC, and the shard adds a contribution once."""
        if self._server is None:
            return
        self._server.close()
        self._closing = True
        await asyncio.sleep(0)  # a connection accepted just now starts, sees _closing and ends
        for task in self._connections - self._busy:
            task.cancel()  # idle: waiting for a next call
        if self._busy:
            await asyncio.wait(list(self._busy), timeout=grace)
        for task in self._connections:
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await asyncio.sleep(0)  # the transports close their sockets on the loop's next round
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing:
            writer.transport.abort()
            return
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            if await self._hello(reader, writer):
                while not self._closing and await self._call(reader, writer, task):
                    pass
        except (LinkBroken, ConnectionError) as err:
            log.info("shard %d: a same-host link ended: %s", self.servicer.store.shard, err)
        except asyncio.CancelledError:
            pass  # the shard stops: the connection's task ends here, and the connection with it
        except Exception:  # a bug: logged once; the stub goes on over gRPC
            log.exception("shard %d: the same-host link failed", self.servicer.store.shard)
        finally:
            self._connections.discard(task)
            if self._closing:  # a stopping shard drops what is unsent
                writer.transport.abort()
            else:
                writer.close()  # not awaited: the peer may be gone

    async def _hello(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        kind, token = await read_frame(reader)
        if kind != HELLO:
            raise LinkBroken(f"a connection began with frame kind {kind}, not HELLO")
        refusal = token_refusal(token, self._expected)
        if refusal is not None:
            self.servicer.refused(PEER, "Update", refusal.code, refusal.message)
            writer.write(error_frame(refusal))
            await writer.drain()
            return False
        writer.write(frame(OK))
        await writer.drain()
        return True

    async def _call(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, task: asyncio.Task) -> bool:
        """Serve one Update; False once the stub has closed the connection."""
        try:
            kind, payload = await read_frame(reader)
        except LinkBroken:
            if reader.at_eof():
                return False  # closed between calls: the stub is done
            raise
        self._busy.add(task)
        try:
            return await self._answer(reader, writer, kind, payload)
        finally:
            self._busy.discard(task)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, kind: int, payload: bytes):
        messages = []
        while kind == MESSAGE:
            messages.append(UPDATE_REQUEST(payload))
            kind, payload = await read_frame(reader)
        if kind != END:
            raise LinkBroken(f"frame kind {kind} inside a call")
        try:
            async with self.servicer.served("Update", lambda: PEER):
                result, shared = await self.servicer.apply_update(_each(messages))
            replies = [frame(MESSAGE, reply) async for reply in self.servicer.update_replies(result, shared)]
        except WireError as err:
            writer.write(error_frame(err))
        else:
            writer.writelines([*replies, frame(END)])
        await writer.drain()
        return True


async def _each(messages: list[Frame]) -> AsyncIterator[Frame]:
    for message in messages:
        yield message


__all__ = ["LocalListener"]
