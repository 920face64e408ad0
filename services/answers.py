"""A shard's answers as messages: a Get's, an Update's (encoded a batch at a time
for gRPC, shared by a group's processes when small; as pieces that are views of the
values for the link), and answers written into a stub's shared-memory region."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import numpy as np

from psfw.base.errors import mark_retrieved
from psfw.proto import ps_pb2 as pb
from psfw.protocol.chunks import ChunkedMessage, chunked_encoder, chunked_serializer, encode_chunks
from psfw.protocol.layout import SliceKey
from psfw.protocol.row_wire import row_pieces
from psfw.protocol.shm import Region
from psfw.protocol.wire import batched, encoded_ahead
from psfw.services.rounds import UpdateResult

UPDATE_REPLY = chunked_serializer(pb.UpdateReply)
UPDATE_PIECES = chunked_encoder(pb.UpdateReply)
SHARED_REPLY_BYTES = 64 << 20  # up to this, one encoded answer is shared by the group's processes
ANSWER_BATCH_BYTES = 4 << 20  # an answer is encoded this much at a time
WRITE_THROUGH_FILE_BYTES = 64 << 20  # from this, answers through shared memory bypass the mapping
INLINE_WRITE_BYTES = 8 << 20  # an answer this small is written on the event loop: less than a thread hop


def get_replies(step: int, values: dict, rows: dict) -> Iterator[ChunkedMessage]:
    """A Get's answer: the table rows, then the values."""
    for pieces in row_pieces(rows):
        yield ChunkedMessage(pb.GetReply(step=step, rows=pieces), [])
    for chunks in encode_chunks((k, i, v) for (k, i), v in values.items()):
        yield ChunkedMessage(pb.GetReply(step=step), chunks)


async def write_answer(region: Region, offsets: dict[SliceKey, int], values: dict) -> None:
    """Write an answer into the stub's region: in a thread unless it is small."""
    if sum(v.nbytes for v in values.values()) <= INLINE_WRITE_BYTES:
        _write_values(region, offsets, values)
    else:
        await asyncio.to_thread(_write_values, region, offsets, values)


def _write_values(region: Region, offsets: dict[SliceKey, int], values: dict) -> None:
    """The answer into the stub's region: a large one through the file, so that it
    never counts in the shard's resident memory (see Region.write)."""
    through_file = sum(v.nbytes for v in values.values()) >= WRITE_THROUGH_FILE_BYTES
    for key, value in values.items():
        region.write(offsets[key], np.asarray(value), through_file)


def reply_head(result: UpdateResult) -> pb.UpdateReply:
    """An Update's answer without its values: steps and the group's metrics."""
    return pb.UpdateReply(
        step=result.step,
        slowest_step=result.slowest_step,
        metrics=result.metrics,
        rows=result.rows,
        stop_at=result.stop_at,
    )


def answer_pieces(result: UpdateResult, keys: list[SliceKey]) -> list[list[bytes | memoryview]]:
    """The answer's messages for ``keys``, each as pieces whose tensor data are
    views of the shard's values (``chunked_encoder``)."""
    head = reply_head(result)
    values = result.values
    chunked = list(encode_chunks((k, i, values[(k, i)]) for k, i in keys)) or [[]]  # a shard with no slices
    return [UPDATE_PIECES(ChunkedMessage(head, c)) for c in chunked]


def slice_pieces(step: int, key: SliceKey, value) -> list[list[bytes | memoryview]]:
    """One slice's value after the step, as the answer's messages of a pipelined
    Update (the steps and metrics come in its last message)."""
    chunks = encode_chunks([(key[0], key[1], value)])
    return [UPDATE_PIECES(ChunkedMessage(pb.UpdateReply(step=step), c)) for c in chunks]


def _encode_answer(result: UpdateResult, keys: list[SliceKey]) -> list[bytes]:
    return [b"".join(pieces) for pieces in answer_pieces(result, keys)]


async def encoded_answer(result: UpdateResult, share: bool) -> AsyncIterator[bytes]:
    """The encoded answer, a batch at a time, the next batch encoded (in a thread)
    while this one is sent. A small answer to a whole group is encoded once, all
    batches at once, and every process of the group gets the same bytes; a large
    one is encoded a batch ahead, so that only two batches are ever held as bytes."""
    batches = batched(sorted(result.values), lambda key: result.values[key].nbytes, ANSWER_BATCH_BYTES)

    def encode(keys: list[SliceKey], index: int) -> list[bytes]:
        return _encode_answer(result, keys)

    if share and result.shared:
        if "reply" not in result.cache:  # the first waiter encodes
            loop = asyncio.get_running_loop()
            result.cache["reply"] = [loop.run_in_executor(None, encode, keys, 0) for keys in batches]
            for encoded in result.cache["reply"]:
                encoded.add_done_callback(mark_retrieved)
        for encoded in result.cache["reply"]:
            for reply in await asyncio.shield(encoded):  # a waiter that leaves does not cancel it for the others
                yield reply
        return
    async for reply in encoded_ahead(batches, encode):
        yield reply
