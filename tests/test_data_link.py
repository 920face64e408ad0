"""The data link: a shard's Put, Get and Update over TCP beside gRPC (real servers on
127.0.0.1, real sockets)."""

import asyncio
import logging
import socket

import grpc
import numpy as np
import pytest
import pytest_asyncio

from psfw.base.errors import ShardError, WireError
from psfw.base.security import Security
from psfw.protocol.data_link import KeptPages, data_host, framed, recv_frame
from psfw.protocol.local_link import CALL, END, ERROR, HEAD, HELLO, MESSAGE, OK, LinkBroken
from psfw.protocol.messages import UpdateHeader
from psfw.runtime.data_client import DataLink
from psfw.runtime.shard_client import ShardClient
from psfw.services import data_server
from psfw.services.server import ShardServer

from certs import make_pki
from helpers import SGD

TOKEN = "data-token-0123"
N = 300_000  # float32: a slice larger than one 1 MiB message, so it spans several
START = np.linspace(-1, 1, N, dtype=np.float32)


def _expect(key):
    return np.dtype("float32"), (N,)


def _header(step: int, workers_per_group: int = 1, wait_s: float = 5) -> UpdateHeader:
    return UpdateHeader(
        group=0, step=step, process=0, workers=1, rows=4, workers_per_group=workers_per_group, wait_s=wait_s
    )


async def _client(server: ShardServer, **options) -> ShardClient:
    client = ShardClient(server.address, 0, timeout_s=10, retries=0, security=Security(token=TOKEN), **options)
    await client.open_data_link()
    return client


@pytest_asyncio.fixture
async def shard():
    server = ShardServer(0, 1, security=Security(token=TOKEN))
    await server.start("127.0.0.1:0")
    client = await _client(server)
    await client.put([("w", 0, START)], SGD)
    yield server, client
    await client.close()
    await server.stop(0)


@pytest.mark.asyncio
async def test_put_get_and_update_over_the_link_equal_grpc_and_count_alike():
    """Two fresh shards, one reached over the data link and one over gRPC alone: the
    same Put, Get and Updates give bit-equal answers, and each shard counts them."""
    servers = [ShardServer(0, 1, security=Security(token=TOKEN)) for _ in range(2)]
    for server in servers:
        await server.start("127.0.0.1:0")
    linked, plain = await _client(servers[0]), await _client(servers[1], data_link=False)
    try:
        assert linked.kind == "tcp" and plain.kind == "grpc"
        assert (await linked.describe()).data_port == servers[0].data.port > 0
        rng = np.random.default_rng(0)
        answers = []
        for client in (linked, plain):
            assert await client.put([("w", 0, START)], SGD) == 1
            got = await client.get(0, 0, [("w", 0)], _expect, 5)
            np.testing.assert_array_equal(got.values[("w", 0)], START)
            steps = []
            for step in range(3):
                grads = {("w", 0): rng.standard_normal(N).astype(np.float32)}
                steps.append((await client.update(_header(step), grads, _expect)).values[("w", 0)].copy())
            answers.append(steps)
            rng = np.random.default_rng(0)  # the same gradients for the other shard
        for over_link, over_grpc in zip(*answers, strict=True):
            np.testing.assert_array_equal(over_link, over_grpc)
        for client in (linked, plain):
            counts = (await client.describe()).rpc_counts
            assert (counts["Put"], counts["Get"], counts["Update"]) == (1, 1, 3)
        assert linked.kind == "tcp", "the link stayed up"
        looker = ShardClient(servers[0].address, 0, timeout_s=10, security=Security(token=TOKEN))
        await looker.describe()  # a client for status or health: a Describe opens no link
        assert looker.kind == "grpc"
        await looker.close()
    finally:
        for client in (linked, plain):
            await client.close()
        for server in servers:
            await server.stop(0)


@pytest.mark.asyncio
async def test_a_refusal_on_the_link_is_the_same_shard_error_and_keeps_the_link(shard):
    server, client = shard
    wrong = {("w", 0): np.zeros(N, np.float64)}
    with pytest.raises(ShardError) as err:
        await client.update(_header(0), wrong, lambda key: (np.dtype("float64"), (N,)))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "float32" in str(err.value)
    assert "shard 0" in str(err.value) and client.kind == "tcp"
    with pytest.raises(ShardError) as err:
        await client.get(0, 5, [("w", 0)], _expect, 0.2)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    answer = await client.update(_header(0), {("w", 0): np.ones(N, np.float32)}, _expect)
    assert answer.step == 1 and client.kind == "tcp"
    assert (await client.describe()).slices[0].version == 1, "refused requests changed nothing"


