"""The link: a shard's Put, Get and Update over a socket beside gRPC, its Unix socket
for a client on its host and its TCP port for the others (real servers on 127.0.0.1,
real clients, real sockets). TLS over the link: tests/test_link_tls.py; shared memory:
tests/test_shm.py."""

import asyncio
import logging
import socket
import time
from typing import NamedTuple

import grpc
import numpy as np
import pytest
import pytest_asyncio

from psfw.base.errors import ShardError, WireError
from psfw.base.security import Security
from psfw.proto import ps_pb2 as pb
from psfw.protocol.calls import PUT_PIECES, UPDATE_PIECES, put_messages
from psfw.protocol.chunks import ChunkedMessage, encode_chunks
from psfw.protocol.link import (
    CALL,
    END,
    ERROR,
    HEAD,
    HELLO,
    MESSAGE,
    OK,
    KeptPages,
    LinkBroken,
    framed,
    link_host,
    recv_frame,
    socket_address,
)
from psfw.protocol.messages import GetHeader, UpdateHeader
from psfw.protocol.shm import host_id
from psfw.runtime import link_client
from psfw.runtime.link_connection import LinkConnection, Place, link_place
from psfw.runtime.shard_client import ShardClient
from psfw.services import link_server
from psfw.services.server import ShardServer

from helpers import SGD, link_calls

TOKEN = "link-token-0123"
N = 300_000  # float32: a slice larger than one 1 MiB message, so it spans several
START = np.linspace(-1, 1, N, dtype=np.float32)
ROWS = 4
REOPEN_S = 0.1  # the clients' first back-off after a link failed (link_client.REOPEN_S, patched)
MAX_REOPEN_S = 4 * REOPEN_S  # and its longest (link_client.MAX_REOPEN_S, patched)
SOCKETS = ["unix", "tcp"]


def _expect(key):
    return np.dtype("float32"), (N,)


def _header(step: int, workers_per_group: int = 1, wait_s: float = 5) -> UpdateHeader:
    return UpdateHeader(
        group=0, step=step, process=0, workers=1, rows=ROWS, workers_per_group=workers_per_group, wait_s=wait_s
    )


def _get(step: int, wait_s: float = 5) -> GetHeader:
    return GetHeader(0, step, [("w", 0)], wait_s)


def _grads(value: float) -> dict:
    return {("w", 0): np.full(N, value, np.float32)}


def _sgd(values: np.ndarray, grad: float) -> np.ndarray:
    """What the shard's SGD (learning rate 0.1) makes of ``values`` for one Update."""
    return values - np.float32(0.1) * np.float32(grad) / np.float32(ROWS)


async def _client(server: ShardServer, socket_kind: str = "tcp", **options) -> ShardClient:
    """A client of ``server`` that moves tensors over its link (the ``socket_kind``
    one: the Unix socket on this host, or TCP as if from another host)."""
    options.setdefault("retries", 0)
    client = ShardClient(
        server.address, 0, timeout_s=10, security=Security(token=TOKEN), same_host=socket_kind == "unix", **options
    )
    await client.open_link()
    return client


def _place(server: ShardServer, socket_kind: str) -> Place:
    """Where the shard's ``socket_kind`` socket is, as a client reads its Describe."""
    return link_place(server.description(), server.address, same_host=socket_kind == "unix")


async def _restart_link(server: ShardServer) -> None:
    """The shard's link stops and starts anew (as in a restarted shard: a new socket,
    port and id), and its Describe names the new one."""
    await server.link.stop(0)
    await server.link.start("127.0.0.1")
    requests = server.requests
    requests.link_socket, requests.link_port, requests.link_id = server.link.socket, server.link.port, server.link.id


class Shard(NamedTuple):
    server: ShardServer
    client: ShardClient
    socket: str  # the socket the client's link uses


