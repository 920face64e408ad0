"""Nothing added twice: a retried update gets the same answer, a second contribution
of a process to a pending step is not added, an update of another epoch asks for a
re-sync, and a group one step apart on its shards resends the step without a
restore."""

import asyncio

import grpc
import numpy as np
import pytest

from psfw.base.errors import ShardError
from psfw.jobs.config import parse_config
from psfw.jobs.embedded import train_async
from psfw.protocol.messages import UpdateHeader
from psfw.runtime.shard_client import ShardClient
from psfw.services.server import ShardServer

from helpers import SGD, contribute


@pytest.mark.unit
@pytest.mark.asyncio
async def test_a_retried_update_gets_the_same_answer_and_is_added_once(shard):
    server, client = shard
    await client.put([("w", 0, np.zeros(4, np.float32))], SGD)
    first = await contribute(client)
    again = await contribute(client)
    assert first.step == again.step == 1
    np.testing.assert_array_equal(first.values[("w", 0)], again.values[("w", 0)])
    assert server.store.versions[("w", 0)] == 1 and server.store.updates_applied == 1


@pytest.mark.asyncio
async def test_a_duplicate_contribution_to_a_pending_step_is_not_added(shard):
    server, client = shard
    await client.put([("w", 0, np.zeros(4, np.float32))], SGD)
    waiting = [asyncio.create_task(contribute(client, 0, 2, 1.0)) for _ in range(2)]
    await asyncio.sleep(0.2)
    assert server.store.groups[0].round.workers == 1, "the same process counted once"
    other = await contribute(client, 1, 2, 3.0)
    answers = [await t for t in waiting] + [other]
    for answer in answers:
        np.testing.assert_allclose(answer.values[("w", 0)], -0.1 * (1.0 + 3.0) / 2)
    assert server.store.versions[("w", 0)] == 1


@pytest.mark.unit
@pytest.mark.asyncio
async def test_an_update_from_another_epoch_asks_for_a_resync(shard):
    server, client = shard
    await client.put([("w", 0, np.zeros(4, np.float32))], SGD)
    with pytest.raises(ShardError) as err:
        await contribute(client, epoch=3)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "re-sync" in str(err.value)


@pytest.mark.asyncio
@pytest.mark.usefixtures("short_twin_watch")
async def test_another_group_one_step_apart_on_its_shards_goes_on_without_a_restore():
    """A checkpoint (taken on group 0's steps) can catch another group's last update
    on some shards only; that group resends the step, and the shards that applied it
    acknowledge it without adding it twice."""
    from psfw.jobs.job import build_job

    def config(steps):
        return parse_config(
            {
                "train": {"batch_size": 20, "steps": steps, "wait_s": 10.0},
                "cluster": {"worker_groups": 2, "workers_per_group": 1, "workers_per_process": 1, "servers": 2},
            }
        )

    servers = [ShardServer(i, 2) for i in range(2)]
    for server in servers:
        await server.start("127.0.0.1:0")
    addresses = [s.address for s in servers]
    try:
        await train_async(config(3), progress=False, outputs=False, servers=addresses)
        # group 1's update of step 3 reached shard 0 only
        layout = build_job(config(3)).layout
        client = ShardClient(addresses[0], 0)
        grads = {(s.key, s.index): np.zeros(s.size, np.float32) for s in layout.shard_slices(0)}
        header = UpdateHeader(group=1, step=3, process=1, workers=1, rows=20, workers_per_group=1, worker_groups=2)
        await client.update(header, grads, layout.slice_dtype_shape)
        await client.close()
        assert [s.store.group_step(1) for s in servers] == [4, 3]
        await train_async(config(6), progress=False, outputs=False, servers=addresses, processes=[1], resume=True)
        assert [s.store.group_step(1) for s in servers] == [6, 6]
        assert [s.store.epoch for s in servers] == [0, 0], "nothing was restored"
    finally:
        for server in servers:
            await server.stop(0)