@pytest.mark.asyncio
async def test_a_wrong_token_is_refused_at_hello_in_one_line(shard, caplog):
    server, _ = shard
    caplog.set_level(logging.WARNING, logger="psfw.server")
    for token in ("not-the-token", None):
        with pytest.raises(WireError) as err:
            await DataLink.open("127.0.0.1", server.data.port, token)
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert lines and "wrong bearer token" in lines[0] and "data link from 127.0.0.1" in lines[0]
    assert not any(r.exc_info for r in caplog.records), "a refusal is one line, never a traceback"
    link = await DataLink.open("127.0.0.1", server.data.port, TOKEN, server.data.id)
    await link.close()


@pytest.mark.asyncio
async def test_a_client_sends_nothing_to_a_link_that_is_not_the_shard_it_described(shard):
    """What answers on the port a Describe named must be that shard's link (another
    shard's, after a restart or through a port forward, is not): else gRPC."""
    server, client = shard
    with pytest.raises(LinkBroken, match="another shard"):
        await DataLink.open("127.0.0.1", server.data.port, TOKEN, "not-this-link")
    old = server.data.id
    await server.data.stop(0)
    port = server.data.port or (await client.describe()).data_port
    server.servicer.data_port = await server.data.start("127.0.0.1", port)
    server.servicer.data_id = server.data.id
    assert server.data.id != old, "a link started anew has a new id"
    answer = await client.update(_header(0), {("w", 0): np.ones(N, np.float32)}, _expect)
    assert answer.step == 1  # the old link is gone: gRPC, then the Describe links the new one
    await client.describe()
    assert client.kind == "tcp"


@pytest.mark.asyncio
async def test_a_lost_link_falls_back_to_grpc_and_a_describe_opens_the_new_one(shard):
    """A shard whose data link went away: the Update goes over gRPC, applied once;
    a Describe that names a new port links again."""
    server, client = shard
    grads = {("w", 0): np.ones(N, np.float32)}
    await server.data.stop(0)
    answer = await client.update(_header(0), grads, _expect)
    assert answer.step == 1 and client.kind == "grpc"
    server.servicer.data_port = await server.data.start("127.0.0.1")
    server.servicer.data_id = server.data.id
    await client.describe()
    assert client.kind == "tcp"
    answer = await client.update(_header(1), grads, _expect)
    assert answer.step == 2 and client.kind == "tcp"
    assert (await client.describe()).slices[0].version == 2, "each Update was applied once"


@pytest.mark.asyncio
async def test_a_stopping_shard_ends_a_call_in_flight_within_its_grace(shard):
    """An Update that waits for the rest of its group when the shard stops: the stop
    returns within its grace and the client gets an error, never a hang."""
    server, client = shard
    grads = {("w", 0): np.ones(N, np.float32)}
    waiting = asyncio.create_task(client.update(_header(0, workers_per_group=2, wait_s=30), grads, _expect))
    watcher = await _client(server, data_link=False)
    try:
        for _ in range(200):  # bounded: the contribution arrives within a second or two
            if (await watcher.describe()).groups:
                break
            await asyncio.sleep(0.01)
        await asyncio.wait_for(server.stop(0.2), 10)
        with pytest.raises(ShardError):
            await asyncio.wait_for(waiting, 15)
        assert not server.data._connections, "no connection thread outlives the stop"
    finally:
        await watcher.close()


@pytest.mark.asyncio
async def test_bytes_that_are_no_call_end_that_connection_only(shard, caplog):
    """Garbage, a frame that claims a gigabyte, a call of an unknown method and
    fifty random byte sequences: each connection ends, the shard's state is
    untouched, its log has no traceback, and it serves on."""
    server, client = shard
    hello = HEAD.pack(HELLO, len(TOKEN)) + TOKEN.encode()
    rng = np.random.default_rng(3)
    cases = [
        HEAD.pack(99, 3) + b"abc",
        HEAD.pack(HELLO, 1 << 30),
        hello + HEAD.pack(CALL, 7) + b"Restore" + HEAD.pack(END, 0),
        hello + HEAD.pack(CALL, 6) + b"Update" + HEAD.pack(MESSAGE, 1 << 30),
    ]
    for case in range(50):
        junk = rng.bytes(int(rng.integers(0, 200)))
        kinds = [int(k) for k in rng.integers(0, 8, size=3)]
        frames = b"".join(HEAD.pack(k, len(junk)) + junk for k in kinds)
        cases.append((hello if case % 2 else b"") + (frames if case % 3 else junk))
    for sent in cases:
        await asyncio.to_thread(_send_and_read, server.data.port, sent)
    assert (await client.describe()).slices[0].version == 0
    assert not any(r.exc_info for r in caplog.records), "a refusal is one line, never a traceback"
    answer = await client.update(_header(0), {("w", 0): np.ones(N, np.float32)}, _expect)
    assert answer.step == 1 and client.kind == "tcp"