@pytest_asyncio.fixture(params=SOCKETS)
async def shard(request, monkeypatch):
    """A shard holding ``w`` (START) and a client linked to it over the Unix socket or
    over TCP; the clients' link back-off is short."""
    monkeypatch.setattr(link_client, "REOPEN_S", REOPEN_S)
    monkeypatch.setattr(link_client, "MAX_REOPEN_S", MAX_REOPEN_S)
    server = ShardServer(0, 1, security=Security(token=TOKEN))
    await server.start("127.0.0.1:0")
    client = await _client(server, request.param)
    await client.put([("w", 0, START)], SGD)
    assert client.linked == request.param
    yield Shard(server, client, request.param)
    await client.close()
    await server.stop(0)


async def _until(condition, what: str, limit_s: float = 10) -> None:
    """Wait (bounded) until ``condition()`` holds."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"still not {what} after {limit_s} s"
        await asyncio.sleep(0.01)


# -- what the link carries ---------------------------------------------------


@pytest.mark.unit
@pytest.mark.asyncio
@pytest.mark.parametrize("socket_kind", SOCKETS)
async def test_put_get_and_update_over_either_socket_equal_grpc_and_count_alike(socket_kind, monkeypatch):
    """Two fresh shards, one reached over its link (the Unix socket on this host, or
    TCP) and one over gRPC alone: the same Put, Get and Updates give bit-equal
    answers, the link carries all three verbs (the Unix socket now carries Put and
    Get too), and each shard counts them alike."""
    servers = [ShardServer(0, 1, security=Security(token=TOKEN)) for _ in range(2)]
    for server in servers:
        await server.start("127.0.0.1:0")
    carried = link_calls(servers[0], monkeypatch)
    unused = link_calls(servers[1], monkeypatch)
    linked, plain = await _client(servers[0], socket_kind), await _client(servers[1], socket_kind, link=False)
    try:
        assert linked.linked == socket_kind and linked.kind == f"link ({socket_kind})"
        assert plain.linked == "" and plain.kind == "grpc"
        reply = await linked.describe()
        assert reply.link_port == servers[0].link.port > 0
        assert reply.link_socket == servers[0].link.socket and reply.link_socket.startswith("@psfw-shard-")
        assert reply.link_id == servers[0].link.id
        rng = np.random.default_rng(0)
        answers = []
        for client in (linked, plain):
            assert await client.put([("w", 0, START)], SGD) == 1
            into = {("w", 0): np.empty(N, np.float32)}
            got = await client.get(_get(0), _expect, into)
            assert got.values[("w", 0)] is into[("w", 0)], "the values land in the caller's buffers"
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
        assert [method for method, _ in carried] == ["Put", "Get", "Update", "Update", "Update"]
        peer = "link from this host" if socket_kind == "unix" else "link from 127.0.0.1:"
        assert all(who.startswith(peer) for _, who in carried), carried
        assert not unused, "a client told not to use the link sends nothing there"
        assert linked.linked == socket_kind, "the link stayed up"
    finally:
        for client in (linked, plain):
            await client.close()
        for server in servers:
            await server.stop(0)


@pytest.mark.unit
@pytest.mark.asyncio
async def test_a_client_for_status_or_health_opens_no_link(shard):
    """A client that only asks (a Describe, as status and health do) never opens a link."""
    looker = ShardClient(shard.server.address, 0, timeout_s=10, security=Security(token=TOKEN))
    try:
        reply = await looker.describe()
        assert reply.link_port and reply.link_socket
        assert looker.linked == "" and looker.kind == "grpc"
    finally:
        await looker.close()


@pytest.mark.unit
@pytest.mark.asyncio
async def test_a_shard_told_no_link_port_offers_its_unix_socket_only():
    """``link_port=None``: no TCP port (clients of other hosts go over gRPC), the Unix
    socket still serves this host."""
    server = ShardServer(0, 1, link_port=None)
    await server.start("127.0.0.1:0")
    clients = []
    try:
        reply = server.description()
        assert reply.link_port == 0 and reply.link_socket and server.link.port == 0
        for socket_kind, linked in (("tcp", ""), ("unix", "unix")):
            client = ShardClient(server.address, 0, timeout_s=10, retries=0, same_host=socket_kind == "unix")
            clients.append(client)
            await client.open_link()
            assert client.linked == linked
            assert await client.put([("w", 0, START)], SGD) == 1
    finally:
        for client in clients:
            await client.close()
        await server.stop(0)


@pytest.mark.unit
def test_the_link_host_is_the_host_of_the_grpc_address():
    assert link_host("127.0.0.1:50051") == "127.0.0.1"
    assert link_host("[::1]:50051") == "::1"
    assert link_host("shard-0.psfw:50051") == "shard-0.psfw"
    assert link_host("unix:/tmp/shard.sock") is None
    assert link_host("dns:///shard:50051") is None


@pytest.mark.unit
def test_the_unix_socket_is_for_a_shard_on_this_host_and_tcp_for_the_others():
    """Which socket a Describe answer leads to: the Unix socket when the shard runs
    on this host (unless told ``same_host=False``), else the TCP port of the gRPC
    host; none when neither is offered; only a psfw shard's socket name is dialled."""
    here = pb.DescribeReply(host=host_id(), link_socket="@psfw-shard-1-ab", link_port=7001, link_id="id")
    assert link_place(here, "127.0.0.1:50051") == Place("@psfw-shard-1-ab", "127.0.0.1", 0, "id")
    assert link_place(here, "127.0.0.1:50051").kind == "unix"
    assert link_place(here, "127.0.0.1:50051", same_host=False) == Place("", "127.0.0.1", 7001, "id")
    elsewhere = pb.DescribeReply(host="another-host", link_socket="@psfw-shard-1-ab", link_port=7001, link_id="id")
    assert link_place(elsewhere, "shard-0:50051") == Place("", "shard-0", 7001, "id")
    assert link_place(elsewhere, "shard-0:50051").kind == "tcp"
    assert link_place(pb.DescribeReply(host="another-host", link_socket="@psfw-shard-1-ab"), "shard-0:1") is None
    assert link_place(pb.DescribeReply(host=host_id(), link_port=7001), "unix:/tmp/shard.sock") is None
    assert link_place(pb.DescribeReply(), "127.0.0.1:50051") is None
    assert socket_address("@psfw-shard-1-ab") == "\0psfw-shard-1-ab"
    with pytest.raises(ValueError, match="not the name of a psfw shard's socket"):
        socket_address("/run/docker.sock")


