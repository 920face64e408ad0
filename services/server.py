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
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import weakref
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from psfw.base.atomic import write_atomic
from psfw.base.console import say
from psfw.base.security import NO_SECURITY, Security
from psfw.base.service import MAX_MESSAGE_BYTES, SERVICE_NAME, grpc_options
from psfw.proto import ps_pb2 as pb
from psfw.services.checkpoint import CheckpointFolder
from psfw.services.grpc_service import ParameterServerServicer, add_servicer
from psfw.services.link_server import LinkListener
from psfw.services.requests import DEFAULT_MAX_REQUEST_BYTES, ShardRequests
from psfw.services.store import ShardStore

log = logging.getLogger("psfw.server")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def is_loopback(address: str) -> bool:
    """Whether ``host:port`` names a loopback host (127.0.0.0/8, ::1): an IP address,
    or a name (``localhost``) all of whose addresses are loopback. A name is resolved,
    not trusted: /etc/hosts may point ``localhost`` anywhere."""
    host = address.rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        found = {info[4][0].split("%")[0] for info in socket.getaddrinfo(host, None)}
    except (OSError, UnicodeError):
        return False
    return bool(found) and all(ipaddress.ip_address(ip).is_loopback for ip in found)


_IN_PROCESS: weakref.WeakValueDictionary[str, ShardServer] = weakref.WeakValueDictionary()


def in_process(address: str) -> ShardServer | None:
    """The running shard of this process that serves ``address``, if any: clients
    in the same process then call it directly (``psfw.runtime.inprocess``)."""
    return _IN_PROCESS.get(address)


def check_listen(address: str, security: Security, insecure: bool, loopback: bool | None = None) -> None:
    """A non-loopback address needs TLS, unless ``insecure`` says otherwise
    (``loopback``: ``is_loopback(address)``, when the caller knows it already). A
    bearer token alone is not enough: without TLS it crosses the network in clear,
    with every tensor."""
    loopback = is_loopback(address) if loopback is None else loopback
    if loopback or security.tls or insecure:
        return
    if security.token:
        raise PermissionError(
            f"refusing to listen on {address} with a bearer token but without TLS: the token and the tensors "
            "would cross the network in clear; add --tls-cert/--tls-key, use a loopback address, or pass "
            "--insecure if the network is private"
        )
    raise PermissionError(
        f"refusing to listen on {address} without TLS: give --tls-cert/--tls-key (and --token-file or "
        "--tls-client-ca to authenticate clients), use a loopback address, or pass --insecure to accept anyone "
        "who can reach it"
    )


