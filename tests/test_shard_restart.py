"""A shard that restarts or stops answering: workers that reported the steps it lost
compute them again, one that froze is named by the error that ends the job, and a
shard whose Puts are still on their way is not taken for one that lost its state."""

import asyncio
import signal

import numpy as np
import pytest

from psfw.base.errors import ShardError
from psfw.jobs.config import parse_config
from psfw.jobs.embedded import train_async
from psfw.protocol.messages import UpdateHeader
from psfw.runtime.shard_client import ShardClient
from psfw.services.checkpoint import complete_steps
from psfw.services.server import ShardServer

from helpers import SGD, assert_params_close, reference


@pytest.mark.asyncio
async def test_a_shard_restarted_during_the_last_update_sends_the_workers_back(tmp_path, monkeypatch):
    """The workers have reported their last step when the shard restarts from the
    checkpoint before it: they must compute those steps again, not leave the stub
    waiting for them forever."""
    steps = 12
    config = parse_config(
        {
            "train": {"batch_size": 20, "steps": steps, "wait_s": 10.0, "checkpoint_every": 5, "retries": 1},
            "cluster": {"workers_per_group": 2, "workers_per_process": 2, "servers": 2, "transport": "grpc"},
        }
    )
    folder = tmp_path / "checkpoints"
    servers = [ShardServer(i, 2, checkpoint_dir=folder) for i in range(2)]
    for server in servers:
        await server.start("127.0.0.1:0")
    original = ShardClient.update
    restarted = []

    async def update(self, header, *args, **kwargs):
        if header.step == steps - 1 and self.shard == 0 and not restarted:
            for _ in range(1000):  # bounded: 10 s for the shards' step-10 checkpoint, written off the loop
                if 10 in complete_steps(folder, 2):
                    break
                await asyncio.sleep(0.01)
            old = servers[0]
            await asyncio.gather(old._server.stop(0), old.link.stop(0))  # a crash: no final checkpoint
            servers[0] = ShardServer(0, 2, checkpoint_dir=folder)
            await servers[0].start(old.address)
            restarted.append(servers[0].restored_step)
        return await original(self, header, *args, **kwargs)

    monkeypatch.setattr(ShardClient, "update", update)
    try:
        result = await asyncio.wait_for(
            train_async(config, progress=False, outputs=False, servers=[s.address for s in servers]), 90
        )
    finally:
        for server in servers:
            await server.stop(0)
    assert restarted == [10]
    assert_params_close(result.params, reference(config, steps))


@pytest.mark.asyncio
async def test_a_shard_that_stops_answering_is_named_by_the_error_that_ends_the_job():
    """The stub's error (which shard, which RPC) ends the job, not a worker's wait."""
    from psfw.jobs.shard_processes import shard_processes

    config = parse_config(
        {
            "train": {"batch_size": 20, "steps": 100_000, "wait_s": 2.0, "retries": 0},
            "cluster": {"workers_per_group": 2, "workers_per_process": 2, "servers": 2},
        }
    )
    with shard_processes(2) as (addresses, procs):

        async def freeze_mid_training() -> None:
            probe = ShardClient(addresses[1], 1, timeout_s=5)
            try:
                for _ in range(600):  # bounded: 30 s
                    groups = (await probe.describe()).groups
                    if groups and groups[0].step >= 5:
                        procs[1].send_signal(signal.SIGSTOP)
                        return
                    await asyncio.sleep(0.05)
            finally:
                await probe.close()

        freezing = asyncio.create_task(freeze_mid_training())
        try:
            with pytest.raises(ShardError) as err:
                await asyncio.wait_for(train_async(config, progress=False, outputs=False, servers=addresses), 60)
        finally:
            await freezing
            procs[1].send_signal(signal.SIGCONT)
    # the Update to the frozen shard ran past its deadline (wait_s + the RPC margin)
    assert f"shard 1 ({addresses[1]}) Update: DEADLINE_EXCEEDED" in str(err.value)


@pytest.mark.unit
@pytest.mark.asyncio
async def test_a_shard_whose_puts_are_on_their_way_is_not_taken_for_one_that_lost_its_state():
    """A process that joins while the owner's Puts have reached one shard but not yet
    the other waits for them; once a step was made, an empty shard did lose its state."""
    from psfw.base.errors import PsfwError
    from psfw.protocol.layout import plan_layout
    from psfw.runtime.inprocess import InProcessClient
    from psfw.runtime.param_cache import ParamCache
    from psfw.runtime.process_setup import ProcessSetup
    from psfw.runtime.sync import ShardSync

    servers = [ShardServer(i, 2) for i in range(2)]
    for server in servers:
        await server.start("127.0.0.1:0")
    try:
        clients = [InProcessClient(s, i) for i, s in enumerate(servers)]
        layout = plan_layout({"a": ((4,), "float32"), "b": ((4,), "float32")}, 2, 1, 1 << 20)
        sync = ShardSync(ProcessSetup(clients, layout, ParamCache(0, 1), group=0, process=1, wait_s=5))
        first = next(i for i in range(2) if layout.shard_slices(i))
        slices = layout.shard_slices(first)
        await clients[first].put([(s.key, s.index, np.zeros(s.size, np.float32)) for s in slices], SGD)
        replies = await sync.settle()  # fresh: the other shard's Put is on its way
        assert [len(r.slices) for r in replies][first] == len(slices)
        grads = {(s.key, s.index): np.ones(s.size, np.float32) for s in slices}
        header = UpdateHeader(group=0, step=0, process=0, workers=1, rows=1, workers_per_group=1, wait_s=5)
        for i in range(2):  # a step: only now does an empty shard mean a lost state
            await clients[i].update(header, grads if i == first else {}, layout.slice_dtype_shape)
        with pytest.raises(PsfwError, match=r"lost their state \(restarted without a checkpoint\)"):
            await sync.settle()
    finally:
        for server in servers:
            await server.stop(0)