# -- refusals over the link --------------------------------------------------


@pytest.mark.unit
@pytest.mark.asyncio
async def test_a_refusal_on_the_link_is_the_same_shard_error_and_keeps_the_link(shard):
    """An Update of the wrong dtype, a Get of a step the group never reaches and a Put
    of another optimizer: refused with the code and message gRPC would carry; the
    link stays open and the refused calls changed nothing."""
    server, client, socket_kind = shard
    wrong = {("w", 0): np.zeros(N, np.float64)}
    with pytest.raises(ShardError) as err:
        await client.update(_header(0), wrong, lambda key: (np.dtype("float64"), (N,)))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "float32" in str(err.value)
    assert "shard 0" in str(err.value) and client.linked == socket_kind
    with pytest.raises(ShardError) as err:
        await client.get(_get(5, wait_s=0.2), _expect)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and client.linked == socket_kind
    with pytest.raises(ShardError) as err:
        await client.put([("w", 0, START)], '{"name": "sgd", "learning_rate": 0.5}')
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "optimizer" in str(err.value)
    answer = await client.update(_header(0), _grads(1.0), _expect)
    assert answer.step == 1 and client.linked == socket_kind
    assert (await client.describe()).slices[0].version == 1, "refused requests changed nothing"


@pytest.mark.unit
@pytest.mark.asyncio
async def test_a_wrong_or_missing_token_is_refused_at_hello_in_one_line(shard, caplog):
    """The token is said once, in the connection's HELLO: a wrong one and none are
    refused as UNAUTHENTICATED, logged in one line that names where the call came
    from (this host, or the TCP peer), and the shard's own token gets in."""
    server, _, socket_kind = shard
    caplog.set_level(logging.WARNING, logger="psfw.server")
    place = _place(server, socket_kind)
    for token in ("not-the-token", None):
        with pytest.raises(WireError) as err:
            await LinkConnection.open(place, token, None)
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    peer = "link from this host" if socket_kind == "unix" else "link from 127.0.0.1:"
    assert lines and "wrong bearer token" in lines[0] and peer in lines[0], lines
    assert not any(r.exc_info for r in caplog.records), "a refusal is one line, never a traceback"
    link = await LinkConnection.open(place, TOKEN, None)
    assert not link.closed
    await link.close()


