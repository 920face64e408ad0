"""Messages that carry tensor bytes: chunks of slices, encoded as protobuf.

``encode_chunks`` packs slices into messages of at most ``chunk_bytes`` of data (small
slices share a message, large ones span several) as ``ChunkedMessage``s; ``chunked_serializer`` and
``chunked_deserializer`` turn such messages into protobuf bytes and back without
copying the tensor data through the protobuf runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import numpy as np
from google.protobuf.message import DecodeError, Message

from psfw.proto import ps_pb2 as pb

CHUNK_BYTES = 1 << 20


class Chunk(NamedTuple):
    """One piece of a slice: the wire's ``psfw.v1.Chunk`` with ``data`` as a view."""

    key: str
    slice: int
    dtype: str
    shape: tuple[int, ...]
    offset: int
    data: memoryview | bytes


class ChunkedMessage(NamedTuple):
    """One streamed message: its scalar fields (a protobuf message whose ``chunks``
    are left empty) and its chunks."""

    header: Message | None
    chunks: list[Chunk]
    error: str = ""  # set instead of raising when the bytes do not parse


def encode_chunks(
    items: Iterable[tuple[str, int, np.ndarray]], chunk_bytes: int = CHUNK_BYTES
) -> Iterator[list[Chunk]]:
    """Group ``(key, slice, array)`` items into lists of chunks of at most
    ``chunk_bytes`` of data each; every list becomes one message. No data is copied:
    chunks are views of the arrays. Only slices larger than a message are split."""
    batch: list[Chunk] = []
    room = chunk_bytes
    for key, index, array in items:
        array = np.ascontiguousarray(array)
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        raw = memoryview(array.reshape(-1).view(np.uint8))  # any dtype (bfloat16 has no buffer format)
        dtype, shape = array.dtype.name, tuple(array.shape)
        offset, total = 0, len(raw)
        if batch and total <= chunk_bytes and total > room:
            # a slice that fits in one message is never split: the receiver then
            # keeps it as a view of the message instead of copying it together
            yield batch
            batch, room = [], chunk_bytes
        while True:
            take = min(room, total - offset)
            if take == 0 and total > 0:
                yield batch
                batch, room = [], chunk_bytes
                continue
            batch.append(Chunk(key, index, dtype, shape, offset, raw[offset : offset + take]))
            offset += take
            room -= take
            if offset >= total:
                break
    if batch:
        yield batch


# -- protobuf encoding with the bulk bytes outside the protobuf runtime ----------
#
# A chunk's ``data`` is written straight from the array and read back as a view of
# the received buffer: one copy on the sending side (the final join), none on the
# receiving side. Everything else goes through the generated protobuf classes, so
# the bytes on the wire are exactly the ``.proto`` messages.

