"""A shard as a gRPC server: the ParameterServer service, health and reflection.

    server = ShardServer(shard=0, shards=2)
    port = await server.start("127.0.0.1:0")
    ...
    await server.stop()

The health service reports NOT_SERVING until the shard is ready and again from the
moment a graceful shutdown starts.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from psfw.proto import ps_pb2 as pb
from psfw.services.servicer import DEFAULT_MAX_REQUEST_BYTES, ParameterServerServicer, add_servicer
from psfw.services.store import ShardStore

log = logging.getLogger("psfw.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ParameterServer"].full_name
MAX_MESSAGE_BYTES = 4 << 20  # chunks are about 1 MiB: 4 MiB leaves room, bounds abuse
SERVING = health_pb2.HealthCheckResponse.SERVING


def grpc_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]


class ShardServer:
    """One parameter-server shard served over gRPC."""

    def __init__(
        self,
        shard: int = 0,
        shards: int = 1,
        *,
        nonfinite: str = "reject",
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ):
        if not 0 <= shard < shards:
            raise ValueError(f"shard index {shard} is outside 0..{shards - 1}")
        self.store = ShardStore(shard, shards, nonfinite=nonfinite)
        self.servicer = ParameterServerServicer(self.store, max_request_bytes)
        self.health = health.aio.HealthServicer()
        self._server = grpc.aio.server(options=grpc_options(max_message_bytes))
        add_servicer(self.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server,
        )
        self.address = ""

    async def start(self, address: str = "127.0.0.1:0") -> int:
        """Bind ``address`` (port 0 picks a free one), start serving; returns the port."""
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        port = self._server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot listen on {address}: the address is taken or invalid")
        await self._server.start()
        host = address.rsplit(":", 1)[0]
        self.address = f"{host}:{port}"
        await self.health.set("", SERVING)
        await self.health.set(SERVICE_NAME, SERVING)
        log.info("shard %d of %d serving on %s", self.store.shard, self.store.shards, self.address)
        return port

    async def stop(self, grace: float | None = 1.0) -> None:
        """NOT_SERVING at once, then let in-flight RPCs finish within ``grace`` seconds."""
        await self.health.enter_graceful_shutdown()
        await self._server.stop(grace)

    async def wait(self) -> None:
        await self._server.wait_for_termination()


async def serve(shard: int, shards: int, address: str, grace: float = 5.0, **options) -> None:
    """Run one shard until SIGTERM/SIGINT: the first signal starts a graceful stop,
    a second one stops at once."""
    server = ShardServer(shard, shards, **options)
    await server.start(address)
    print(f"psfw shard {shard}/{shards} listening on {server.address}", flush=True)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def on_signal() -> None:
        if stopping.is_set():
            log.warning("second signal: stopping now")
            raise SystemExit(1)
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await stopping.wait()
    log.info("stopping: finishing in-flight RPCs within %.1f s", grace)
    await server.stop(grace)