@pytest.mark.unit
@pytest.mark.asyncio
@pytest.mark.parametrize("socket_kind", SOCKETS)
async def test_a_shard_without_a_token_takes_any_on_its_link_as_on_its_grpc_port(socket_kind):
    """A shard with no token of its own checks none: a client that says one (its
    settings name a token for other shards) still gets the link, as gRPC lets it in."""
    server = ShardServer(0, 1)
    await server.start("127.0.0.1:0")
    try:
        link = await LinkConnection.open(_place(server, socket_kind), "a-token-this-shard-has-not", None)
        assert not link.closed
        await link.close()
    finally:
        await server.stop(0)


@pytest.mark.unit
@pytest.mark.asyncio
async def test_a_refused_call_leaves_the_connection_open_and_a_closed_one_takes_no_call(shard):
    """On one connection: an Update that carries no gradients (no region either) is
    refused, an answer and not a broken link, and the next call is served; once
    closed, the connection takes no call."""
    server, _, socket_kind = shard
    link = await LinkConnection.open(_place(server, socket_kind), TOKEN, None)
    head = pb.UpdateRequest(group=0, step=0, process=0, workers=1, rows=1, workers_per_group=1, wait_s=5)
    empty = [UPDATE_PIECES(ChunkedMessage(head, []))]
    refusal = await link.call("Update", lambda: empty, lambda replies: replies, 10)
    assert isinstance(refusal, WireError) and refusal.code == grpc.StatusCode.INVALID_ARGUMENT, refusal
    assert not link.closed
    get = [[pb.GetRequest(group=0, step=0, slices=[pb.SliceRef(key="w", slice=0)], wait_s=5).SerializeToString()]]
    replies = await link.call("Get", lambda: get, lambda replies: replies, 10)
    assert not isinstance(replies, WireError) and replies, "the next call is served"
    await link.close()
    with pytest.raises(LinkBroken):
        await link.call("Update", lambda: empty, lambda replies: replies, 10)
    assert server.description().slices[0].version == 0


@pytest.mark.unit
@pytest.mark.asyncio
async def test_a_client_with_a_wrong_token_goes_on_over_grpc_and_is_refused_there(shard):
    """A client whose token the shard refuses at HELLO opens no link; its calls are
    refused over gRPC as UNAUTHENTICATED, as they would be without a link."""
    server, _, socket_kind = shard
    stranger = ShardClient(
        server.address, 0, timeout_s=10, retries=0, security=Security(token="nope"), same_host=socket_kind == "unix"
    )
    try:
        await stranger.open_link(server.description())
        assert stranger.linked == ""
        with pytest.raises(ShardError) as err:
            await stranger.update(_header(0), _grads(1.0), _expect)
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await stranger.close()
    assert server.description().slices[0].version == 0


