"""A shard's requests, whatever carries them: the one core that gRPC, the link and
the in-process transport call.

Each verb reads its whole request, validates it against the store, and only then
changes state; an invalid request ends with a precise status code and a message that
says what was wrong (a ``WireError``, which each carrier sends its own way). Every
call is counted and timed alike, refusals are logged in one line, bugs once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from typing import NamedTuple

import grpc

from psfw.base.errors import WireError
from psfw.proto import ps_pb2 as pb
from psfw.protocol.chunks import ChunkedMessage, Malformed, chunked_deserializer, chunked_encoder, message_deserializer
from psfw.protocol.row_wire import RowCollector, row_pieces
from psfw.protocol.shm import RegionCache, host_id
from psfw.protocol.wire import Assembler, update_header
from psfw.services import pipelined
from psfw.services.answers import (
    SHARED_REPLY_BYTES,
    UPDATE_REPLY,
    answer_pieces,
    encoded_answer,
    get_replies,
    reply_head,
    write_answer,
)
from psfw.services.metrics import ShardMetrics
from psfw.services.refusals import RefusalLog
from psfw.services.region_slots import map_region, no_shared_memory, region_slots
from psfw.services.request_checks import bounded_wait
from psfw.services.store import ShardStore, UpdateResult

log = logging.getLogger("psfw.server")

DEFAULT_MAX_REQUEST_BYTES = 16 << 30
SERVICE_METHODS = frozenset(pb.DESCRIPTOR.services_by_name["ParameterServer"].methods_by_name)
DECODERS = {"Put": chunked_deserializer(pb.PutRequest), "Update": pipelined.UPDATE_REQUEST}
GET_REQUEST = message_deserializer(pb.GetRequest)
GET_PIECES = chunked_encoder(pb.GetReply)


class Answer(NamedTuple):
    """A call's answer as messages in pieces, and what they are views of (held by
    the carrier until they are sent: no update writes over values a reader holds)."""

    replies: list[list[bytes | memoryview]]
    holds: object = None


class ShardRequests:
    """The verbs of one shard (its ``store``), for every carrier."""

    def __init__(self, store: ShardStore, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
        self.store = store
        self.max_request_bytes = max_request_bytes
        self.rpc_counts: Counter[str] = Counter()
        self.metrics = ShardMetrics(store)
        self.refusals = RefusalLog(store.shard)
        self._regions = RegionCache()
        self._shard = str(store.shard)
        self.loading = False  # set while the shard loads its checkpoint: every call is then UNAVAILABLE
        self.link_socket = ""  # the link's Unix socket, once it listens (services.link_server)
        self.link_port = 0  # and its TCP port
        self.link_id = ""  # and what it answers a HELLO with

    def close(self) -> None:
        self.refusals.flush()
        self.metrics.close()
        self._regions.close()

    def refused(self, peer: str, method: str, code: grpc.StatusCode, reason: str) -> None:
        """Count and log a refused request (see RefusalLog). A method name the service
        does not have (a token refusal comes before the path is known to exist)
        counts as "other": a label per path a client makes up would grow the metrics
        without bound."""
        method = method if method in SERVICE_METHODS else "other"
        self.metrics.refusals.labels(self._shard, method, code.name).inc()
        if code != grpc.StatusCode.UNAVAILABLE:  # "loading, retry" is part of a restart, not a refusal
            self.refusals.refused(peer, method, code.name, reason)

    @contextlib.asynccontextmanager
    async def served(self, method: str, peer: Callable[[], str], request: object = None):
        """Count and time a call, whatever carries it; refuse a request that did not
        parse; log a refusal (a WireError, raised on for the carrier to answer) in
        one line and a bug once (raised on as INTERNAL). While the shard loads,
        refuse with UNAVAILABLE (clients retry)."""
        self.rpc_counts[method] += 1
        started = time.perf_counter()
        try:
            if isinstance(request, Malformed):
                raise WireError(grpc.StatusCode.INVALID_ARGUMENT, request.error)
            if self.loading:  # an answer now (epoch 0, no slices) would say the shard lost its state
                raise WireError(
                    grpc.StatusCode.UNAVAILABLE, f"shard {self.store.shard} is loading its checkpoint: retry"
                )
            yield
        except WireError as err:
            self.refused(peer() or "", method, err.code, err.message)
            raise
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            log.exception("%s failed", method)
            raise WireError(
                grpc.StatusCode.INTERNAL, f"{method} failed inside the server: see the server log"
            ) from None
        finally:
            self.metrics.latency.labels(self._shard, method).observe(time.perf_counter() - started)

    def description(self) -> pb.DescribeReply:
        """The Describe answer of the shard as it is now, with the calls served."""
        reply = describe_store(self.store)
        reply.rpc_counts.update(self.rpc_counts)
        reply.link_socket = self.link_socket
        reply.link_port = self.link_port
        reply.link_id = self.link_id
        return reply

    async def apply_put(self, messages: AsyncIterable[ChunkedMessage]) -> pb.PutReply:
        """Read a Put's messages and store their slices (the store adopts the chunks'
        buffers where a slice came whole)."""
        assembler = Assembler(max_bytes=self.max_request_bytes, keep=True)
        first = None
        async for message in messages:
            header = assembler.add_message(message)
            if first is None:
                first = header
        optimizer, job, tables = (first.optimizer, first.job, first.tables) if first is not None else ("", "", "")
        stored = await self.store.put(assembler.finish(), optimizer, adopt=True, job=job, tables=tables)
        self.metrics.bytes_in.labels(self._shard).inc(assembler.total)
        return pb.PutReply(slices=stored)

    async def read_values(self, request: pb.GetRequest) -> tuple[int, dict, dict]:
        """A Get's step, values and table rows, once its group has got there."""
        if request.shm:  # a stub of an older psfw: it goes on over the network
            raise no_shared_memory(self.store.shard, "answers no Get through shared memory")
        pulled = RowCollector()
        pulled.add(request.pull, ids_only=True)
        return await self.store.read(
            [(r.key, r.slice) for r in request.slices],
            request.group,
            request.step,
            bounded_wait(request.wait_s),
            request.wait_for_put,
            request.job,
            pulled.ids(),
        )

    async def apply_update(self, messages: AsyncIterable[ChunkedMessage]) -> tuple[UpdateResult, bool]:
        """Read an Update's messages and hand it to the store; an Update whose
        tensors lie in a shared region gets its answer's values written there.
        Returns the store's result and whether the values are in the region."""
        # gradients may come compressed (psfw.protocol.compression): widened here
        assembler = Assembler(self.store.expect, max_bytes=self.max_request_bytes, widen=True)
        pushed, pulled = RowCollector(), RowCollector()
        header = None
        async for message in messages:
            first = assembler.add_message(message)
            pushed.add(first.push)
            pulled.add(first.pull, ids_only=True)
            if header is None:
                header = first
        if header is None:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, "Update carries no message")
        if header.shm:
            if assembler.total:
                raise WireError(grpc.StatusCode.INVALID_ARGUMENT, "an Update through shared memory carries no data")
            region = map_region(self._regions, self.store.shard, header.shm)
            sums, places = region_slots(region, self.store.shard, header.shm_slots, self.store.specs)
        else:
            sums = assembler.finish()
        head = update_header(header, bounded_wait(header.wait_s), pushed.rows(), pulled.ids())
        result = await self.store.update(head, sums)
        self.metrics.bytes_in.labels(self._shard).inc((assembler.total or self.store.nbytes()) + pushed.total)
        if header.shm:
            await write_answer(region, places, result.values)
        return result, bool(header.shm)

    def update_stream(self, first: ChunkedMessage, rest: AsyncIterator[ChunkedMessage]):
        """A pipelined Update, answered slice by slice (``psfw.services.pipelined``)."""
        return pipelined.update_stream(self, first, rest)

    async def answer_stream(
        self, first: ChunkedMessage, feed: asyncio.Queue, send: Callable[[Callable], None], peer: str
    ) -> WireError | None:
        """A pipelined Update as the link carries it (``psfw.services.pipelined``)."""
        return await pipelined.answer_stream(self, first, feed, send, peer)

    async def update_replies(self, result: UpdateResult, shared: bool) -> AsyncIterator[bytes]:
        """An Update's answer, encoded a batch at a time (gRPC's): the table rows its
        process pulled, then the values (only the steps and metrics when ``shared``:
        the values are in the region already)."""
        rows_out = 0
        for pieces in row_pieces(result.table_rows):  # this process's own rows, ahead of the shared answer
            reply = UPDATE_REPLY(ChunkedMessage(pb.UpdateReply(step=result.step, table_rows=pieces), []))
            rows_out += len(reply)
            yield reply
        if shared:
            self.metrics.bytes_out.labels(self._shard).inc(self.store.nbytes() + rows_out)
            yield UPDATE_REPLY(ChunkedMessage(reply_head(result), []))
            return
        sent = 0
        async for reply in encoded_answer(result, self.store.nbytes() <= SHARED_REPLY_BYTES):
            sent += len(reply)
            yield reply
        self.metrics.bytes_out.labels(self._shard).inc(sent + rows_out)

    def answer_pieces(self, result: UpdateResult, values: bool = True) -> list[list[bytes | memoryview]]:
        """An Update's answer (its table rows, then its values; without ``values``
        only its steps and metrics) as pieces whose tensor data are views of the
        shard's values, for a carrier that sends them as they are: nothing is
        copied, so nothing is shared between a group's processes either."""
        pieces = [
            [UPDATE_REPLY(ChunkedMessage(pb.UpdateReply(step=result.step, table_rows=rows), []))]
            for rows in row_pieces(result.table_rows)
        ]
        pieces += answer_pieces(result, sorted(result.values) if values else [])
        self.metrics.bytes_out.labels(self._shard).inc(sum(len(p) for message in pieces for p in message))
        return pieces

    async def answer(self, method: str, payloads: list[memoryview], peer: str) -> Answer | WireError:
        """A whole call's answer as pieces (the link's), from its messages as they
        came (``payloads``); the refusal as a WireError."""
        try:
            if method == "Get":
                request = GET_REQUEST(bytes(payloads[0])) if len(payloads) == 1 else Malformed("a Get is one message")
                async with self.served("Get", lambda: peer, request):
                    step, values, rows = await self.read_values(request)
                    return Answer([GET_PIECES(message) for message in get_replies(step, values, rows)], values)
            messages = [DECODERS[method](payload) for payload in payloads]
            async with self.served(method, lambda: peer):
                if method == "Put":
                    return Answer([[(await self.apply_put(each(messages))).SerializeToString()]])
                result, shared = await self.apply_update(each(messages))
                if shared:  # the values are in the region already
                    return Answer([[reply] async for reply in self.update_replies(result, shared)])
                return Answer(self.answer_pieces(result), result)
        except WireError as err:
            return err

    async def describe(self, digest: bool = False) -> pb.DescribeReply:
        """The Describe answer (``digest``: with the digest of the shard's state)."""
        reply = self.description()
        if digest:
            reply.digest = await self.store.state_digest()
        return reply

    async def restore(self, step: int, epoch: int) -> pb.RestoreReply:
        await self.store.restore(step, epoch)
        log.warning("shard %d restored to step %d, epoch %d", self.store.shard, step, epoch)
        return pb.RestoreReply(step=step, epoch=self.store.epoch)


