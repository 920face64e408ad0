"""The ParameterServer gRPC service of one shard (grpc.aio).

Each handler reads its whole request, validates it against the store, and only then
changes state; an invalid request ends with a precise status code and a message that
says what was wrong. Bugs are logged once and surface as INTERNAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Callable

import grpc

from psfw.base.errors import WireError
from psfw.base.service import REASON_KEY, finish_reading
from psfw.proto import ps_pb2 as pb
from psfw.proto import ps_pb2_grpc as pb_grpc
from psfw.protocol.frames import (
    Frame,
    Malformed,
    frame_deserializer,
    frame_serializer,
    message_deserializer,
)
from psfw.protocol.row_wire import RowCollector, row_pieces
from psfw.protocol.shm import RegionCache, host_id
from psfw.protocol.wire import Assembler, update_header
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
from psfw.services.store import ShardStore, UpdateResult

log = logging.getLogger("psfw.server")

DEFAULT_MAX_REQUEST_BYTES = 16 << 30
SERVICE_METHODS = frozenset(pb.DESCRIPTOR.services_by_name["ParameterServer"].methods_by_name)


class ParameterServerServicer(pb_grpc.ParameterServerServicer):
    def __init__(self, store: ShardStore, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
        self.store = store
        self.max_request_bytes = max_request_bytes
        self.rpc_counts: Counter[str] = Counter()
        self.metrics = ShardMetrics(store)
        self.refusals = RefusalLog(store.shard)
        self._regions = RegionCache()
        self._shard = str(store.shard)
        self.loading = False  # set while the shard loads its checkpoint: every RPC is then UNAVAILABLE
        self.local_socket = ""  # the same-host link's name, once it listens (services.local_server)
        self.data_port = 0  # the data link's TCP port, once it listens (services.data_server)
        self.data_id = ""  # and what it answers a HELLO with

    def close(self) -> None:
        self.refusals.flush()
        self.metrics.close()
        self._regions.close()

    def refuse(self, context: grpc.aio.ServicerContext, method: str, code: grpc.StatusCode, reason: str) -> None:
        """Count and log a refused request (see ``refused``); the caller aborts the RPC."""
        self.refused(context.peer() or "", method, code, reason)

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

    @contextlib.asynccontextmanager
    async def _handled(
        self,
        context: grpc.aio.ServicerContext,
        method: str,
        request: object = None,
        requests: AsyncIterable | None = None,
    ):
        """``served``, over gRPC: a refusal becomes the RPC's status (and reason),
        sent once the client has sent all of ``requests`` (its stream, if any)."""
        try:
            async with self.served(method, context.peer, request):
                yield
        except WireError as err:
            if requests is not None:
                await finish_reading(requests, context)
            await context.abort(err.code, _fits(err.message), ((REASON_KEY, err.reason.value),) if err.reason else ())

    def description(self) -> pb.DescribeReply:
        """The Describe answer of the shard as it is now, with the RPCs served."""
        reply = describe_store(self.store)
        reply.rpc_counts.update(self.rpc_counts)
        reply.local_socket = self.local_socket
        reply.data_port = self.data_port
        reply.data_id = self.data_id
        return reply

    async def Put(self, request_iterator: AsyncIterator[Frame], context) -> pb.PutReply:
        async with self._handled(context, "Put", requests=request_iterator):
            reply = await self.apply_put(request_iterator)
        return reply

    async def apply_put(self, frames: AsyncIterable[Frame]) -> pb.PutReply:
        """Read a Put's messages and store their slices (the store adopts the chunks'
        buffers where a slice came whole)."""
        assembler = Assembler(max_bytes=self.max_request_bytes, keep=True)
        first = None
        async for frame in frames:
            header = assembler.add_frame(frame)
            if first is None:
                first = header
        optimizer, job, tables = (first.optimizer, first.job, first.tables) if first is not None else ("", "", "")
        stored = await self.store.put(assembler.finish(), optimizer, adopt=True, job=job, tables=tables)
        self.metrics.bytes_in.labels(self._shard).inc(assembler.total)
        return pb.PutReply(slices=stored)

    async def Get(self, request: pb.GetRequest, context) -> AsyncIterator[Frame]:
        async with self._handled(context, "Get", request):
            answer = await self.read_values(request)
        for frame in get_replies(*answer):
            yield frame

    async def read_values(self, request: pb.GetRequest) -> tuple[int, dict, dict]:
        """A Get's step, values and table rows, once its group has got there."""
        if request.shm:  # a stub of an older psfw: it goes on over the network
            raise no_shared_memory(self.store.shard, "answers no Get through shared memory")
        keys = [(r.key, r.slice) for r in request.slices]
        pulled = RowCollector()
        pulled.add(request.pull, ids_only=True)
        step, values, rows = await self.store.read(
            keys,
            request.group,
            request.step,
            _wait(request.wait_s),
            request.wait_for_put,
            request.job,
            pulled.ids(),
        )
        return step, values, rows

    async def Update(self, request_iterator: AsyncIterator[Frame], context) -> AsyncIterator[bytes]:
        async with self._handled(context, "Update", requests=request_iterator):
            result, shared = await self.apply_update(request_iterator)
        async for reply in self.update_replies(result, shared):
            yield reply

    async def apply_update(self, frames: AsyncIterable[Frame]) -> tuple[UpdateResult, bool]:
        """Read an Update's messages and hand it to the store; an Update through
        shared memory gets its answer's values written into its region. Returns the
        store's result and whether the values are in the region."""
        # gradients may come compressed (psfw.protocol.compression): widened here
        assembler = Assembler(self.store.expect, max_bytes=self.max_request_bytes, widen=True)
        pushed, pulled = RowCollector(), RowCollector()
        header = None
        async for frame in frames:
            first = assembler.add_frame(frame)
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
        head = update_header(header, _wait(header.wait_s), pushed.rows(), pulled.ids())
        result = await self.store.update(head, sums)
        self.metrics.bytes_in.labels(self._shard).inc((assembler.total or self.store.nbytes()) + pushed.total)
        if header.shm:
            await write_answer(region, places, result.values)
        return result, bool(header.shm)

    async def update_replies(self, result: UpdateResult, shared: bool) -> AsyncIterator[bytes]:
        """An Update's answer, encoded: the table rows its process pulled, then the
        values (only the steps and metrics when ``shared``: the values are in the
        region already)."""
        rows_out = 0
        for pieces in row_pieces(result.table_rows):  # this process's own rows, ahead of the shared answer
            reply = UPDATE_REPLY(Frame(pb.UpdateReply(step=result.step, table_rows=pieces), []))
            rows_out += len(reply)
            yield reply
        if shared:
            self.metrics.bytes_out.labels(self._shard).inc(self.store.nbytes() + rows_out)
            yield UPDATE_REPLY(Frame(reply_head(result), []))
            return
        sent = 0
        async for reply in encoded_answer(result, self.store.nbytes() <= SHARED_REPLY_BYTES):
            sent += len(reply)
            yield reply
        self.metrics.bytes_out.labels(self._shard).inc(sent + rows_out)

    def answer_pieces(self, result: UpdateResult) -> list[list[bytes | memoryview]]:
        """An Update's answer (its table rows, then its values) as pieces whose
        tensor data are views of the shard's values, for a carrier that sends them as
        they are: nothing is copied, so nothing is shared between a group's processes
        either. The carrier holds ``result`` until they are sent (no update writes
        over values a reader holds)."""
        pieces = [
            [UPDATE_REPLY(Frame(pb.UpdateReply(step=result.step, table_rows=rows), []))]
            for rows in row_pieces(result.table_rows)
        ]
        pieces += answer_pieces(result, sorted(result.values))
        self.metrics.bytes_out.labels(self._shard).inc(sum(len(p) for message in pieces for p in message))
        return pieces

    async def Describe(self, request: pb.DescribeRequest, context) -> pb.DescribeReply:
        async with self._handled(context, "Describe", request):
            reply = self.description()
            if request.digest:
                reply.digest = await self.store.state_digest()
        return reply

    async def Restore(self, request: pb.RestoreRequest, context) -> pb.RestoreReply:
        async with self._handled(context, "Restore", request):
            await self.store.restore(request.step, request.epoch)
            log.warning("shard %d restored to step %d, epoch %d", self.store.shard, request.step, request.epoch)
        return pb.RestoreReply(step=request.step, epoch=self.store.epoch)


