"""Malformed requests to a running shard get a precise status and message, and the
shard's values, versions and optimizer state stay exactly as they were."""

import asyncio

import grpc
import numpy as np
import pytest
import pytest_asyncio

from psfw.proto import ps_pb2 as pb
from psfw.protocol.chunks import Chunk, ChunkedMessage, chunked_deserializer, chunked_serializer
from psfw.runtime.shard_client import ShardClient
from psfw.services.server import ShardServer

from helpers import SGD, send

pytestmark = pytest.mark.unit

UPDATE = "/psfw.v1.ParameterServer/Update"
GOOD = [("w", 0, np.ones(4, np.float32)), ("w", 1, np.ones(4, np.float32))]


def chunk(key="w", index=0, dtype="float32", shape=(4,), data=None):
    if data is None:
        data = np.ones(shape, np.dtype(dtype)).tobytes()
    return Chunk(key, index, dtype, tuple(shape), 0, data)


def header(**fields):
    base = dict(group=0, step=0, process=0, workers=1, rows=2, workers_per_group=1, wait_s=2)
    return pb.UpdateRequest(**{**base, **fields})


@pytest_asyncio.fixture
async def running():
    server = ShardServer(0, 1)
    await server.start("127.0.0.1:0")
    client = ShardClient(server.address, 0, timeout_s=10, retries=0)
    await client.put([("w", 0, np.zeros(4, np.float32)), ("w", 1, np.zeros(4, np.float32))], SGD)
    channel = grpc.aio.insecure_channel(server.address)
    update = channel.stream_stream(
        UPDATE,
        request_serializer=chunked_serializer(pb.UpdateRequest),
        response_deserializer=chunked_deserializer(pb.UpdateReply),
    )
    raw = channel.stream_stream(UPDATE, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    yield server, client, update, raw
    await channel.close()
    await client.close()
    await server.stop(0)


async def call(method, messages):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in method(iter(messages), timeout=10):
            pass
    return err.value


BAD_UPDATES = {
    "unknown key": (
        [ChunkedMessage(header(), [chunk(key="nope")])],
        grpc.StatusCode.NOT_FOUND,
        "holds no slice nope[0]",
    ),
    "unknown slice": ([ChunkedMessage(header(), [chunk(index=7)])], grpc.StatusCode.NOT_FOUND, "holds no slice w[7]"),
    "wrong dtype": (
        [ChunkedMessage(header(), [chunk(dtype="float64"), chunk(index=1)])],
        grpc.StatusCode.INVALID_ARGUMENT,
        "w[0] is float32, the request sent float64",
    ),
    "unsupported dtype": (
        [ChunkedMessage(header(), [chunk(dtype="int8", data=b"\0" * 4)])],
        grpc.StatusCode.INVALID_ARGUMENT,
        "dtype 'int8' is not supported",
    ),
    "wrong shape": (
        [ChunkedMessage(header(), [chunk(shape=(2, 2)), chunk(index=1)])],
        grpc.StatusCode.INVALID_ARGUMENT,
        "w[0] has shape [4], the request sent [2, 2]",
    ),
    "truncated bytes": (
        [ChunkedMessage(header(), [chunk(data=b"\0" * 8), chunk(index=1)])],
        grpc.StatusCode.INVALID_ARGUMENT,
        "w[0] is truncated: 8 of 16 bytes arrived",
    ),
    "too many bytes": (
        [ChunkedMessage(header(), [chunk(data=b"\0" * 20)])],
        grpc.StatusCode.INVALID_ARGUMENT,
        "w[0] has 20 bytes, more than",
    ),
    "missing slice": (
        [ChunkedMessage(header(), [chunk()])],
        grpc.StatusCode.INVALID_ARGUMENT,
        "lacks 1 slices of shard 0 (w[1])",
    ),
    "nan gradient": (
        [ChunkedMessage(header(), [chunk(data=np.array([1, np.nan, 0, 0], np.float32).tobytes()), chunk(index=1)])],
        grpc.StatusCode.INVALID_ARGUMENT,
        "gradient of w[0] has NaN or Inf values",
    ),
    "step ahead": (
        [ChunkedMessage(header(step=5), [chunk(), chunk(index=1)])],
        grpc.StatusCode.FAILED_PRECONDITION,
        "group 0 step 5 is ahead of the group, which has completed 0 steps",
    ),
    "impossible workers": (
        [ChunkedMessage(header(workers=3, workers_per_group=2), [chunk(), chunk(index=1)])],
        grpc.StatusCode.INVALID_ARGUMENT,
        "workers=3 of workers_per_group=2 is impossible",
    ),
    "no message": ([], grpc.StatusCode.INVALID_ARGUMENT, "Update carries no message"),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("case", sorted(BAD_UPDATES))
async def test_bad_update_is_refused_and_changes_nothing(running, case):
    server, client, update, _ = running
    before = server.store.digest()
    messages, code, fragment = BAD_UPDATES[case]
    err = await call(update, messages)
    assert err.code() == code, err.details()
    assert fragment in err.details()
    assert server.store.digest() == before
    described = await client.describe()
    assert [s.version for s in described.slices] == [0, 0]
    assert [g.pending_workers for g in described.groups] in ([], [0])


@pytest.mark.asyncio
async def test_a_refusal_reaches_a_client_that_is_still_sending(running):
    """The first message names a slice the shard does not hold; 255 more (4 MiB in
    all) are still on their way when the shard refuses: the client gets NOT_FOUND
    every time, never gRPC's "INTERNAL: Internal error from Core" of a send that failed."""
    server, _, update, _ = running
    before = server.store.digest()
    big = chunk(key="nope", shape=(4096,))
    messages = [ChunkedMessage(header(), [big])] + [ChunkedMessage(pb.UpdateRequest(), [big])] * 255
    errors = [await call(update, messages) for _ in range(10)]
    assert [e.code() for e in errors] == [grpc.StatusCode.NOT_FOUND] * 10, [e.details() for e in errors]
    assert server.store.digest() == before


@pytest.mark.asyncio
async def test_garbage_bytes_are_invalid_argument(running):
    server, _, _, raw = running
    before = server.store.digest()
    err = await call(raw, [b"\x42\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed UpdateRequest" in err.details()
    assert server.store.digest() == before


@pytest.mark.asyncio
async def test_oversize_message_is_resource_exhausted(running):
    server, _, update, _ = running
    before = server.store.digest()
    big = np.zeros(2 << 20, np.float32)  # one 8 MiB message, over the 4 MiB limit
    err = await call(update, [ChunkedMessage(header(), [Chunk("w", 0, "float32", (4,), 0, big.tobytes())])])
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in err.details()
    assert server.store.digest() == before


@pytest.mark.asyncio
async def test_a_valid_update_still_works_after_refusals(running):
    server, client, update, _ = running
    await call(update, BAD_UPDATES["nan gradient"][0])
    step, values, *_ = await send(client, {i: v for _, i, v in GOOD}, rows=2)
    assert step == 1
    np.testing.assert_allclose(values[("w", 0)], -0.1 * 0.5)


@pytest.mark.asyncio
async def test_put_of_other_values_for_a_held_slice_is_already_exists(running):
    server, client, _, _ = running
    before = server.store.digest()
    from psfw.base.errors import ShardError

    with pytest.raises(ShardError) as err:
        await client.put([("w", 0, np.ones(4, np.float32))], SGD)
    assert err.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert "a parameter is put once, by its owner" in str(err.value)
    assert await client.put([("w", 0, np.zeros(4, np.float32))], SGD) == 1, "an identical retry is acknowledged"
    assert server.store.digest() == before


@pytest.mark.asyncio
async def test_put_of_a_new_slice_once_training_started_is_refused_and_the_step_completes(running):
    """A new slice in the middle of an open step would make the step impossible to add
    up: it is refused, and the step still completes with the slices it began with."""
    server, client, _, _ = running
    from psfw.base.errors import ShardError

    grads = {i: np.ones(4, np.float32) for _, i, _ in GOOD}
    first = asyncio.create_task(send(client, grads, process=0, workers_per_group=2, wait_s=5))
    for _ in range(100):  # the step is open once process 0's contribution is in
        if server.store.groups.get(0) and server.store.groups[0].round:
            break
        await asyncio.sleep(0.02)
    assert server.store.groups[0].round, "process 0's contribution never arrived"
    before = server.store.digest()
    with pytest.raises(ShardError) as err:
        await client.put([("w", 2, np.zeros(4, np.float32))], "")
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "already training" in str(err.value) and "before the first update" in str(err.value)
    assert server.store.digest() == before and ("w", 2) not in server.store.specs
    assert await client.put([("w", 0, np.zeros(4, np.float32))], SGD) == 1, "an identical retry is acknowledged"
    second = await send(client, grads, process=1, workers_per_group=2, wait_s=5)
    assert second.step == (await asyncio.wait_for(first, 10)).step == 1
    with pytest.raises(ShardError) as err:  # and after a completed step
        await client.put([("w", 2, np.zeros(4, np.float32))], "")
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.asyncio
async def test_put_with_an_unknown_optimizer_is_refused(shard):
    server, client = shard
    from psfw.base.errors import ShardError

    with pytest.raises(ShardError) as err:
        await client.put([("w", 0, np.ones(4, np.float32))], '{"name": "lbfgs"}')
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown optimizer 'lbfgs'" in str(err.value)
    assert server.store.specs == {}


@pytest.mark.asyncio
async def test_put_with_a_nan_learning_rate_is_refused(shard):
    """JSON carries NaN: a shard that took it would turn every value into NaN at the
    first update."""
    server, client = shard
    from psfw.base.errors import ShardError

    with pytest.raises(ShardError) as err:
        await client.put([("w", 0, np.ones(4, np.float32))], '{"name": "sgd", "learning_rate": NaN}')
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "learning_rate must be a finite number, got nan" in str(err.value)
    assert server.store.specs == {} and not server.store.optimizer_spec


@pytest.mark.asyncio
async def test_nonfinite_policy_skip_skips_the_step_and_keeps_the_values():
    server = ShardServer(0, 1, nonfinite="skip")
    await server.start("127.0.0.1:0")
    client = ShardClient(server.address, 0, timeout_s=10, retries=0)
    try:
        await client.put([("w", 0, np.zeros(4, np.float32))], SGD)
        answer = await send(client, {0: np.array([1, np.nan, 0, 0], np.float32)})
        assert answer.step == 1, "the group moves on"
        np.testing.assert_array_equal(answer.values[("w", 0)], np.zeros(4, np.float32))
        assert server.store.skipped_nonfinite == 1 and server.store.versions[("w", 0)] == 0
    finally:
        await client.close()
        await server.stop(0)


IN_PROCESS_BAD_PARTS = {
    "wrong dtype": (
        "w",
        0,
        np.ones(4, np.float64),
        grpc.StatusCode.INVALID_ARGUMENT,
        "w[0] is float32, the request sent float64",
    ),
    "wrong shape": (
        "w",
        0,
        np.ones((2, 2), np.float32),
        grpc.StatusCode.INVALID_ARGUMENT,
        "w[0] has shape [4], the request sent [2, 2]",
    ),
    "unsupported dtype": (
        "w",
        0,
        np.ones(4, np.int8),
        grpc.StatusCode.INVALID_ARGUMENT,
        "dtype 'int8' is not supported",
    ),
    "unknown slice": ("w", 7, np.ones(4, np.float32), grpc.StatusCode.NOT_FOUND, "holds no slice w[7]"),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("case", IN_PROCESS_BAD_PARTS)
async def test_an_in_process_update_is_checked_as_the_servicer_checks_one(running, case):
    """The in-process transport (the embedded default) calls the shard's store
    directly: a worker's part of the wrong dtype or shape, or of a slice the shard
    does not hold, is refused as over gRPC, and the shard is left as it was (the
    good part of the same slice is not added either)."""
    from psfw.base.errors import ShardError
    from psfw.protocol.messages import UpdateHeader
    from psfw.runtime.inprocess import InProcessClient

    server = running[0]
    client = InProcessClient(server, 0)
    before = server.store.digest()
    key, index, bad, code, message = IN_PROCESS_BAD_PARTS[case]
    head = UpdateHeader(group=0, step=0, process=0, workers=2, rows=2, workers_per_group=2, wait_s=2)
    parts = {("w", 0): (np.ones(4, np.float32), np.ones(4, np.float32)), ("w", 1): (np.ones(4, np.float32),) * 2}
    parts[(key, index)] = (np.ones(4, np.float32), bad)
    with pytest.raises(ShardError) as err:
        await client.update(head, parts, server.store.expect)
    assert err.value.code == code and message in str(err.value)
    assert server.store.digest() == before and server.store.groups == {}
