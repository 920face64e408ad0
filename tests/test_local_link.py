"""The same-host link: a shard's Updates over an abstract Unix socket (real servers,
real sockets, real shared memory)."""

import asyncio
import logging

import grpc
import numpy as np
import pytest
import pytest_asyncio

from psfw.base.errors import ShardError, WireError
from psfw.base.security import Security
from psfw.proto import ps_pb2 as pb
from psfw.protocol.chunks import ChunkedMessage, chunked_serializer
from psfw.protocol.local_link import HEAD, LinkBroken, socket_address
from psfw.protocol.messages import UpdateHeader
from psfw.runtime.local_client import LocalLink
from psfw.runtime.shard_client import ShardClient
from psfw.runtime.shm_transport import SharedMemoryClient
from psfw.services.server import ShardServer

from helpers import SGD, shm_region

UPDATE_REQUEST = chunked_serializer(pb.UpdateRequest)
TOKEN = "link-token-0123"


def _expect(key):
    return np.dtype("float32"), (1000,)


def _header(step: int, workers_per_group: int = 1, wait_s: float = 5) -> UpdateHeader:
    return UpdateHeader(
        group=0, step=step, process=0, workers=1, rows=2, workers_per_group=workers_per_group, wait_s=wait_s
    )


@pytest.fixture
def region():
    region = shm_region(1000)
    yield region
    region.release()


@pytest_asyncio.fixture
async def shard():
    server = ShardServer(0, 1, security=Security(token=TOKEN))
    await server.start("127.0.0.1:0")
    network = ShardClient(server.address, 0, timeout_s=10, retries=0, security=Security(token=TOKEN))
    await network.put([("w", 0, np.linspace(0, 1, 1000, dtype=np.float32))], SGD)
    yield server, network
    await network.close()
    await server.stop(0)


@pytest.mark.asyncio
async def test_a_shard_names_its_socket_and_applies_updates_sent_there(shard, region):
    server, network = shard
    name = (await network.describe()).local_socket
    assert name.startswith("@psfw-shard-") and name == server.local.name
    client = await SharedMemoryClient.attach(network, region)
    try:
        assert client.linked and client.kind == "shared-memory"
        before = (await network.get(0, 0, [("w", 0)], _expect, 5)).values[("w", 0)]
        grads = {("w", 0): np.full(1000, 4.0, np.float32)}
        answer = await client.update(_header(0), grads, _expect)
        assert answer.step == 1 and client.linked
        np.testing.assert_allclose(answer.values[("w", 0)], before - 0.1 * 4.0 / 2, rtol=1e-6)
        after = (await network.get(0, 1, [("w", 0)], _expect, 5)).values[("w", 0)]
        np.testing.assert_array_equal(after, answer.values[("w", 0)])
        counts = (await network.describe()).rpc_counts
        assert counts["Update"] == 1, "the link's Updates count as Updates"
    finally:
        await client.close()


@pytest.mark.asyncio
async def test_a_wrong_token_is_refused_at_hello_in_one_line(shard, caplog):
    server, _ = shard
    caplog.set_level(logging.WARNING, logger="psfw.server")
    with pytest.raises(WireError) as err:
        await LocalLink.open(server.local.name, "not-the-token")
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(WireError):
        await LocalLink.open(server.local.name, None)
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert lines and "wrong bearer token" in lines[0] and "same-host link" in lines[0]
    assert not any(r.exc_info for r in caplog.records), "a refusal is one line, never a traceback"
    link = await LocalLink.open(server.local.name, TOKEN)
    await link.close()


@pytest.mark.asyncio
async def test_a_refusal_on_the_link_is_the_same_shard_error_as_over_grpc(shard, region):
    """An Update of a step the shard does not expect: refused with the code and
    message gRPC would carry, and the link stays open for the next call."""
    server, network = shard
    client = await SharedMemoryClient.attach(network, region)
    try:
        grads = {("w", 0): np.zeros(1000, np.float32)}
        with pytest.raises(ShardError) as err:
            await client.update(_header(0, workers_per_group=2, wait_s=0.2), grads, _expect)
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "shard 0" in str(err.value) and client.linked
    finally:
        await client.close()