@pytest.mark.unit
@pytest.mark.asyncio
async def test_a_malformed_message_in_a_call_is_refused_and_the_link_serves_on(shard):
    """A Put whose message does not parse is refused (INVALID_ARGUMENT, an ERROR
    frame), twice on one connection: the connection stays, the shard is unchanged."""
    server, client, socket_kind = shard
    place = _place(server, socket_kind)

    def calls() -> list[tuple[int, bytes]]:
        with place.connect() as sock:
            sock.settimeout(10)
            sock.sendall(b"".join(framed(HELLO, [TOKEN.encode()])))
            answers = [recv_frame(sock)]
            for _ in range(2):  # refused twice on the same connection
                put = [*framed(CALL, [b"Put"]), *framed(MESSAGE, [b"\xff\xff\xff"]), *framed(END, [])]
                sock.sendall(b"".join(put))
                answers.append(recv_frame(sock))
        return [(kind, bytes(payload)) for kind, payload in answers]

    hello, *refusals = await asyncio.to_thread(calls)
    assert hello == (OK, server.link.id.encode())
    assert all(kind == ERROR and b"INVALID_ARGUMENT" in payload for kind, payload in refusals), refusals
    assert (await client.describe()).slices[0].version == 0


@pytest.mark.unit
@pytest.mark.asyncio
async def test_bytes_that_are_no_call_end_that_connection_only(shard, caplog):
    """Garbage, a frame that claims a gigabyte, a call of a method the link does not
    carry and fifty random byte sequences (after a good HELLO or none), on either
    socket: each connection ends, the shard's state is untouched, its log has no
    traceback, and it serves on."""
    server, client, socket_kind = shard
    place = _place(server, socket_kind)
    hello = HEAD.pack(HELLO, len(TOKEN)) + TOKEN.encode()
    rng = np.random.default_rng(3)
    cases = [
        HEAD.pack(99, 3) + b"abc",
        HEAD.pack(HELLO, 1 << 30),
        hello + HEAD.pack(CALL, 7) + b"Restore" + HEAD.pack(END, 0),
        hello + HEAD.pack(CALL, 8) + b"Describe" + HEAD.pack(END, 0),
        hello + HEAD.pack(CALL, 6) + b"Update" + HEAD.pack(MESSAGE, 1 << 30),
    ]
    for case in range(50):
        junk = rng.bytes(int(rng.integers(0, 200)))
        kinds = [int(k) for k in rng.integers(0, 8, size=3)]
        frames = b"".join(HEAD.pack(k, len(junk)) + junk for k in kinds)
        cases.append((hello if case % 2 else b"") + (frames if case % 3 else junk))
    for sent in cases:
        await asyncio.to_thread(_send_and_read, place, sent)
    assert (await client.describe()).slices[0].version == 0
    assert not any(r.exc_info for r in caplog.records), "a refusal is one line, never a traceback"
    answer = await client.update(_header(0), _grads(1.0), _expect)
    assert answer.step == 1 and client.linked == socket_kind


def _send_and_read(place: Place, sent: bytes) -> None:
    """Send ``sent`` and read what comes until the shard closes the connection."""
    with place.connect() as sock:
        sock.settimeout(10)
        try:
            sock.sendall(sent)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(1 << 16):  # an answer or none, then the shard closes
                pass
        except OSError:  # reset, broken pipe, not connected: the shard ended it, unread bytes and all
            pass


@pytest.mark.unit
@pytest.mark.asyncio
async def test_a_client_sends_nothing_to_a_link_that_is_not_the_shard_it_described(shard):
    """What answers where a Describe named the link must be that shard's link (another
    shard's, after a restart or through a port forward, is not): else gRPC."""
    server, client, socket_kind = shard
    with pytest.raises(LinkBroken, match="another shard"):
        await LinkConnection.open(_place(server, socket_kind)._replace(id="not-this-link"), TOKEN, None)
    old = server.link.id
    await _restart_link(server)
    assert server.link.id != old, "a link started anew has a new id"