def listens_everywhere(host: str) -> bool:
    """Whether a listen host is the wildcard of all interfaces (``0.0.0.0``, ``[::]``)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


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
        insecure: bool = False,
        checkpoint_dir: str | Path | CheckpointFolder | None = None,
        keep: int = 3,
        security: Security = NO_SECURITY,
        link_port: int | None = 0,
        link: bool = True,
    ):
        if not 0 <= shard < shards:
            raise ValueError(f"shard index {shard} is outside 0..{shards - 1}")
        self.store = ShardStore(shard, shards, nonfinite=nonfinite, checkpoints=checkpoint_dir, keep=keep)
        self.requests = ShardRequests(self.store, max_request_bytes)
        self.servicer = ParameterServerServicer(self.requests)
        self.health = health.aio.HealthServicer()
        self.insecure = insecure
        self.security = security
        self._server = grpc.aio.server(
            options=grpc_options(max_message_bytes), interceptors=security.interceptors(self.servicer.refuse)
        )
        add_servicer(self.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server,
        )
        self.address = ""
        self.metrics_port: int | None = None
        self.metrics_address = ""  # host:port of the Prometheus endpoint, once serving
        self.restored_step: int | None = None  # set when start() loaded a checkpoint
        self.restored_from_shards = 0  # the shard count that checkpoint was made on, when re-cut for this one
        # Put, Get and Update over a Unix socket and a TCP port (0: a free one; None: no TCP)
        self.link = LinkListener(self.requests, security.token, security.link_server_context())
        self._link_port = link_port
        self._link_on = link  # False: no link at all (a shard only this process calls)

    async def _set_health(self, status: int) -> None:
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    async def start(self, address: str = "127.0.0.1:0", *, ready: bool = True, metrics_port: int | None = None) -> int:
        """Bind ``address`` (port 0 picks a free one) and start serving; returns the port.

        With a checkpoint folder, the newest complete checkpoint is loaded first;
        meanwhile every RPC is UNAVAILABLE (clients retry) and a failed load stops
        the server. Health stays NOT_SERVING until the shard is ready: then at once with
        ``ready``, else when ``mark_ready`` is called.
        Raises PermissionError for a non-loopback address without TLS or a token,
        unless the server was made ``insecure``.
        """
        loopback = await asyncio.to_thread(is_loopback, address)  # a name is resolved: off the event loop
        check_listen(address, self.security, self.insecure, loopback)
        await self._set_health(NOT_SERVING)
        credentials = self.security.server_credentials()
        try:
            if credentials is None:
                port = self._server.add_insecure_port(address)
            else:
                port = self._server.add_secure_port(address, credentials)
        except RuntimeError:  # grpcio raises "Failed to bind" for an address in use
            port = 0
        if port == 0:
            tls = ", or the TLS certificate, key or client CA do not load (gRPC logs which)" if credentials else ""
            raise OSError(f"cannot listen on {address}: the address is taken or invalid{tls}")
        loading = self.store.checkpoints.folder is not None
        self.requests.loading = loading
        await self._server.start()
        host = address.rsplit(":", 1)[0]
        self.address = f"{host}:{port}"
        if metrics_port is not None:
            # the listen host's interface: all of them only when the shard itself listens on all
            metrics_host = "0.0.0.0" if listens_everywhere(host) else host.strip("[]")
            try:
                self.metrics_port = self.requests.metrics.serve(metrics_port, metrics_host)
            except OSError as err:
                await self._server.stop(0)  # not left serving without the metrics it was asked for
                self.requests.close()
                raise OSError(f"cannot serve metrics on {metrics_host}:{metrics_port}: {err.strerror or err}") from None
            shown = f"[{metrics_host}]" if ":" in metrics_host else metrics_host
            self.metrics_address = f"{shown}:{self.metrics_port}"
        if loading:
            try:
                step = await self.store.load_newest()
            except Exception:
                await self._server.stop(0)  # not left answering "loading" forever
                self.requests.close()
                raise
            self.requests.loading = False
            if step is not None:
                made_on = self.store.checkpoints.restored[1]
                if made_on:
                    log.warning(
                        "shard %d of %d restored from the checkpoint of step %d made on %d shards",
                        self.store.shard,
                        self.store.shards,
                        step,
                        made_on,
                    )
                else:
                    log.warning("shard %d restored from its checkpoint of step %d", self.store.shard, step)
                self.restored_step = step
                self.restored_from_shards = made_on
        if self._link_on:
            await self._start_link(host.strip("[]"), self._link_port)
        if ready:
            await self.mark_ready()
        _IN_PROCESS[self.address] = self
        return port

    async def _start_link(self, host: str, port: int | None) -> None:
        """Start the link; a TCP port asked for that cannot be had stops the server
        (as the metrics port does), a free one that cannot leaves the tensors of
        other hosts on gRPC."""
        try:
            await self.link.start(host if port is not None else None, port or 0)
        except OSError as err:
            if not port:
                log.warning("shard %d: no link port (%s); tensors of other hosts go over gRPC", self.store.shard, err)
                await self.link.start(None)
            else:
                await self._server.stop(0)
                self.requests.close()
                raise OSError(f"cannot serve the link on {host}:{port}: {err.strerror or err}") from None
        self.requests.link_socket, self.requests.link_port, self.requests.link_id = (
            self.link.socket,
            self.link.port,
            self.link.id,
        )

    def description(self) -> pb.DescribeReply:
        """The Describe answer of the shard as it is now."""
        return self.requests.description()

    async def mark_ready(self) -> None:
        """Report SERVING: the shard holds what it should (fresh or restored)."""
        await self._set_health(SERVING)
        log.debug("shard %d of %d serving on %s", self.store.shard, self.store.shards, self.address)

    async def stop(self, grace: float | None = 1.0, drain: float = 0.0) -> None:
        """NOT_SERVING at once; after ``drain`` seconds (for probes to notice) stop
        taking RPCs and let in-flight ones finish within ``grace`` seconds; then
        finish checkpoint writes and, with a checkpoint folder, save the final state."""
        _IN_PROCESS.pop(self.address, None)
        await self.health.enter_graceful_shutdown()
        if drain > 0:
            await asyncio.sleep(drain)
        await asyncio.gather(self._server.stop(grace), self.link.stop(grace))
        await self.store.flush_checkpoints(final=True)
        self.requests.close()

    async def wait(self) -> None:
        await self._server.wait_for_termination()


async def serve(
    shard: int,
    shards: int,
    address: str,
    *,
    grace: float = 5.0,
    drain: float = 0.0,
    metrics_port: int | None = None,
    ready_file: str | None = None,
    **options,
) -> None:
    """Run one shard until SIGTERM/SIGINT: the first signal starts a graceful stop
    (NOT_SERVING for ``drain`` seconds, then in-flight RPCs get ``grace`` seconds),
    a second one exits at once. Once serving, the shard's address is written to
    ``ready_file`` as JSON (for a supervisor: ``psfw.jobs.children``)."""
    server = ShardServer(shard, shards, **options)
    await server.start(address, metrics_port=metrics_port)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def on_signal() -> None:
        if stopping.is_set():
            say(f"psfw shard {shard}: second signal, exiting now")
            os._exit(1)
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    extra = f" (link: port {server.link.port})" if server.link.port else ""
    extra += f", metrics on http://{server.metrics_address}/metrics" if server.metrics_address else ""
    if server.restored_step is not None:
        made_on = f", made on {server.restored_from_shards} shards" if server.restored_from_shards else ""
        extra += f", restored step {server.restored_step} (epoch {server.store.epoch}{made_on})"
    say(f"psfw shard {shard}/{shards} listening on {server.address}{extra}", sys.stdout)
    if ready_file:
        record = {
            "shard": shard,
            "shards": shards,
            "address": server.address,
            "metrics": server.metrics_address or None,
            "link_port": server.link.port or None,
            "restored_step": server.restored_step,
            "restored_from_shards": server.restored_from_shards or None,
            "pid": os.getpid(),
        }
        try:
            await asyncio.to_thread(write_atomic, Path(ready_file), json.dumps(record).encode())
        except OSError as err:
            await server.stop(0)
            raise OSError(f"cannot write the ready file {ready_file}: {err.strerror or err}") from None
    await stopping.wait()
    drained = f"NOT_SERVING for {drain:.1f} s (--drain), then " if drain > 0 else ""
    say(f"psfw shard {shard}: stopping, {drained}in-flight RPCs get {grace:.1f} s")
    await server.stop(grace, drain)