_DATA_FIELD = pb.Chunk.DESCRIPTOR.fields_by_name["data"].number


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("malformed varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, start, value start, end, length or varint) of each field."""
    pos = 0
    while pos < len(buf):
        start = pos
        tag, pos = _read_varint(buf, pos)
        number, kind = tag >> 3, tag & 7
        if kind == 0:
            value, pos = _read_varint(buf, pos)
            yield number, start, pos, pos, value
            continue
        if kind == 1:
            size = 8
        elif kind == 5:
            size = 4
        elif kind == 2:
            size, pos = _read_varint(buf, pos)
        else:
            raise ValueError(f"unsupported wire type {kind}")
        if pos + size > len(buf):
            raise ValueError("field runs past the end of the message")
        yield number, start, pos, pos + size, size
        pos += size


ALIGN = 64  # a chunk's data starts this many bytes into its message times n (see ``chunked_encoder``)
_PAD_TAG = _varint((pb.Chunk.DESCRIPTOR.fields_by_name["pad"].number << 3) | 2)


def chunked_encoder(cls: type[Message]) -> Callable[[ChunkedMessage], list[bytes | memoryview]]:
    """The pieces of a ChunkedMessage's ``cls`` message, in order: joined, they are its bytes;
    sent as they are (``socket.sendmsg``), the tensor data is never copied. Each
    chunk's data starts at a multiple of ``ALIGN`` bytes into the message (its
    ``pad`` field fills the gap): a receiver that reads a message into an aligned
    buffer holds aligned tensors, which JAX adopts without a copy."""
    chunk_tag = _varint((cls.DESCRIPTOR.fields_by_name["chunks"].number << 3) | 2)
    data_tag = _varint((_DATA_FIELD << 3) | 2)

    def encode(message: ChunkedMessage) -> list[bytes | memoryview]:
        parts: list[bytes | memoryview] = [message.header.SerializeToString()]
        position = len(parts[0])
        for c in message.chunks:
            meta = pb.Chunk(key=c.key, slice=c.slice, dtype=c.dtype, shape=c.shape, offset=c.offset)
            size = len(c.data)
            tail = data_tag + _varint(size)
            head = meta.SerializeToString()
            head += _pad(position + len(chunk_tag), len(head) + len(tail), size) + tail
            length = _varint(len(head) + size)
            parts += [chunk_tag, length, head, c.data]
            position += len(chunk_tag) + len(length) + len(head) + size
        return parts

    return encode


def _pad(start: int, fields: int, size: int) -> bytes:
    """The pad field that makes a chunk's data start at a multiple of ALIGN: the
    chunk's length prefix starts at ``start``; its fields before the data take
    ``fields`` bytes, its data ``size``. The prefix's own length depends on the pad:
    the first length that agrees with itself wins (b"" when none would: the data
    then lies where it falls, which only costs a copy on the other side)."""
    for prefix in range(1, 11):
        base = -(start + prefix + fields) % ALIGN
        for need in (base, base + ALIGN):  # a pad field takes 0 or at least 2 bytes
            if need != 1 and len(_varint(fields + need + size)) == prefix:
                return _PAD_TAG + _varint(need - 2) + bytes(need - 2) if need else b""
    return b""


def chunked_serializer(cls: type[Message]) -> Callable[[ChunkedMessage], bytes]:
    """Serialize a ChunkedMessage as a ``cls`` message."""
    encode = chunked_encoder(cls)

    def serialize(message: ChunkedMessage | bytes) -> bytes:
        if isinstance(message, bytes):
            return message  # serialized before, e.g. one reply sent to several stubs
        return b"".join(encode(message))

    return serialize


def chunked_deserializer(cls: type[Message]) -> Callable[[bytes], ChunkedMessage]:
    """Parse a ``cls`` message into a ChunkedMessage whose chunk data are views of the buffer.

    Never raises: a message that does not parse gives a ChunkedMessage with ``error`` set,
    which the reader turns into INVALID_ARGUMENT."""
    chunk_field = cls.DESCRIPTOR.fields_by_name["chunks"].number

    def deserialize(data: bytes) -> ChunkedMessage:
        buf = memoryview(data)
        rest: list[memoryview] = []
        chunks = []
        try:
            for number, start, vstart, end, _ in _fields(buf):
                if number == chunk_field:
                    chunks.append(_parse_chunk(buf[vstart:end]))
                else:
                    rest.append(buf[start:end])
            header = cls.FromString(b"".join(rest))
        except (ValueError, DecodeError, RecursionError) as err:
            return ChunkedMessage(None, [], f"malformed {cls.__name__}: {err}")
        return ChunkedMessage(header, chunks)

    return deserialize


class Malformed(NamedTuple):
    """A request whose bytes do not parse: what ``message_deserializer`` gives
    instead of raising, so that the handler answers INVALID_ARGUMENT itself (an
    exception in a deserializer reaches the client as UNKNOWN, with a traceback in
    the server's log)."""

    error: str


def message_deserializer(cls: type[Message]) -> Callable[[bytes], Message | Malformed]:
    """Parse a ``cls`` message; never raises (see Malformed)."""

    def deserialize(data: bytes) -> Message | Malformed:
        try:
            return cls.FromString(data)
        except Exception as err:  # DecodeError, bad UTF-8, nesting too deep: all mean the same
            return Malformed(f"malformed {cls.__name__}: {err}")

    return deserialize


def _parse_chunk(buf: memoryview) -> Chunk:
    rest: list[memoryview] = []
    data: memoryview | bytes = b""
    for number, start, vstart, end, _ in _fields(buf):
        if number == _DATA_FIELD:
            data = buf[vstart:end]
        else:
            rest.append(buf[start:end])
    meta = pb.Chunk.FromString(b"".join(rest))
    return Chunk(meta.key, meta.slice, meta.dtype, tuple(meta.shape), meta.offset, data)
