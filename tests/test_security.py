"""TLS, mutual TLS and bearer tokens: no one without them gets in, and a refused call
changes nothing."""

import asyncio
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from psfw.base.errors import ShardError, UsageError
from psfw.base.security import Security, certificate_names
from psfw.jobs.config import parse_config
from psfw.jobs.embedded import train_async
from psfw.protocol.messages import UpdateHeader
from psfw.runtime.shard_client import ShardClient
from psfw.services.server import ShardServer, check_listen, listens_everywhere

from certs import TOKEN, make_ca, make_leaf
from helpers import SGD, psfw_command


def server_security(pki, mtls=True, token=True) -> Security:
    cert, key = pki["server"]
    return Security.from_files(
        str(cert), str(key), str(pki["ca"]) if mtls else None, str(pki["token"]) if token else None
    )


def client_security(pki, cert="client", token=TOKEN, ca=True) -> Security:
    files = pki[cert] if cert else (None, None)
    return Security.from_files(
        str(files[0]) if files[0] else None,
        str(files[1]) if files[1] else None,
        str(pki["ca"]) if ca else None,
        token=token,
    )


@pytest_asyncio.fixture
async def secured(pki):
    server = ShardServer(0, 1, security=server_security(pki))
    await server.start("127.0.0.1:0")
    good = ShardClient(server.address, 0, timeout_s=5, retries=0, security=client_security(pki))
    await good.put([("w", 0, np.zeros(4, np.float32))], SGD)
    yield server, good
    await good.close()
    await server.stop(0)


async def attempt(server, security):
    client = ShardClient(server.address, 0, timeout_s=5, retries=0, security=security)
    try:
        header = UpdateHeader(group=0, step=0, process=0, workers=1, rows=1, workers_per_group=1, wait_s=2)
        return await client.update(header, {("w", 0): np.ones(4, np.float32)}, lambda key: (np.dtype("float32"), (4,)))
    finally:
        await client.close()


@pytest.mark.unit
@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("missing token", grpc.StatusCode.UNAUTHENTICATED),
        ("wrong token", grpc.StatusCode.UNAUTHENTICATED),
        ("no client certificate", grpc.StatusCode.UNAVAILABLE),
        ("certificate from another CA", grpc.StatusCode.UNAVAILABLE),
        ("plaintext", grpc.StatusCode.UNAVAILABLE),
    ],
)
async def test_refused_callers_change_nothing(secured, pki, case, code):
    server, _ = secured
    security = {
        "missing token": client_security(pki, token=None),
        "wrong token": client_security(pki, token="guess"),
        "no client certificate": client_security(pki, cert=None),
        "certificate from another CA": client_security(pki, cert="rogue"),
        "plaintext": Security(token=TOKEN),
    }[case]
    before = server.store.digest()
    with pytest.raises(ShardError) as err:
        await attempt(server, security)
    assert err.value.code == code, str(err.value)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        assert "bearer token" in str(err.value)
    assert server.store.digest() == before
    assert server.store.updates_applied == 0


@pytest.mark.unit
@pytest.mark.asyncio
async def test_a_token_refusal_reaches_a_client_that_is_still_sending(secured, pki):
    """The shard refuses a wrong token at once, while the client still streams its
    request (4 MiB in 16 KiB messages): the client gets UNAUTHENTICATED every time,
    never gRPC's "INTERNAL: Internal error from Core" of a send that failed."""
    server, _ = secured
    before = server.store.digest()
    size = 1 << 20
    values = np.ones(size, np.float32)
    header = UpdateHeader(group=0, step=0, process=0, workers=1, rows=1, workers_per_group=1, wait_s=2)
    codes = []
    for _ in range(10):
        client = ShardClient(
            server.address,
            0,
            timeout_s=10,
            retries=0,
            chunk_bytes=16 << 10,
            security=client_security(pki, token="guess"),
        )
        try:
            for rpc in ("Update", "Put"):
                with pytest.raises(ShardError) as err:
                    if rpc == "Update":
                        await client.update(header, {("w", 0): values}, lambda key: (np.dtype("float32"), (size,)))
                    else:
                        await client.put([("v", 0, values)], SGD)
                codes.append(f"{err.value.code.name}: {err.value}")
        finally:
            await client.close()
    assert all(code.startswith("UNAUTHENTICATED") and "wrong bearer token" in code for code in codes), codes
    assert server.store.digest() == before


