"""The gRPC service's name, the channel options both ends use, and how a refused
client stream ends."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable

import grpc

SERVICE_NAME = "psfw.v1.ParameterServer"  # ps.proto's package and service (tests/test_protos.py checks it)
MAX_MESSAGE_BYTES = 4 << 20  # chunks are about 1 MiB: 4 MiB leaves room, bounds abuse
REASON_KEY = "psfw-reason"  # trailing metadata: the reason code of a refusal (psfw.base.errors.Reason)


def grpc_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]


# A refusal of a client-streaming call waits this long at most for the client to finish sending.
FINISH_READING_S = 30.0


async def finish_reading(requests: AsyncIterable, context: grpc.aio.ServicerContext) -> None:
    """Read and drop what is left of a request stream that is being refused, so that
    the refusal's status reaches the client. A status sent while the client still
    sends makes its next send fail, and grpc.aio then reports the call as
    ``INTERNAL: Internal error from Core`` instead of the status. Bounded by the
    call's deadline and ``FINISH_READING_S``: a client that never stops sending gets
    the status then (and may see INTERNAL)."""
    remaining = context.time_remaining()
    limit = FINISH_READING_S if remaining is None else max(0.0, min(FINISH_READING_S, remaining))
    # whatever ends the stream early (a deadline, a broken message) ends it: the status follows
    with contextlib.suppress(Exception):
        async with asyncio.timeout(limit):
            async for _ in requests:
                pass
