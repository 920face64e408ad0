"""TLS over the link: a shard with TLS speaks it on its Unix socket and its TCP port
with the certificates of its gRPC port, and only a client that gRPC would let in gets
a link (real servers on 127.0.0.1, real clients, throwaway certificates)."""

import asyncio
import logging
import ssl
import time

import grpc
import numpy as np
import pytest

from psfw.base.errors import ShardError
from psfw.base.security import Security
from psfw.protocol.messages import GetHeader, UpdateHeader
from psfw.runtime.link_connection import LinkConnection, link_place
from psfw.runtime.shard_client import ShardClient
from psfw.services import link_server
from psfw.services.server import ShardServer

from certs import TOKEN
from helpers import SGD, link_calls

SOCKETS = ["unix", "tcp"]
START = np.linspace(-1, 1, 1000, dtype=np.float32)


def _expect(key):
    return np.dtype("float32"), (1000,)


def _header(step: int) -> UpdateHeader:
    return UpdateHeader(group=0, step=step, process=0, workers=1, rows=2, workers_per_group=1, wait_s=5)


def _shard_security(pki, cert: str = "server", client_ca: bool = False) -> Security:
    files = pki[cert]
    return Security.from_files(str(files[0]), str(files[1]), str(pki["ca"]) if client_ca else None, str(pki["token"]))


def _client_security(pki, cert: str | None = None, ca: str | None = "ca") -> Security:
    files = pki[cert] if cert else (None, None)
    return Security.from_files(
        str(files[0]) if files[0] else None,
        str(files[1]) if files[1] else None,
        str(pki[ca]) if ca else None,
        token=TOKEN,
    )


async def _shard(security: Security) -> ShardServer:
    server = ShardServer(0, 1, security=security)
    await server.start("127.0.0.1:0")
    return server


def _client(server: ShardServer, security: Security, socket_kind: str, **options) -> ShardClient:
    return ShardClient(
        server.address, 0, timeout_s=10, retries=0, security=security, same_host=socket_kind == "unix", **options
    )


@pytest.mark.unit
@pytest.mark.asyncio
@pytest.mark.parametrize("socket_kind", SOCKETS)
@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
async def test_a_shard_with_tls_serves_put_get_and_update_over_its_tls_link(pki, socket_kind, mutual, monkeypatch):
    """A shard with a certificate (and, for mutual TLS, a client CA): a client that
    trusts it (with its own certificate where the shard asks for one) opens the link
    on either socket in TLS, says so in its kind, and the link carries Put, Get and
    Update with the right answers."""
    server = await _shard(_shard_security(pki, client_ca=mutual))
    carried = link_calls(server, monkeypatch)
    client = _client(server, _client_security(pki, "client" if mutual else None), socket_kind)
    try:
        await client.open_link()
        assert client.linked == socket_kind and client.kind == f"link ({socket_kind}, TLS)"
        assert await client.put([("w", 0, START)], SGD) == 1
        got = await client.get(GetHeader(0, 0, [("w", 0)], 5), _expect)
        np.testing.assert_array_equal(got.values[("w", 0)], START)
        answer = await client.update(_header(0), {("w", 0): np.full(1000, 4.0, np.float32)}, _expect)
        np.testing.assert_allclose(answer.values[("w", 0)], START - np.float32(0.1 * 4.0 / 2), rtol=1e-6, atol=1e-6)
        assert [method for method, _ in carried] == ["Put", "Get", "Update"]
        assert client.linked == socket_kind
        connections = list(server.link._connections)
        assert connections and all(isinstance(c, ssl.SSLSocket) for c in connections), "the bytes travel in TLS"
    finally:
        await client.close()
        await server.stop(0)


CANNOT_TRUST = {
    "no CA": ("server", None),  # plaintext: a client without TLS credentials
    "another CA": ("server", "rogue-ca"),
    "certificate for another name": ("other-name", "ca"),
}


@pytest.mark.unit
@pytest.mark.asyncio
@pytest.mark.parametrize("socket_kind", SOCKETS)
@pytest.mark.parametrize("case", list(CANNOT_TRUST))
async def test_a_client_that_cannot_verify_the_shard_gets_no_link_and_fails_as_over_grpc(
    pki, socket_kind, case, monkeypatch, caplog
):
    """A client without the shard's CA (a plaintext one, or one that trusts another
    CA), or a shard whose certificate names another host: the link cannot be opened
    (not even over the Unix socket), the call fails as it does with no link at all
    (gRPC cannot connect either), nothing reaches the shard, and its log holds no
    traceback."""
    cert, ca = CANNOT_TRUST[case]
    server = await _shard(_shard_security(pki, cert))
    carried = link_calls(server, monkeypatch)
    client = _client(server, _client_security(pki, ca=ca), socket_kind)
    plain = _client(server, _client_security(pki, ca=ca), socket_kind, link=False)
    try:
        await client.open_link(server.description())  # the Describe answer of a client that gets in
        assert client.linked == "" and client.kind == "grpc"
        codes = []
        for each in (client, plain):
            with pytest.raises(ShardError) as err:
                await each.put([("w", 0, START)], SGD)
            codes.append(err.value.code)
        assert codes[0] == codes[1] and codes[0] in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)
        assert not carried and not server.requests.rpc_counts, "nothing reached the shard"
        assert not any(r.exc_info for r in caplog.records if r.name.startswith("psfw")), "never a traceback"
    finally:
        await client.close()
        await plain.close()
        await server.stop(0)


