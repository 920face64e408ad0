"""A shard's verbs as messages, whatever carries them (gRPC, the data link, the
same-host link): a request's messages, encoded (or as pieces, for a carrier that
sends them without joining them), and an answer put together from its messages."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterable, Iterator

import grpc
import numpy as np

from psfw.base.errors import WireError
from psfw.proto import ps_pb2 as pb
from psfw.protocol.frames import (
    Frame,
    encode_chunks,
    frame_deserializer,
    frame_encoder,
    frame_serializer,
    message_deserializer,
)
from psfw.protocol.layout import SliceKey
from psfw.protocol.messages import Fresh, Gradients, RowBlock, TableIds
from psfw.protocol.row_wire import RowCollector, pull_blocks
from psfw.protocol.wire import Assembler, Expect, batched, encoded_ahead

UPDATE_REQUEST = frame_serializer(pb.UpdateRequest)
UPDATE_PIECES = frame_encoder(pb.UpdateRequest)
PUT_PIECES = frame_encoder(pb.PutRequest)
DECODE = {"Get": frame_deserializer(pb.GetReply), "Update": frame_deserializer(pb.UpdateReply)}  # answers


def put_answer(replies: list) -> int:
    """The slices a Put's answer (one PutReply) says were stored."""
    reply = message_deserializer(pb.PutReply)(bytes(replies[0])) if len(replies) == 1 else None
    if not isinstance(reply, pb.PutReply):
        raise WireError(grpc.StatusCode.INTERNAL, "the shard's answer to a Put is not one PutReply")
    return reply.slices


def put_frames(items: list, optimizer: str, job: str, tables: str, chunk_bytes: int) -> Iterator[Frame]:
    """A Put's messages: the optimizer, job and tables in the first (which goes even
    without slices), the slices in chunks."""
    for i, chunks in enumerate(list(encode_chunks(items, chunk_bytes)) or [[]]):
        first = pb.PutRequest(optimizer=optimizer, job=job, tables=tables)
        yield Frame(first if i == 0 else pb.PutRequest(), chunks)


def assemble(frames: list[Frame], expect: Expect, into) -> Fresh:
    """An answer from its messages (values written into ``into`` where it has the slice)."""
    assembler = Assembler(expect, into=into)
    rows = RowCollector()
    head = None
    for frame in frames:
        head = assembler.add_frame(frame)
        rows.add(head.table_rows if isinstance(head, pb.UpdateReply) else head.rows)
    values = assembler.finish()
    if head is None:
        raise WireError(grpc.StatusCode.INTERNAL, "the shard answered with no message")
    return fresh_answer(head, values, rows.rows())


def fresh_answer(head, values: dict[SliceKey, np.ndarray], rows: dict[str, RowBlock]) -> Fresh:
    """The Fresh of an answer whose header is ``head`` (an UpdateReply or a GetReply)."""
    if isinstance(head, pb.UpdateReply):
        return Fresh(head.step, values, head.slowest_step, dict(head.metrics), head.rows, rows, head.stop_at)
    return Fresh(head.step, values, table_rows=rows)


PIPELINE_BYTES = 4 << 20  # the request is encoded this much at a time


async def pipelined_update(
    grads: Gradients, expect: Expect, head: pb.UpdateRequest, chunk_bytes: int, more_rows: list
) -> AsyncIterator[bytes]:
    """The Update's messages, encoded in a thread a batch of slices at a time, the
    next batch while gRPC sends this one. The gradients are read in that thread: a
    sum still to be added up (``psfw.runtime.gradient_sums.Sums``) is added up there, so the
    early slices travel while later ones are still being added up."""

    def nbytes(key: SliceKey) -> int:
        dtype, shape = expect(key)
        return dtype.itemsize * math.prod(shape)

    def encode(keys: list[SliceKey], index: int) -> list[bytes]:
        return [b"".join(pieces) for pieces in update_messages(grads, keys, head if index == 0 else None, chunk_bytes)]

    async for message in encoded_ahead(batched(grads, nbytes, PIPELINE_BYTES), encode):
        yield message
    for pieces in row_pieces_messages(more_rows):
        yield b"".join(pieces)


def update_messages(
    grads: Gradients, keys: Iterable[SliceKey], head: pb.UpdateRequest | None, chunk_bytes: int
) -> Iterator[list]:
    """The messages of an Update's slices ``keys`` as pieces (``frame_encoder``),
    made as they are taken: a gradient is read (a sum added up) only then. ``head``:
    the Update's header, in the first message (which goes even without slices)."""
    items = ((key, i, grads[(key, i)]) for key, i in keys)
    for chunks in encode_chunks(items, chunk_bytes):
        yield UPDATE_PIECES(Frame(head if head is not None else pb.UpdateRequest(), chunks))
        head = None
    if head is not None:
        yield UPDATE_PIECES(Frame(head, []))


def row_pieces_messages(more_rows: list) -> Iterator[list]:
    """An Update's table rows beyond what its first message carries, as pieces."""
    for push, pull in more_rows:
        yield UPDATE_PIECES(Frame(pb.UpdateRequest(push=push, pull=pull), []))


def shared_update_messages(head: pb.UpdateRequest, more_rows: list) -> list[bytes]:
    """An Update through shared memory, encoded: its header, then a message per
    piece of table rows that did not fit in it (``row_messages``)."""
    messages = [UPDATE_REQUEST(Frame(head, []))]
    messages += [UPDATE_REQUEST(Frame(pb.UpdateRequest(push=push, pull=pull), [])) for push, pull in more_rows]
    return messages


def get_request(
    group: int, step: int, keys: list[SliceKey], wait_s: float, wait_for_put: bool, job: str, pull: TableIds | None
) -> pb.GetRequest:
    """A Get's message (``pull``: table rows wanted too)."""
    return pb.GetRequest(
        pull=pull_blocks(pull or {}),
        group=group,
        step=step,
        slices=[pb.SliceRef(key=k, slice=i) for k, i in keys],
        wait_s=wait_s,
        wait_for_put=wait_for_put,
        job=job,
    )