@pytest.mark.asyncio
async def test_a_call_over_the_shards_request_limit_is_refused_and_changes_nothing(monkeypatch):
    """An Update larger than the shard's request limit: the link ends the connection
    before reading it all, the call is refused over gRPC, nothing changes, and the
    link is opened again after the back-off."""
    monkeypatch.setattr(link_client, "REOPEN_S", REOPEN_S)
    server = ShardServer(0, 1, security=Security(token=TOKEN), max_request_bytes=N * 4 + 4096)
    await server.start("127.0.0.1:0")
    client = await _client(server)
    try:
        assert await client.put([("w", 0, START)], SGD) == 1
        assert client.linked == "tcp"
        too_many = {("w", 0): np.ones(N, np.float32), ("x", 0): np.ones(N, np.float32)}
        with pytest.raises(ShardError) as err:
            await client.update(_header(0), too_many, lambda key: (np.dtype("float32"), (N,)))
        assert err.value.code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.NOT_FOUND)
        assert (await client.describe()).slices[0].version == 0
        assert server.link._held == 0, "what the cut call held is given back"
        await asyncio.sleep(REOPEN_S + 0.1)
        answer = await client.update(_header(0), _grads(1.0), _expect)
        assert answer.step == 1 and client.linked == "tcp"
    finally:
        await client.close()
        await server.stop(0)


# -- a link that fails: the one fallback rule ---------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("end", ["client", "shard"])
async def test_a_link_broken_mid_run_sends_the_next_update_over_grpc_and_comes_back_after_the_back_off(
    shard, end, monkeypatch
):
    """The link's socket is shut under a running client (at its end or the shard's):
    the next Update goes over gRPC and gives the right answer, applied once; after
    the back-off (REOPEN_S) the link is opened again and carries the next one."""
    server, client, socket_kind = shard
    carried = link_calls(server, monkeypatch)
    values = START
    answer = await client.update(_header(0), _grads(1.0), _expect)
    values = _sgd(values, 1.0)
    np.testing.assert_allclose(answer.values[("w", 0)], values, rtol=1e-6, atol=1e-6)
    assert carried == [("Update", carried[0][1])]
    if end == "client":
        client._link.up._sock.shutdown(socket.SHUT_RDWR)
    else:
        for conn in list(server.link._connections):
            conn.shutdown(socket.SHUT_RDWR)
    answer = await client.update(_header(1), _grads(2.0), _expect)
    values = _sgd(values, 2.0)
    np.testing.assert_allclose(answer.values[("w", 0)], values, rtol=1e-6, atol=1e-6)
    assert answer.step == 2 and client.linked == "" and client.kind == "grpc"
    assert len(carried) == 1, "the Update after the break went over gRPC"
    await asyncio.sleep(REOPEN_S + 0.1)
    answer = await client.update(_header(2), _grads(3.0), _expect)
    values = _sgd(values, 3.0)
    np.testing.assert_allclose(answer.values[("w", 0)], values, rtol=1e-6, atol=1e-6)
    assert answer.step == 3 and client.linked == socket_kind
    assert [method for method, _ in carried] == ["Update", "Update"], "the link is back"
    assert (await client.describe()).slices[0].version == 3, "each Update was applied once"


@pytest.mark.unit
@pytest.mark.asyncio
async def test_a_lost_link_falls_back_to_grpc_and_a_describe_opens_the_new_one(shard):
    """A shard whose link went away and came back under a new name: the Update goes
    over gRPC, applied once; the next Describe, which names the new link, opens it
    at once (no back-off: it is another link)."""
    server, client, socket_kind = shard
    await server.link.stop(0)
    answer = await client.update(_header(0), _grads(1.0), _expect)
    assert answer.step == 1 and client.linked == ""
    await _restart_link(server)
    await client.describe()
    assert client.linked == socket_kind
    answer = await client.update(_header(1), _grads(1.0), _expect)
    assert answer.step == 2 and client.linked == socket_kind
    assert (await client.describe()).slices[0].version == 2, "each Update was applied once"


