"""A pipelined Update at the request core: answered slice by slice while it arrives.

The shard's round keeps each slice's progress (``psfw.services.slice_rounds``); here
the request is read as it comes (its table rows first, then a slice at a time) and
each slice's value goes back as soon as the group's slice is applied. The link is
the carrier that pipelines (``psfw.services.link_server``); gRPC and the in-process
transport answer such an Update whole, which is as correct.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING

import grpc

from psfw.base.errors import WireError
from psfw.proto import ps_pb2 as pb
from psfw.protocol.chunks import ChunkedMessage, chunked_deserializer
from psfw.protocol.layout import SliceKey
from psfw.protocol.messages import UpdateHeader
from psfw.protocol.row_wire import RowCollector
from psfw.protocol.wire import Assembler, update_header
from psfw.services.answers import slice_pieces
from psfw.services.request_checks import bounded_wait

if TYPE_CHECKING:
    from psfw.services.requests import ShardRequests


UPDATE_REQUEST = chunked_deserializer(pb.UpdateRequest)


def pipelined(message: ChunkedMessage) -> bool:
    """Whether an Update's first message asks to be answered slice by slice."""
    return not message.error and message.header.pipelined


async def update_stream(
    requests: ShardRequests, first: ChunkedMessage, rest: AsyncIterator[ChunkedMessage]
) -> AsyncIterator[Callable[[], Iterable[list[bytes | memoryview]]]]:
    """A pipelined Update (``first`` says so; ``rest``: its other messages as
    they arrive): each slice joins the group's round as soon as it is whole, and
    its value after the step is answered as soon as the group's slice is
    applied, while the rest still arrives (``psfw.services.slice_rounds``). The
    last message carries the steps, the metrics and the table rows pulled.
    Yields the answer's messages a slice at a time, each as a call that makes
    its pieces (views of the values): the carrier encodes them off the loop,
    where waiting for the slice's update to finish blocks nothing else."""
    store, slices = requests.store, requests.store.rounds.slices
    assembler = Assembler(store.expect, max_bytes=requests.max_request_bytes, widen=True)
    pushed, pulled = RowCollector(), RowCollector()
    header = assembler.add_message(first)
    if header.shm:
        raise WireError(grpc.StatusCode.INVALID_ARGUMENT, "a pipelined Update carries its tensors in its messages")
    pushed.add(header.push)
    pulled.add(header.pull, ids_only=True)
    wait = bounded_wait(header.wait_s)
    deadline = time.monotonic() + wait
    head = update_header(header, wait, {}, {})
    state, rnd = await slices.open(head)
    added: list[SliceKey] = []  # this process's slices, as they were added
    more = asyncio.Event()

    def with_rows() -> UpdateHeader:
        return dataclasses.replace(head, push=pushed.rows(), pull=pulled.ids())

    async def take_in() -> UpdateHeader:
        ready = assembler.ready()
        while True:
            if ready and rnd is not None:
                slices.rows_in(rnd, with_rows())  # checked before any slice is added
            for key, array in ready:
                if rnd is not None:
                    await slices.add(state, rnd, head, key, (array,))
                added.append(key)
                more.set()
            message = await anext(rest, None)
            if message is None:
                break
            more_rows = assembler.add_message(message)
            if (more_rows.push or more_rows.pull) and added:
                raise WireError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "a pipelined Update sends its table rows before its slices",
                )
            pushed.add(more_rows.push)
            pulled.add(more_rows.pull, ids_only=True)
            ready = assembler.ready()
        assembler.finish()  # a slice cut short is refused
        whole = with_rows()
        if rnd is not None:
            await slices.end(state, rnd, whole)
        return whole

    taking = asyncio.get_running_loop().create_task(take_in())
    sent, answered = 0, 0
    try:
        while rnd is not None:
            if taking.done() and not taking.cancelled() and taking.exception() is not None:
                raise taking.exception()  # the request failed: said now, not once the group is done
            if answered < len(added):
                key = added[answered]
                answered += 1
                value = await slices.value(rnd, head, key, deadline, taking)
                sent += value.nbytes
                yield functools.partial(slice_pieces, head.step + 1, key, value)
                continue
            if taking.done():
                break
            more.clear()
            waiter = asyncio.ensure_future(more.wait())
            await asyncio.wait({taking, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
        whole = dataclasses.replace(await taking, wait_s=max(0.0, deadline - time.monotonic()))
        if rnd is None:  # a step complete already: acknowledged with the current values
            replies = requests.answer_pieces(await store.rounds.acknowledge(state, whole))
        else:
            replies = requests.answer_pieces(await store.rounds.answer(rnd, whole), values=False)
        yield lambda: replies
    finally:
        if not taking.done():
            taking.cancel()
        requests.metrics.bytes_in.labels(requests._shard).inc(assembler.total + pushed.total)
        requests.metrics.bytes_out.labels(requests._shard).inc(sent)


async def answer_stream(
    requests: ShardRequests, first: ChunkedMessage, feed: asyncio.Queue, send: Callable[[Callable], None], peer: str
) -> WireError | None:
    """A pipelined Update as the link carries it: ``first`` (decoded), then the
    messages ``feed`` gets as they arrive (None: the end); ``send`` takes each
    answer's messages as they are made (a call that encodes them, for the carrier's
    thread). Returns the refusal, or None once it is answered."""

    async def rest() -> AsyncIterator[ChunkedMessage]:
        while (payload := await feed.get()) is not None:
            yield UPDATE_REQUEST(payload)

    try:
        async with requests.served("Update", lambda: peer):
            async for messages in requests.update_stream(first, rest()):
                send(messages)
    except WireError as err:
        return err
    return None