def _send_and_read(port: int, sent: bytes) -> None:
    """Send ``sent`` and read what comes until the shard closes the connection."""
    with socket.create_connection(("127.0.0.1", port), 5) as sock:
        sock.settimeout(10)
        try:
            sock.sendall(sent)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(1 << 16):  # an answer or none, then the shard closes
                pass
        except OSError:  # reset, broken pipe, not connected: the shard ended it, unread bytes and all
            pass


@pytest.mark.asyncio
async def test_a_malformed_message_in_a_call_is_refused_and_the_link_serves_on(shard):
    server, client = shard

    def calls() -> list[tuple[int, bytes]]:
        with socket.create_connection(("127.0.0.1", server.data.port), 5) as sock:
            sock.settimeout(10)
            sock.sendall(b"".join(framed(HELLO, [TOKEN.encode()])))
            answers = [recv_frame(sock)]
            for _ in range(2):  # refused twice on the same connection
                put = [*framed(CALL, [b"Put"]), *framed(MESSAGE, [b"\xff\xff\xff"]), *framed(END, [])]
                sock.sendall(b"".join(put))
                answers.append(recv_frame(sock))
        return [(kind, bytes(payload)) for kind, payload in answers]

    hello, *refusals = await asyncio.to_thread(calls)
    assert hello[0] == OK
    assert all(kind == ERROR and b"INVALID_ARGUMENT" in payload for kind, payload in refusals)
    assert (await client.describe()).slices[0].version == 0


@pytest.mark.asyncio
async def test_a_shard_with_tls_offers_no_link_and_a_shard_may_be_told_none(tmp_path):
    pki = make_pki(tmp_path)
    cert, key = pki["server"]
    tls = ShardServer(0, 1, security=Security.from_files(str(cert), str(key)))
    off = ShardServer(0, 1, data_port=None)
    await tls.start("127.0.0.1:0")
    await off.start("127.0.0.1:0")
    clients = [
        ShardClient(tls.address, 0, timeout_s=10, security=Security.from_files(ca=str(pki["ca"]))),
        ShardClient(off.address, 0, timeout_s=10),
    ]
    try:
        for client in clients:
            await client.open_data_link()
            assert (await client.describe()).data_port == 0 and client.kind == "grpc"
            assert await client.put([("w", 0, START)], SGD) == 1
    finally:
        for client in clients:
            await client.close()
        await tls.stop(0)
        await off.stop(0)
    plain = ShardClient("127.0.0.1:1", 0, security=Security.from_files(ca=str(pki["ca"])))
    assert not plain.data_link, "a client with TLS credentials never uses the plaintext link"
    await plain.close()


def test_the_link_host_is_the_host_of_the_grpc_address():
    assert data_host("127.0.0.1:50051") == "127.0.0.1"
    assert data_host("[::1]:50051") == "::1"
    assert data_host("shard-0.psfw:50051") == "shard-0.psfw"
    assert data_host("unix:/tmp/shard.sock") is None
    assert data_host("dns:///shard:50051") is None


@pytest.mark.asyncio
async def test_a_link_that_broke_is_opened_again_after_a_back_off(shard):
    """A connection that breaks (a network hiccup): that call goes over gRPC, and a
    call after the back-off opens the link again."""
    server, client = shard
    grads = {("w", 0): np.ones(N, np.float32)}
    client._data._link._abort()  # the connection breaks under the client
    assert (await client.update(_header(0), grads, _expect)).step == 1
    assert client.kind == "grpc"
    await asyncio.sleep(1.2)  # the first back-off is 1 s
    assert (await client.update(_header(1), grads, _expect)).step == 2
    assert client.kind == "tcp"
    assert (await client.describe()).slices[0].version == 2, "each Update was applied once"


