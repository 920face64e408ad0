"""Rolling a shard back to a checkpoint (a Restore, or a restarted shard's load) races
with what is in flight: checkpoint writes, updates of the abandoned history, RPCs.
None of it may leak into the restored history, and no RPC sees a shard half loaded.

The races are made certain, not likely: a ``Gate`` holds the real function at its
start, in its thread, until the test lets it go."""

import asyncio
import json
import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from psfw.base.errors import ShardError, WireError
from psfw.protocol.messages import GetHeader, UpdateHeader
from psfw.runtime.shard_client import ShardClient
from psfw.services import checkpoint
from psfw.services.server import ShardServer
from psfw.services.store import ShardStore

from helpers import expect4, send

SGD1 = json.dumps({"name": "sgd", "learning_rate": 1.0})
W = ("w", 0)


class GatedFolder(checkpoint.CheckpointFolder):
    """A checkpoint folder whose save or load a test replaces with a Gate."""


class Gate:
    """Wraps a function that runs in a thread: each call says it has started, then
    waits (at most 10 s) until ``release`` before it runs the real function."""

    def __init__(self, function):
        self.function = function
        self.started = threading.Event()
        self.released = threading.Event()

    def __call__(self, *args, **kwargs):
        self.started.set()
        if not self.released.wait(10):
            raise TimeoutError("the test never released the gate")
        return self.function(*args, **kwargs)

    async def entered(self) -> None:
        assert await asyncio.to_thread(self.started.wait, 10), "the gated call never started"

    def release(self) -> None:
        self.released.set()


def _head(step: int, process: int = 0, epoch: int = 0, workers_per_group: int = 1, every: int = 1):
    return UpdateHeader(
        wait_s=5.0,
        group=0,
        step=step,
        process=process,
        workers=1,
        rows=1,
        workers_per_group=workers_per_group,
        staleness=-1,
        epoch=epoch,
        checkpoint_every=every,
    )


def _grad(value: float) -> dict:
    return {W: np.full(4, value, np.float32)}


@pytest.mark.unit
@pytest.mark.asyncio
async def test_an_update_of_the_old_epoch_cannot_slip_in_while_a_restore_runs(tmp_path):
    """An Update checked against the epoch before its finite check's thread hop is
    checked again after it: a Restore during the hop makes it a re-sync, and the new
    epoch's step adds only the new epoch's contributions."""
    store = ShardStore(0, 1, checkpoints=tmp_path)
    await store.put({W: np.zeros(4, np.float32)}, SGD1)
    await asyncio.gather(*(store.update(_head(0, p, workers_per_group=2), _grad(0.0)) for p in (0, 1)))
    await store.flush_checkpoints()
    gate = store.kernel.first_nonfinite = Gate(store.kernel.first_nonfinite)  # the finite check's thread hop
    stale = asyncio.create_task(store.update(_head(1, 0, workers_per_group=2), _grad(100.0)))
    await gate.entered()
    await store.restore(1, epoch=1)
    gate.release()
    with pytest.raises(WireError) as err:
        await asyncio.wait_for(stale, 5.0)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "epoch 1" in err.value.message and "re-sync" in err.value.message
    assert store.groups[0].round is None, "the old epoch's contribution was not added"
    await asyncio.gather(*(store.update(_head(1, p, epoch=1, workers_per_group=2), _grad(1.0)) for p in (0, 1)))
    np.testing.assert_allclose(np.asarray(store.values[W]), -1.0)


async def _store_at_checkpoint(tmp_path, steps: int, every: int, folder=None) -> ShardStore:
    store = ShardStore(0, 1, checkpoints=folder or tmp_path)
    await store.put({W: np.zeros(4, np.float32)}, SGD1)
    for step in range(steps):
        await store.update(_head(step, every=every), _grad(1.0))
    await store.flush_checkpoints()
    assert checkpoint.complete_steps(tmp_path, 1)[-1] == steps
    return store


async def _check_new_history_checkpoints(store: ShardStore, tmp_path, start: int, stop: int, every: int) -> None:
    """The restored history reaches ``stop`` and checkpoints it: the file is the live state."""
    for step in range(start, stop):
        await store.update(_head(step, epoch=1, every=every), _grad(5.0))
    await store.flush_checkpoints()
    assert checkpoint.complete_steps(tmp_path, 1)[-1] == stop
    tensors, meta = checkpoint.load_shard(tmp_path, stop, 0)
    assert meta["epoch"] == 1
    np.testing.assert_array_equal(tensors["value/0"], np.asarray(store.values[W]))