@pytest.mark.unit
@pytest.mark.asyncio
@pytest.mark.parametrize("socket_kind", SOCKETS)
async def test_a_restarted_shard_s_new_link_is_opened_by_its_describe(socket_kind, monkeypatch):
    """A shard that stops and starts again on the same gRPC address (a new process:
    a new socket, port and link id): the client's next Describe opens the new link,
    which carries the calls from then on."""
    server = ShardServer(0, 1, security=Security(token=TOKEN))
    await server.start("127.0.0.1:0")
    client = await _client(server, socket_kind, retries=5)
    try:
        await client.put([("w", 0, START)], SGD)
        assert (await client.update(_header(0), _grads(1.0), _expect)).step == 1
        old = client._link.up.place
        await server.stop(0)
        server = ShardServer(0, 1, security=Security(token=TOKEN))
        await server.start(client.address)
        carried = link_calls(server, monkeypatch)
        reply = await client.describe()
        assert reply.link_id == server.link.id != old.id
        assert client.linked == socket_kind and client._link.up.place != old
        assert await client.put([("w", 0, START)], SGD) == 1
        answer = await client.update(_header(0), _grads(1.0), _expect)
        np.testing.assert_allclose(answer.values[("w", 0)], _sgd(START, 1.0), rtol=1e-6, atol=1e-6)
        assert [method for method, _ in carried] == ["Put", "Update"], "the new link carries them"
    finally:
        await client.close()
        await server.stop(0)


@pytest.mark.asyncio
async def test_a_link_that_cannot_be_reached_is_not_tried_on_every_call(shard, monkeypatch):
    """A link whose socket shuts (a firewall that drops a port would cost each try the
    whole connect timeout): tried once after the back-off, then not again until a
    Describe names another link; the calls go over gRPC meanwhile."""
    server, client, _ = shard
    tries = []
    opened = LinkConnection.open

    async def counted(*args):
        tries.append(args)
        return await opened(*args)

    monkeypatch.setattr(LinkConnection, "open", counted)
    await server.link.stop(0)  # the Describe answer still names the socket and port
    assert (await client.update(_header(0), _grads(1.0), _expect)).step == 1
    await asyncio.sleep(REOPEN_S + 0.1)  # past the first back-off: one try
    for step in range(1, 3):  # past the longest back-off a link that broke would wait out
        assert (await client.update(_header(step), _grads(1.0), _expect)).step == step + 1
        await client.describe()
        await asyncio.sleep(MAX_REOPEN_S + 0.1)
    assert len(tries) == 1 and client.linked == ""


@pytest.mark.asyncio
async def test_a_call_cancelled_midway_closes_the_link_and_the_next_goes_over_grpc(shard, monkeypatch):
    """A caller that gives up on a call under way (a Get waiting for its step): the
    link is closed (its state is unknown) and says so at once; the next Update goes
    over gRPC with the right answer, and the link is back after the back-off."""
    server, client, socket_kind = shard
    carried = link_calls(server, monkeypatch)
    waiting = asyncio.create_task(client.get(_get(5, wait_s=30), _expect))
    await _until(lambda: carried, "under way over the link")
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert client.linked == "" and client.kind == "grpc", "a closed link is not said to be up"
    answer = await client.update(_header(0), _grads(1.0), _expect)
    np.testing.assert_allclose(answer.values[("w", 0)], _sgd(START, 1.0), rtol=1e-6, atol=1e-6)
    assert [method for method, _ in carried] == ["Get"]
    await asyncio.sleep(REOPEN_S + 0.1)
    assert (await client.update(_header(1), _grads(1.0), _expect)).step == 2
    assert client.linked == socket_kind and [method for method, _ in carried] == ["Get", "Update"]