@pytest.mark.asyncio
async def test_connections_that_say_no_hello_are_few_and_brief(shard, monkeypatch):
    """Connections that send nothing (or a byte now and then) hold no thread for long,
    and only a few at once: more are closed on arrival."""
    server, client = shard
    monkeypatch.setattr(data_server, "HELLO_S", 0.5)
    monkeypatch.setattr(data_server, "MAX_GREETING", 2)
    idle = [socket.create_connection(("127.0.0.1", server.data.port), 5) for _ in range(2)]
    try:
        idle[0].sendall(HEAD.pack(HELLO, len(TOKEN))[:3])  # a HELLO begun, never finished
        await asyncio.sleep(0.1)
        with pytest.raises(OSError):  # the third waits for no HELLO: closed at once
            await DataLink.open("127.0.0.1", server.data.port, TOKEN, server.data.id)
        await asyncio.sleep(1.0)  # past HELLO_S: both were closed
        for sock in idle:
            sock.settimeout(5)
            assert await asyncio.to_thread(sock.recv, 16) == b""
        link = await DataLink.open("127.0.0.1", server.data.port, TOKEN, server.data.id)
        await link.close()
    finally:
        for sock in idle:
            sock.close()


@pytest.mark.asyncio
async def test_a_call_over_the_shards_request_limit_is_refused_and_changes_nothing():
    server = ShardServer(0, 1, security=Security(token=TOKEN), max_request_bytes=N * 4 + 4096)
    await server.start("127.0.0.1:0")
    client = await _client(server)
    try:
        assert await client.put([("w", 0, START)], SGD) == 1
        assert client.kind == "tcp"
        too_many = {("w", 0): np.ones(N, np.float32), ("x", 0): np.ones(N, np.float32)}
        with pytest.raises(ShardError) as err:
            await client.update(_header(0), too_many, lambda key: (np.dtype("float32"), (N,)))
        assert err.value.code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.NOT_FOUND)
        assert (await client.describe()).slices[0].version == 0
        await asyncio.sleep(1.2)
        answer = await client.update(_header(0), {("w", 0): np.ones(N, np.float32)}, _expect)
        assert answer.step == 1 and client.kind == "tcp"
    finally:
        await client.close()
        await server.stop(0)


@pytest.mark.asyncio
async def test_a_data_port_that_cannot_be_reached_is_not_tried_on_every_call(shard, monkeypatch):
    """A link whose port shuts (a firewall that drops it would cost each try the whole
    connect timeout): tried once after the back-off, then not again until a Describe
    names another link; the calls go over gRPC meanwhile."""
    server, client = shard
    tries = []
    opened = DataLink.open

    async def counted(*args):
        tries.append(args)
        return await opened(*args)

    monkeypatch.setattr(DataLink, "open", counted)
    await server.data.stop(0)  # the Describe answer still names the port
    grads = {("w", 0): np.ones(N, np.float32)}
    assert (await client.update(_header(0), grads, _expect)).step == 1
    await asyncio.sleep(1.2)  # past the first back-off: one try
    for step in range(1, 4):  # past every back-off a link that broke would wait out
        assert (await client.update(_header(step), grads, _expect)).step == step + 1
        await client.describe()
        await asyncio.sleep(1.1)
    assert len(tries) == 1 and client.kind == "grpc"


def test_a_put_s_bytes_land_aligned_in_mappings_sized_to_the_call():
    """What a Put keeps comes in mappings whose pages are in place already: each
    buffer aligned and on its own, a small call's mapping small, a large call's
    mappings at most the chunk (what it leaves unused is bounded by both)."""

    def mapping(view: memoryview):
        return view.obj.base  # the array the view was cut from, then its mmap

    pages = KeptPages(chunk=1 << 20)
    assert len(mapping(pages.take(100))) == 128, "a small call maps what it needs"
    views = [pages.take(n) for n in (300_000, 300_000, 700_000, 3 << 20, 10)]
    addresses = [np.frombuffer(v, np.uint8).ctypes.data for v in views]
    assert all(a % 64 == 0 for a in addresses)
    spans = sorted((a, a + len(v)) for a, v in zip(addresses, views, strict=True))
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:])), "no two buffers overlap"
    for value, view in enumerate(views):  # writable, each its own
        np.frombuffer(view, np.uint8)[:] = value
    assert [int(np.frombuffer(v, np.uint8)[-1]) for v in views] == list(range(len(views)))
    # each mapping as large as what the call took so far (at least its frame, at
    # most the chunk unless the frame is larger)
    assert [len(mapping(v)) for v in views] == [300_032, 300_160, 700_032, 3 << 20, 1 << 20]