@pytest.mark.unit
@pytest.mark.asyncio
@pytest.mark.parametrize("socket_kind", SOCKETS)
@pytest.mark.parametrize("cert", [None, "rogue"], ids=["no-client-certificate", "certificate-of-another-ca"])
async def test_with_mutual_tls_a_client_without_a_good_certificate_gets_no_link(pki, socket_kind, cert, monkeypatch):
    """A shard that requires client certificates (a client CA): a client that trusts
    the shard but has no certificate, or one the client CA did not sign, opens no
    link on either socket; its calls fail as over gRPC and change nothing, while a
    client with a good certificate is served over its link."""
    server = await _shard(_shard_security(pki, client_ca=True))
    good = _client(server, _client_security(pki, "client"), socket_kind)
    stranger = _client(server, _client_security(pki, cert), socket_kind)
    try:
        await good.open_link()
        assert await good.put([("w", 0, START)], SGD) == 1 and good.linked == socket_kind
        carried = link_calls(server, monkeypatch)
        await stranger.open_link(server.description())
        assert stranger.linked == "" and stranger.kind == "grpc"
        with pytest.raises(ShardError) as err:
            await stranger.update(_header(0), {("w", 0): np.ones(1000, np.float32)}, _expect)
        assert err.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)
        assert not carried and server.requests.rpc_counts["Update"] == 0
        answer = await good.update(_header(0), {("w", 0): np.ones(1000, np.float32)}, _expect)
        assert answer.step == 1 and [method for method, _ in carried] == ["Update"]
    finally:
        await good.close()
        await stranger.close()
        await server.stop(0)


@pytest.mark.unit
@pytest.mark.asyncio
async def test_a_plaintext_hello_to_a_tls_link_is_refused(pki):
    """A connection that speaks the link in plaintext to a shard with TLS gets no OK,
    whatever its token: the shard closes it in the handshake."""
    server = await _shard(_shard_security(pki))
    try:
        for same_host in (True, False):
            place = link_place(server.description(), server.address, same_host)
            with pytest.raises(OSError):
                await LinkConnection.open(place, TOKEN, None)
    finally:
        await server.stop(0)


@pytest.mark.asyncio
async def test_a_tls_shard_stops_at_once_beside_connections_that_never_finish_their_handshake(pki, monkeypatch):
    """Connections to a shard with TLS that never say a word (their handshake never
    starts): a stop ends them at once, as it ends plaintext ones, and does not wait
    out HELLO_S."""
    monkeypatch.setattr(link_server, "HELLO_S", 5.0)
    server = await _shard(_shard_security(pki))
    idle = [link_place(server.description(), server.address, same_host).connect() for same_host in (True, False)]
    try:
        deadline = time.monotonic() + 10
        while server.link._greeting < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # in their handshakes
        started = time.monotonic()
        await server.stop(0)
        assert time.monotonic() - started < 2.0, "the stop waited for the handshakes to time out"
        assert not server.link._connections
    finally:
        for sock in idle:
            sock.close()


@pytest.mark.unit
@pytest.mark.asyncio
async def test_the_link_over_tls_logs_a_failed_handshake_in_one_line(pki, caplog):
    """A client that the shard's TLS refuses leaves one line in the shard's log (at
    INFO: a handshake is not a request), never a traceback."""
    caplog.set_level(logging.INFO, logger="psfw.server")
    server = await _shard(_shard_security(pki, client_ca=True))
    try:
        place = link_place(server.description(), server.address, same_host=False)
        with pytest.raises(OSError):
            await LinkConnection.open(place, TOKEN, _client_security(pki).link_client_context())
        deadline = time.monotonic() + 10
        while not any("ended" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        lines = [r.getMessage() for r in caplog.records if r.name == "psfw.server" and "ended" in r.getMessage()]
        assert len(lines) == 1 and "link from 127.0.0.1" in lines[0], lines
        assert not any(r.exc_info for r in caplog.records)
    finally:
        await server.stop(0)


@pytest.mark.unit
@pytest.mark.asyncio
@pytest.mark.parametrize("socket_kind", SOCKETS)
async def test_a_stopping_tls_shard_ends_its_links_and_a_call_in_flight_within_its_grace(pki, socket_kind):
    """A shard with TLS stops with one client's link idle and another's Update waiting
    for the rest of its group: the stop returns within its grace, the waiting client
    gets an error, never a hang, and no connection thread outlives the stop."""
    server = await _shard(_shard_security(pki))
    idle = _client(server, _client_security(pki), socket_kind)
    waiting = _client(server, _client_security(pki), socket_kind)
    try:
        for client in (idle, waiting):
            await client.open_link()
            assert client.linked == socket_kind
        await idle.put([("w", 0, START)], SGD)
        header = UpdateHeader(group=0, step=0, process=0, workers=1, rows=2, workers_per_group=2, wait_s=30)
        update = asyncio.create_task(waiting.update(header, {("w", 0): np.ones(1000, np.float32)}, _expect))
        deadline = time.monotonic() + 10
        while not server.description().groups and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.wait_for(server.stop(0.2), 10)
        with pytest.raises(ShardError):
            await asyncio.wait_for(update, 15)
        assert not server.link._connections, "no connection thread outlives the stop"
    finally:
        await idle.close()
        await waiting.close()
        await server.stop(0)