@pytest.mark.unit
@pytest.mark.asyncio
@pytest.mark.parametrize("verb", ["Put", "Update"])
async def test_a_call_cut_off_midway_by_its_client_changes_nothing(shard, verb):
    """A client that goes away after the first of a call's messages: the shard serves
    nothing of it (no slice stored, no contribution counted), gives back the bytes
    it held, and serves on."""
    server, client, socket_kind = shard
    big = np.ones(N, np.float32)  # more than one message
    if verb == "Put":
        messages = [PUT_PIECES(frame) for frame in put_messages([("v", 0, big)], SGD, "", "", 1 << 20)]
    else:
        head = pb.UpdateRequest(group=0, step=0, process=0, workers=1, rows=ROWS, workers_per_group=1, wait_s=5)
        chunks = list(encode_chunks([("w", 0, big)], 1 << 20))
        messages = [
            UPDATE_PIECES(ChunkedMessage(head if i == 0 else pb.UpdateRequest(), c)) for i, c in enumerate(chunks)
        ]
    assert len(messages) > 1
    place = _place(server, socket_kind)

    def cut_off() -> None:
        with place.connect() as sock:
            sock.settimeout(10)
            sock.sendall(b"".join(framed(HELLO, [TOKEN.encode()])))
            assert recv_frame(sock)[0] == OK
            sock.sendall(b"".join([*framed(CALL, [verb.encode()]), *framed(MESSAGE, messages[0])]))

    await asyncio.to_thread(cut_off)
    await _until(lambda: len(server.link._connections) == 1, "the cut connection ended")
    assert server.link._held == 0, "the bytes the cut call held are given back"
    reply = await client.describe()
    assert [(s.key, s.slice, s.version) for s in reply.slices] == [("w", 0, 0)], "nothing stored, nothing applied"
    assert not any(g.pending_processes for g in reply.groups)
    answer = await client.update(_header(0), _grads(1.0), _expect)
    assert answer.step == 1 and client.linked == socket_kind


@pytest.mark.unit
@pytest.mark.asyncio
async def test_a_stopping_shard_ends_a_call_in_flight_within_its_grace(shard):
    """An Update that waits for the rest of its group when the shard stops: the stop
    returns within its grace and the client gets an error, never a hang."""
    server, client, _ = shard
    waiting = asyncio.create_task(client.update(_header(0, workers_per_group=2, wait_s=30), _grads(1.0), _expect))
    watcher = await _client(server, link=False)
    try:
        await _until(lambda: server.description().groups, "contributed")
        await asyncio.wait_for(server.stop(0.2), 10)
        with pytest.raises(ShardError):
            await asyncio.wait_for(waiting, 15)
        assert not server.link._connections, "no connection thread outlives the stop"
    finally:
        await watcher.close()


# -- connections the shard does not wait on ----------------------------------


@pytest.mark.asyncio
async def test_connections_that_say_no_hello_are_few_and_brief(shard, monkeypatch):
    """Connections that send nothing (or a byte now and then) hold no thread for long
    (HELLO_S), and only a few at once (MAX_GREETING): more are closed on arrival."""
    server, _, socket_kind = shard
    monkeypatch.setattr(link_server, "HELLO_S", 0.5)
    monkeypatch.setattr(link_server, "MAX_GREETING", 2)
    place = _place(server, socket_kind)
    idle = [place.connect() for _ in range(2)]
    try:
        idle[0].sendall(HEAD.pack(HELLO, len(TOKEN))[:3])  # a HELLO begun, never finished
        await _until(lambda: server.link._greeting == 2, "greeting")
        with pytest.raises(OSError):  # the third waits for no HELLO: closed at once
            await LinkConnection.open(place, TOKEN, None)
        await asyncio.sleep(0.6)  # past HELLO_S: both were closed
        for sock in idle:
            sock.settimeout(5)
            assert await asyncio.to_thread(sock.recv, 16) == b""
        link = await LinkConnection.open(place, TOKEN, None)
        await link.close()
    finally:
        for sock in idle:
            sock.close()


@pytest.mark.unit
@pytest.mark.asyncio
async def test_a_client_over_the_shards_connection_limit_goes_on_over_grpc(shard, monkeypatch):
    """Past MAX_CONNECTIONS the shard closes new connections at once: that client
    opens no link and its calls go over gRPC; the linked client is not disturbed."""
    server, client, socket_kind = shard
    monkeypatch.setattr(link_server, "MAX_CONNECTIONS", 1)
    other = await _client(server, socket_kind)
    try:
        assert other.linked == ""
        assert (await other.update(_header(0), _grads(1.0), _expect)).step == 1
        assert client.linked == socket_kind
        assert (await client.get(_get(1), _expect)).step == 1 and client.linked == socket_kind
    finally:
        await other.close()


# -- the link's buffers --------------------------------------------------------


@pytest.mark.unit
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
