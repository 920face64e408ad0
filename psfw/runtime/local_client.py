"""A stub's end of the same-host link (``psfw.protocol.local_link``): one Unix
socket to one shard, one call at a time."""

from __future__ import annotations

import asyncio
import contextlib

from psfw.base.errors import WireError
from psfw.proto import ps_pb2 as pb
from psfw.protocol.frames import Frame, frame_deserializer
from psfw.protocol.local_link import (
    END,
    ERROR,
    HELLO,
    MESSAGE,
    OK,
    LinkBroken,
    LinkTimeout,
    frame,
    read_error,
    read_frame,
    socket_address,
)

UPDATE_REPLY = frame_deserializer(pb.UpdateReply)
CONNECT_S = 5.0  # a shard on this host answers a HELLO at once, or not at all


class LocalLink:
    """An open link to a shard on this host. ``call`` raises WireError for the
    shard's refusal, LinkBroken (a ConnectionError) when the link failed: then it
    is closed, and the caller goes on over gRPC."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader, self._writer = reader, writer
        self._lock = asyncio.Lock()
        self.closed = False

    @classmethod
    async def open(cls, name: str, token: str | None) -> LocalLink:
        """Connect to the socket a shard's Describe answer named, and say the token.
        Raises ConnectionError (or OSError) if the shard cannot be reached there,
        WireError if it refuses the token."""
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(socket_address(name)), CONNECT_S)
        link = cls(reader, writer)
        try:
            writer.write(frame(HELLO, (token or "").encode()))
            await writer.drain()
            kind, payload = await asyncio.wait_for(read_frame(reader), CONNECT_S)
            if kind == ERROR:
                raise read_error(payload)
            if kind != OK:
                raise LinkBroken(f"the shard answered HELLO with frame kind {kind}")
        except BaseException:
            await link.close()
            raise
        return link

    async def call(self, messages: list[bytes], timeout: float) -> list[Frame]:
        """Send one Update's encoded messages; the answer's messages, decoded. A call
        that fails or is cancelled midway leaves the link closed (its state is
        unknown); the shard adds a contribution sent again once."""
        async with self._lock:
            if self.closed:
                raise LinkBroken("the link is closed")
            try:
                return await asyncio.wait_for(self._exchange(messages), timeout)
            except WireError:
                raise
            except BaseException as err:
                await self.close()
                if isinstance(err, TimeoutError):
                    raise LinkTimeout(f"no answer in {timeout:.0f} s") from None
                raise

    async def _exchange(self, messages: list[bytes]) -> list[Frame]:
        self._writer.writelines([*(frame(MESSAGE, m) for m in messages), frame(END)])
        await self._writer.drain()
        replies = []
        while True:
            kind, payload = await read_frame(self._reader)
            if kind == END:
                return replies
            if kind == ERROR:
                raise read_error(payload)
            if kind != MESSAGE:
                raise LinkBroken(f"frame kind {kind} in an answer")
            replies.append(UPDATE_REPLY(payload))

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()