@pytest.mark.asyncio
async def test_bytes_that_are_no_frame_end_that_connection_only(shard):
    server, network = shard
    reader, writer = await asyncio.open_unix_connection(socket_address(server.local.name))
    writer.write(HEAD.pack(99, 3) + b"abc")
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 5) == b"", "the shard closes a connection that sends garbage"
    writer.close()
    reader, writer = await asyncio.open_unix_connection(socket_address(server.local.name))
    writer.write(HEAD.pack(1, 1 << 30))  # a HELLO that claims a gigabyte
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    link = await LocalLink.open(server.local.name, TOKEN)  # the shard serves on
    request = UPDATE_REQUEST(ChunkedMessage(pb.UpdateRequest(group=0, step=0, process=0, workers=1, rows=1), []))
    with pytest.raises(WireError) as err:
        await link.call([request], 5)  # no region and no data: refused, not a broken link
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    await link.close()
    with pytest.raises(LinkBroken):
        await link.call([request], 5)
    assert (await network.describe()).slices[0].version == 0


@pytest.mark.asyncio
async def test_a_lost_link_falls_back_to_grpc_and_a_describe_opens_the_new_one(shard, region):
    """A shard whose link went away (a restart names a new socket): the Update goes
    over gRPC, once, and the re-sync's Describe links again."""
    server, network = shard
    client = await SharedMemoryClient.attach(network, region)
    try:
        grads = {("w", 0): np.ones(1000, np.float32)}
        await server.local.stop(0)
        answer = await client.update(_header(0), grads, _expect)
        assert answer.step == 1 and not client.linked and client.kind == "shared-memory"
        server.servicer.local_socket = await server.local.start()
        await client.describe()
        assert client.linked
        answer = await client.update(_header(1), grads, _expect)
        assert answer.step == 2 and client.linked
        assert (await network.describe()).slices[0].version == 2, "each Update was applied once"
    finally:
        await client.close()


@pytest.mark.asyncio
async def test_a_stopping_shard_ends_a_call_in_flight_within_its_grace(shard, region):
    """An Update that waits for the rest of its group when the shard stops: the
    stop returns within its grace and the stub gets an error, never a hang."""
    server, network = shard
    client = await SharedMemoryClient.attach(network, region)
    try:
        grads = {("w", 0): np.ones(1000, np.float32)}
        waiting = asyncio.create_task(client.update(_header(0, workers_per_group=2, wait_s=30), grads, _expect))
        for _ in range(100):  # bounded: the contribution arrives within a second
            if (await network.describe()).groups:
                break
            await asyncio.sleep(0.01)
        await asyncio.wait_for(server.stop(0.2), 10)
        with pytest.raises(ShardError):
            await asyncio.wait_for(waiting, 10)
    finally:
        await client.close()


@pytest.mark.asyncio
async def test_random_bytes_on_the_link_never_change_the_shard_or_stop_it(shard, region, caplog):
    """Fifty connections of random frames and bytes (after a good HELLO or none):
    each ends or is refused, the shard's state is untouched, its log holds no
    traceback, and a well-formed Update still goes through."""
    server, network = shard
    rng = np.random.default_rng(7)
    hello = HEAD.pack(1, len(TOKEN)) + TOKEN.encode()
    for case in range(50):
        junk = rng.bytes(int(rng.integers(0, 200)))
        kinds = [int(k) for k in rng.integers(0, 7, size=3)]
        frames = b"".join(HEAD.pack(k, len(junk)) + junk for k in kinds)
        sent = (hello if case % 2 else b"") + (frames if case % 3 else junk)
        reader, writer = await asyncio.open_unix_connection(socket_address(server.local.name))
        writer.write(sent)
        writer.write_eof()
        await asyncio.wait_for(reader.read(), 5)  # an answer or none, then the shard closes
        writer.close()
    assert (await network.describe()).slices[0].version == 0
    assert not any(r.exc_info for r in caplog.records), "a refusal is one line, never a traceback"
    client = await SharedMemoryClient.attach(network, region)
    try:
        answer = await client.update(_header(0), {("w", 0): np.ones(1000, np.float32)}, _expect)
        assert answer.step == 1 and client.linked
    finally:
        await client.close()
