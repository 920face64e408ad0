"""Waits that end with a name, not a hang: a process that never starts, a step that
cannot complete, a group 0 whose warmup stops advancing; and a wait lasts as long as
the stub gets somewhere."""

import asyncio
import threading
import time

import grpc
import numpy as np
import pytest

from psfw.base.errors import ShardError
from psfw.jobs.config import parse_config
from psfw.jobs.embedded import train_async

from helpers import SGD, send


@pytest.mark.asyncio
async def test_a_process_that_never_starts_is_named_instead_of_a_hang():
    config = parse_config(
        {
            "train": {"batch_size": 20, "steps": 3, "wait_s": 1.0},
            "cluster": {"workers_per_group": 2, "workers_per_process": 1, "servers": 1},
        }
    )
    started = time.monotonic()
    with pytest.raises(ShardError) as err:  # the stub's own error, not a group of every task's
        await train_async(config, progress=False, outputs=False, processes=[0])
    assert time.monotonic() - started < 30
    assert "to be put" in str(err.value) and "has their owner started?" in str(err.value)


@pytest.mark.asyncio
async def test_a_step_that_cannot_complete_names_the_missing_processes(shard):
    server, client = shard
    await client.put([("w", 0, np.zeros(4, np.float32))], SGD)
    with pytest.raises(ShardError) as err:
        await send(client, {0: np.ones(4, np.float32)}, workers_per_group=2, group_processes=2, wait_s=0.5)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "group 0 step 0 is incomplete" in str(err.value) and "missing processes: [1]" in str(err.value)


@pytest.mark.asyncio
async def test_another_group_waits_for_group_0s_warmup_while_it_advances(shard):
    """wait_s bounds a wait without progress, not group 0's whole warmup; a group 0
    that stops advancing is named."""
    from psfw.base.errors import WaitTimeout
    from psfw.protocol.layout import plan_layout
    from psfw.runtime.param_cache import ParamCache
    from psfw.runtime.process_setup import ProcessSetup
    from psfw.runtime.sync import ShardSync

    server, client = shard
    await client.put([("w", 0, np.zeros(4, np.float32))], SGD)
    layout = plan_layout({"w": ((4,), "float32")}, 1, 1, 1 << 20)
    sync = ShardSync(ProcessSetup([client], layout, ParamCache(1, 1), group=1, process=1, wait_s=0.5, warmup_steps=8))

    async def group_0() -> None:
        for step in range(8):  # a step every 0.2 s: 1.6 s in all, three times wait_s
            await asyncio.sleep(0.2)
            await send(client, {0: np.ones(4, np.float32)}, step=step, worker_groups=2)

    started = time.monotonic()
    await asyncio.gather(group_0(), asyncio.wait_for(sync.await_warmup(), 10))
    assert time.monotonic() - started > 3 * sync.wait_s
    sync.warmup_steps = 20
    with pytest.raises(WaitTimeout, match="group 0 has completed 8 of its 20 warmup steps and did not advance"):
        await asyncio.wait_for(sync.await_warmup(), 10)


def test_a_worker_waits_as_long_as_its_stub_gets_somewhere():
    """A worker's wait counts from the stub's last note (group 0's warmup advancing
    keeps it waiting); once the notes stop, it gives up after its limit."""
    from psfw.base.errors import WaitTimeout
    from psfw.runtime.param_cache import ParamCache, StepValues

    cache = ParamCache(1, 1)
    outcome = []
    waiter = threading.Thread(target=lambda: outcome.append(cache.start(0.3)))
    waiter.start()
    for done in range(10):  # 1 s of notes, 0.1 s apart: more than three times the limit
        time.sleep(0.1)
        cache.doing(f"waiting for group 0's warmup (at {done})")
    cache.publish(4, StepValues({}))
    waiter.join(5)
    assert outcome == [(4, 0)]
    cache.doing("waiting for group 0's warmup (at 10)")
    started = time.monotonic()
    with pytest.raises(WaitTimeout, match=r"the stub has been waiting for group 0's warmup \(at 10\)"):
        cache.fresh(5, 0, 0.3)
    assert time.monotonic() - started < 2
