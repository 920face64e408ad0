"""The ParameterServer gRPC service of one shard (grpc.aio): a thin adapter of the
shard's request core (``psfw.services.requests``) to gRPC's handlers, statuses and
streams."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterable, AsyncIterator

import grpc

from psfw.base.errors import WireError
from psfw.base.service import REASON_KEY, finish_reading
from psfw.proto import ps_pb2 as pb
from psfw.proto import ps_pb2_grpc as pb_grpc
from psfw.protocol.chunks import ChunkedMessage, chunked_deserializer, chunked_serializer, message_deserializer
from psfw.services.answers import get_replies
from psfw.services.requests import ShardRequests

MAX_REASON_CHARS = 2000  # a status message travels in a header: gRPC drops one over 16 KiB


class ParameterServerServicer(pb_grpc.ParameterServerServicer):
    """The gRPC face of ``requests``."""

    def __init__(self, requests: ShardRequests):
        self.requests = requests

    def refuse(self, context: grpc.aio.ServicerContext, method: str, code: grpc.StatusCode, reason: str) -> None:
        """Count and log a request refused before it reached a handler (its token)."""
        self.requests.refused(context.peer() or "", method, code, reason)

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
            async with self.requests.served(method, context.peer, request):
                yield
        except WireError as err:
            if requests is not None:
                await finish_reading(requests, context)
            await context.abort(err.code, _fits(err.message), ((REASON_KEY, err.reason.value),) if err.reason else ())

    async def Put(self, request_iterator: AsyncIterator[ChunkedMessage], context) -> pb.PutReply:
        async with self._handled(context, "Put", requests=request_iterator):
            reply = await self.requests.apply_put(request_iterator)
        return reply

    async def Get(self, request: pb.GetRequest, context) -> AsyncIterator[ChunkedMessage]:
        async with self._handled(context, "Get", request):
            answer = await self.requests.read_values(request)
        for message in get_replies(*answer):
            yield message

    async def Update(self, request_iterator: AsyncIterator[ChunkedMessage], context) -> AsyncIterator[bytes]:
        async with self._handled(context, "Update", requests=request_iterator):
            result, shared = await self.requests.apply_update(request_iterator)
        async for reply in self.requests.update_replies(result, shared):
            yield reply

    async def Describe(self, request: pb.DescribeRequest, context) -> pb.DescribeReply:
        async with self._handled(context, "Describe", request):
            reply = await self.requests.describe(request.digest)
        return reply

    async def Restore(self, request: pb.RestoreRequest, context) -> pb.RestoreReply:
        async with self._handled(context, "Restore", request):
            reply = await self.requests.restore(request.step, request.epoch)
        return reply


def _fits(reason: str) -> str:
    """A refusal's reason, cut to fit a status message (it may echo what was sent)."""
    return reason if len(reason) <= MAX_REASON_CHARS else reason[:MAX_REASON_CHARS] + "..."


def add_servicer(servicer: ParameterServerServicer, server: grpc.aio.Server) -> None:
    """Register the service with the bulk-data codec of ``psfw.protocol.chunks``: the
    bytes on the wire are the messages of ``ps.proto``; tensor data is never copied
    by protobuf."""
    handlers = {
        "Put": grpc.stream_unary_rpc_method_handler(
            servicer.Put,
            request_deserializer=chunked_deserializer(pb.PutRequest),
            response_serializer=pb.PutReply.SerializeToString,
        ),
        "Get": grpc.unary_stream_rpc_method_handler(
            servicer.Get,
            request_deserializer=message_deserializer(pb.GetRequest),
            response_serializer=chunked_serializer(pb.GetReply),
        ),
        "Update": grpc.stream_stream_rpc_method_handler(
            servicer.Update,
            request_deserializer=chunked_deserializer(pb.UpdateRequest),
            response_serializer=chunked_serializer(pb.UpdateReply),
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