MAX_REASON_CHARS = 2000  # a status message travels in a header: gRPC drops one over 16 KiB


def _fits(reason: str) -> str:
    """A refusal's reason, cut to fit a status message (it may echo what was sent)."""
    return reason if len(reason) <= MAX_REASON_CHARS else reason[:MAX_REASON_CHARS] + "..."


def _wait(wait_s: float) -> float:
    """The wait a request asked for, bounded; 0 means the default of 60 s."""
    return min(wait_s, 3600.0) if wait_s > 0 else 60.0


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
        )
    for group, state in sorted(store.groups.items()):
        rnd = state.round
        info = reply.groups.add(
            group=group,
            step=state.step,
            pending_workers=rnd.workers if rnd else 0,
            pending_processes=sorted(rnd.contributions) if rnd else [],
        )
        for process, updates, age_s in store.reports.of(group):
            info.reports.add(process=process, updates=updates, age_s=age_s)
    return reply


def add_servicer(servicer: ParameterServerServicer, server: grpc.aio.Server) -> None:
    """Register the service with the bulk-data codec of ``psfw.protocol.wire``: the bytes on the
    wire are the messages of ``ps.proto``; tensor data is never copied by protobuf."""
    handlers = {
        "Put": grpc.stream_unary_rpc_method_handler(
            servicer.Put,
            request_deserializer=frame_deserializer(pb.PutRequest),
            response_serializer=pb.PutReply.SerializeToString,
        ),
        "Get": grpc.unary_stream_rpc_method_handler(
            servicer.Get,
            request_deserializer=message_deserializer(pb.GetRequest),
            response_serializer=frame_serializer(pb.GetReply),
        ),
        "Update": grpc.stream_stream_rpc_method_handler(
            servicer.Update,
            request_deserializer=frame_deserializer(pb.UpdateRequest),
            response_serializer=frame_serializer(pb.UpdateReply),
        ),
        "Describe": grpc.unary_unary_rpc_method_handler(
            servicer.Describe,
            request_deserializer=message_deserializer(pb.DescribeRequest),
            response_serializer=pb.DescribeReply.SerializeToString,
        ),
        "Restore": grpc.unary_unary_rpc_method_handler(
            servicer.Restore,
            request_deserializer=message_deserializer(pb.RestoreRequest),
            response_serializer=pb.RestoreReply.SerializeToString,
        ),
    }
    service = pb.DESCRIPTOR.services_by_name["ParameterServer"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