@pytest.mark.unit
@pytest.mark.asyncio
async def test_the_right_certificate_and_token_get_in(secured, pki):
    server, _ = secured
    answer = await attempt(server, client_security(pki))
    assert answer.step == 1 and server.store.updates_applied == 1


@pytest.mark.unit
@pytest.mark.asyncio
async def test_health_needs_no_token_but_tls_still_holds(secured, pki):
    server, _ = secured
    cert, key = pki["client"]
    credentials = grpc.ssl_channel_credentials(pki["ca"].read_bytes(), key.read_bytes(), cert.read_bytes())
    async with grpc.aio.secure_channel(server.address, credentials) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.asyncio
async def test_training_over_mutual_tls_with_a_token(pki):
    security = server_security(pki)
    servers = [ShardServer(i, 2, security=security) for i in range(2)]
    for s in servers:
        await s.start("127.0.0.1:0")
    config = parse_config({"train": {"batch_size": 32, "steps": 5}, "model": {"hidden": [16]}})
    try:
        result = await train_async(
            config, progress=False, outputs=False, servers=[s.address for s in servers], security=client_security(pki)
        )
        assert result.steps == 5 and all(s.store.updates_applied == 5 for s in servers)
    finally:
        for s in servers:
            await s.stop(0)


@pytest.mark.unit
def test_open_addresses_need_tls(pki):
    with pytest.raises(PermissionError, match="refusing to listen on 0.0.0.0:7000 without TLS"):
        check_listen("0.0.0.0:7000", Security(), insecure=False)
    # a token alone would cross the network in clear, with the tensors: refused like no auth
    with pytest.raises(PermissionError, match="with a bearer token but without TLS: .* in clear.*--insecure"):
        check_listen("0.0.0.0:7000", Security(token="t"), insecure=False)
    check_listen("0.0.0.0:7000", Security(token="t"), insecure=True)
    check_listen("127.0.0.1:7000", Security(token="t"), insecure=False)
    check_listen("0.0.0.0:7000", server_security(pki, mtls=False, token=False), insecure=False)
    check_listen("0.0.0.0:7000", server_security(pki, mtls=False, token=True), insecure=False)
    check_listen("0.0.0.0:7000", Security(), insecure=True)
    check_listen("127.0.0.5:7000", Security(), insecure=False)
    check_listen("[::1]:7000", Security(), insecure=False)
    check_listen("localhost:7000", Security(), insecure=False)
    with pytest.raises(PermissionError):  # a name that does not resolve is no loopback
        check_listen("psfw-shard.invalid:7000", Security(), insecure=False)


def _scrape(host: str, port: int) -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as reply:
        return reply.read().decode()


@pytest.mark.unit
@pytest.mark.asyncio
async def test_metrics_listen_on_the_shards_own_interface_and_count_refusals():
    """A shard on 127.0.0.2 serves its metrics on 127.0.0.2 only: all interfaces only
    when the shard itself listens on all of them."""
    server = ShardServer(0, 1)
    await server.start("127.0.0.2:0", metrics_port=0)
    client = ShardClient(server.address, 0, timeout_s=10, retries=0)
    try:
        assert server.metrics_address == f"127.0.0.2:{server.metrics_port}"
        with pytest.raises(urllib.error.URLError):
            await asyncio.to_thread(_scrape, "127.0.0.1", server.metrics_port)
        with pytest.raises(ShardError):
            await client.put([("w", 0, np.zeros(4, np.float32))], '{"name": "sgd", "learning_rate": -1}')
        text = await asyncio.to_thread(_scrape, "127.0.0.2", server.metrics_port)
        assert 'psfw_refused_requests_total{code="INVALID_ARGUMENT",method="Put",shard="0"} 1.0' in text
    finally:
        await client.close()
        await server.stop(0)
    assert listens_everywhere("0.0.0.0") and listens_everywhere("[::]")
    assert not any(listens_everywhere(h) for h in ("127.0.0.1", "10.1.2.3", "[::1]", "shard-0.psfw"))