@pytest.mark.asyncio
async def test_a_restore_waits_for_the_checkpoint_write_in_flight_and_then_drops_it(tmp_path):
    """A write of the abandoned history that lands after the Restore would stand as
    checkpoint 4 and make the restored history skip its own write of step 4."""
    folder = GatedFolder(tmp_path)
    store = await _store_at_checkpoint(tmp_path, 2, every=2, folder=folder)
    gate = folder.save = Gate(folder.save)
    for step in (2, 3):
        await store.update(_head(step, every=2), _grad(1.0))
    await gate.entered()  # the write of step 4 is in flight
    restoring = asyncio.create_task(store.restore(2, epoch=1))
    await asyncio.sleep(0.1)
    gate.release()
    await asyncio.wait_for(restoring, 10.0)
    await store.flush_checkpoints()
    assert checkpoint.complete_steps(tmp_path, 1) == [2]
    assert not checkpoint.step_dir(tmp_path, 4).exists() and store.saved_step == 2
    await _check_new_history_checkpoints(store, tmp_path, 2, 4, every=2)


@pytest.mark.unit
@pytest.mark.asyncio
async def test_a_checkpoint_of_the_abandoned_history_queued_during_a_restore_is_never_written(tmp_path):
    """A step of the old epoch that completes while the Restore reads its checkpoint
    queues a write behind the Restore: that write is of the abandoned history."""
    folder = GatedFolder(tmp_path)
    store = await _store_at_checkpoint(tmp_path, 1, every=1, folder=folder)
    gate = folder.load = Gate(folder.load)
    restoring = asyncio.create_task(store.restore(1, epoch=1))
    await gate.entered()
    await store.update(_head(1, every=1), _grad(1.0))  # still epoch 0: its checkpoint of step 2 queues
    gate.release()
    await asyncio.wait_for(restoring, 10.0)
    await store.flush_checkpoints()
    assert checkpoint.complete_steps(tmp_path, 1) == [1]
    assert not checkpoint.step_dir(tmp_path, 2).exists() and store.saved_step == 1
    await _check_new_history_checkpoints(store, tmp_path, 1, 2, every=1)


async def _checkpointed_shard(tmp_path) -> np.ndarray:
    """A shard that trained 2 steps, checkpointed step 2 and stopped; its values."""
    server = ShardServer(0, 1, checkpoint_dir=tmp_path)
    await server.start("127.0.0.1:0")
    client = ShardClient(server.address, 0, timeout_s=10, retries=0)
    try:
        await client.put([("w", 0, np.zeros(4, np.float32))], SGD1)
        for step in range(2):
            await send(client, {0: np.ones(4, np.float32)}, step=step, checkpoint_every=2)
        return np.asarray(server.store.values[W])
    finally:
        await client.close()
        await server.stop(0)


@pytest.mark.asyncio
async def test_a_shard_loading_its_checkpoint_answers_unavailable_until_it_is_loaded(tmp_path):
    """While a restarted shard loads, an answer from it (epoch 0, no slices) would
    tell a stub that the shard lost its state: every RPC is UNAVAILABLE instead, which
    clients retry, and health says NOT_SERVING."""
    values = await _checkpointed_shard(tmp_path)
    folder = GatedFolder(tmp_path)
    gate = folder.load = Gate(folder.load)
    server = ShardServer(0, 1, checkpoint_dir=folder)
    starting = asyncio.create_task(server.start("127.0.0.1:0"))
    await gate.entered()
    impatient = ShardClient(server.address, 0, timeout_s=10, retries=0)
    patient = ShardClient(server.address, 0, timeout_s=10, retries=8)
    channel = grpc.aio.insecure_channel(server.address)
    try:
        for rpc in (impatient.describe, lambda: impatient.get(GetHeader(0, 0, [W], 1.0), expect4)):
            with pytest.raises(ShardError) as err:
                await rpc()
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
            assert "shard 0 is loading its checkpoint: retry" in str(err.value)
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        getting = asyncio.create_task(patient.get(GetHeader(0, 2, [W], 5.0, wait_for_put=True), expect4))
        await asyncio.sleep(0.2)
        gate.release()
        await asyncio.wait_for(starting, 10.0)
        fresh = await asyncio.wait_for(getting, 10.0)
        assert fresh.step == 2
        np.testing.assert_array_equal(fresh.values[W], values)
        described = await impatient.describe()
        assert described.epoch == 1 and len(described.slices) == 1
    finally:
        gate.release()
        await channel.close()
        await impatient.close()
        await patient.close()
        if not starting.done():
            starting.cancel()
        await server.stop(0)


@pytest.mark.asyncio
async def test_loading_the_newest_checkpoint_wakes_the_waiters(tmp_path):
    """A read waiting for slices and a step is answered as soon as the load put them there."""
    values = await _checkpointed_shard(tmp_path)
    store = ShardStore(0, 1, checkpoints=tmp_path)
    waiting = asyncio.create_task(store.read([W], 0, 2, 5.0, wait_for_put=True))
    await asyncio.sleep(0.05)
    assert await store.load_newest() == 2
    step, held, _ = await asyncio.wait_for(waiting, 2.0)
    assert step == 2 and store.epoch == 1 and store.saved_step == 2
    np.testing.assert_array_equal(np.asarray(held[W]), values)