async def each(items: Iterable) -> AsyncIterator:
    """``items`` as an async iterator (a whole request read by a carrier)."""
    for item in items:
        yield item


def describe_store(store: ShardStore) -> pb.DescribeReply:
    """The Describe answer for a shard's current state."""
    reply = pb.DescribeReply(
        shard=store.shard,
        shards=store.shards,
        bytes=store.nbytes(),
        optimizer=store.optimizer_spec,
        updates_applied=store.updates_applied,
        uptime_s=time.monotonic() - store.started,
        epoch=store.epoch,
        checkpoint_steps=store.checkpoint_steps(),
        host=host_id(),
        job=store.job,
    )
    restored = store.checkpoints.restored
    if restored is not None and restored[1]:  # a checkpoint re-cut from another shard count
        reply.resharded_step, reply.resharded_from = restored
    for (key, index), (dtype, shape) in sorted(store.specs.items()):
        reply.slices.add(
            key=key,
            slice=index,
            dtype=dtype.name,
            shape=shape,
            version=store.versions[(key, index)],
            nbytes=dtype.itemsize * math.prod(shape),
        )
    for name, table in sorted(store.tables.tables.items()):
        reply.tables.add(
            name=name,
            rows=table.spec.rows or 0,
            dim=table.spec.dim,
            rows_held=table.count,
            bytes=table.nbytes(),
            optimizer=json.dumps(table.optimizer.spec),
            updates=table.updates,
            rows_touched=table.rows_touched,
            rows_admitted=table.admitted,
            rows_expired=table.expired,
            rows_evicted=table.evicted,
            ids_waiting=len(table.waiting),
        )
    store.presence.sweep()  # a group that left is said gone here too, also when no other group reports
    for group, state in sorted(store.groups.items()):
        rnd = state.round
        info = reply.groups.add(
            group=group,
            step=state.step,
            pending_workers=rnd.workers if rnd else 0,
            pending_processes=sorted(rnd.contributions) if rnd else [],
            gone=group in store.presence.gone,
        )
        for process, updates, age_s in store.reports.of(group):
            info.reports.add(process=process, updates=updates, age_s=age_s)
    return reply