@pytest.mark.unit
def test_a_name_is_loopback_only_when_all_its_addresses_are(monkeypatch):
    """/etc/hosts may point localhost anywhere: the name is resolved, not trusted."""
    import socket

    from psfw.services import server

    def resolve(host, port, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.9.9.9", 0))]

    monkeypatch.setattr(server.socket, "getaddrinfo", resolve)
    with pytest.raises(PermissionError, match="refusing to listen on localhost:7000"):
        check_listen("localhost:7000", Security(), insecure=False)


@pytest.mark.unit
def test_security_files_are_checked(tmp_path, pki):
    with pytest.raises(UsageError, match="give both"):
        Security.from_files(cert=str(pki["server"][0]))
    with pytest.raises(UsageError, match="token file .*absent: No such file"):
        Security.from_files(token_file=str(tmp_path / "absent"))
    (tmp_path / "blank").write_text("\n")
    with pytest.raises(UsageError, match="is empty"):
        Security.from_files(token_file=str(tmp_path / "blank"))
    for bad in ("two\nlines", "with space", "caf\u00e9"):
        (tmp_path / "bad").write_bytes(bad.encode() + b"\n")
        with pytest.raises(UsageError, match="printable ASCII characters without spaces"):
            Security.from_files(token_file=str(tmp_path / "bad"))
    (tmp_path / "latin").write_bytes(b"\xff\xfe")
    with pytest.raises(UsageError, match="printable ASCII"):
        Security.from_files(token_file=str(tmp_path / "latin"))
    (tmp_path / "good").write_text("s3cr3t-Token_1\n")
    assert Security.from_files(token_file=str(tmp_path / "good")).token == "s3cr3t-Token_1"


@pytest.mark.unit
def test_server_command_refuses_an_open_address_in_one_line(capsys):
    done = psfw_command(capsys, "server", "--listen", "0.0.0.0:0")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "--insecure" in done.stderr


@pytest.mark.unit
@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (("psfw-shard-0.psfw-shard", "10.0.0.7"), ["psfw-shard-0.psfw-shard", "10.0.0.7"]),
        (("fd00::5",), ["fd00::5"]),
        (("*.psfw-shard.default.svc",), ["probe.psfw-shard.default.svc"]),
        ((), ["plain"]),  # no subjectAltName: the common name
    ],
)
def test_certificate_names_are_read_from_the_certificate(tmp_path, names, expected):
    cert, _ = make_leaf(tmp_path, "plain", make_ca(tmp_path, "ca"), server=bool(names), names=names)
    assert certificate_names(cert.read_bytes()) == expected
    assert certificate_names(b"not a certificate") == []


@pytest.mark.unit
@pytest.mark.asyncio
async def test_refusals_of_made_up_methods_share_one_metric_label():
    """A client without the token may call any path: each would otherwise become a
    label of its own, growing the shard's memory without bound."""
    server = ShardServer(0, 1, security=Security(token=TOKEN))
    await server.start("127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            for n in range(5):
                call = channel.unary_unary(f"/psfw.v1.ParameterServer/Made{n}")
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call(b"", timeout=10)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        registry = server.requests.metrics.registry
        labels = {"shard": "0", "method": "other", "code": "UNAUTHENTICATED"}
        assert registry.get_sample_value("psfw_refused_requests_total", labels) == 5
        made_up = [s for m in registry.collect() for s in m.samples if s.labels.get("method", "").startswith("Made")]
        assert not made_up
    finally:
        await server.stop(0)
