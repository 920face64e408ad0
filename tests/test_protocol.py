"""The stub/shard protocol: batching, ownership and versions, with real shards."""

import asyncio
import threading
import time

import grpc
import numpy as np
import pytest

import psfw.runtime.worker
from psfw.base.errors import PsfwError, ShardError, WaitTimeout
from psfw.jobs.config import parse_config
from psfw.jobs.embedded import train_async
from psfw.jobs.job import build_job
from psfw.protocol.messages import GetHeader
from psfw.runtime.param_cache import ParamCache, StepValues
from psfw.runtime.shard_client import ShardClient
from psfw.services.server import ShardServer

from helpers import SGD, send


def config(workers=2, per_process=2, batch=40, steps=5, servers=2, hidden=(16, 16, 16), slice_bytes=1024):
    return parse_config(
        {
            "model": {"name": "mlp", "hidden": list(hidden)},
            "train": {"batch_size": batch, "steps": steps},
            "optimizer": {"name": "sgd", "learning_rate": 0.1},
            "cluster": {
                "workers_per_group": workers,
                "workers_per_process": per_process,
                "servers": servers,
                "slice_bytes": slice_bytes,
            },
        }
    )


async def run_with_shards(cfg):
    servers = [ShardServer(i, cfg.cluster.servers) for i in range(cfg.cluster.servers)]
    for server in servers:
        await server.start("127.0.0.1:0")
    try:
        result = await train_async(cfg, progress=False, outputs=False, servers=[s.address for s in servers])
        counts = [dict(s.requests.rpc_counts) for s in servers]
    finally:
        for server in servers:
            await server.stop(0)
    return result, counts


@pytest.mark.asyncio
@pytest.mark.parametrize(("workers", "per_process"), [(2, 2), (4, 2)])
async def test_one_update_per_shard_per_step_and_at_most_one_get(workers, per_process):
    """8 parameters cut into many slices still travel as one Update per shard per
    step from each process; Gets happen only at start (here: none) and at the end."""
    cfg = config(workers, per_process)
    processes = workers // per_process
    result, counts = await run_with_shards(cfg)
    assert len(result.params) == 8
    assert max(len(p.slices) for p in build_job(cfg).layout.params.values()) > 1
    for stub_rpcs in result.rpcs:
        assert stub_rpcs["Update"] == cfg.train.steps * cfg.cluster.servers
        assert stub_rpcs["Get"] <= cfg.cluster.servers  # at start, only for parameters owned elsewhere
    for shard_counts in counts:
        assert shard_counts["Update"] == cfg.train.steps * processes
        # at most one Get per process at start, plus the launcher's final read
        assert shard_counts.get("Get", 0) <= processes + 1


@pytest.mark.asyncio
async def test_only_owners_initialize_and_put(monkeypatch):
    """3 workers, 2 parameters: worker 2 owns nothing, initializes nothing, and its
    process (one worker per process here) sends no Put, only a Get."""
    made = []
    real = psfw.runtime.worker.init_owned

    def recording(init, seed, names):
        made.append(sorted(names))
        return real(init, seed, names)

    monkeypatch.setattr(psfw.runtime.worker, "init_owned", recording)
    cfg = config(workers=3, per_process=1, batch=30, hidden=(), slice_bytes=1 << 20)
    result, counts = await run_with_shards(cfg)
    names = sorted(n for part in made for n in part)
    assert names == sorted(result.params), "each parameter initialized exactly once"
    assert len(made) == 2
    puts = [r["Put"] for r in result.rpcs]
    gets = [r["Get"] for r in result.rpcs]
    assert puts[2] == 0 and gets[2] >= 1, (puts, gets)
    assert sum(c.get("Put", 0) for c in counts) == sum(puts)


@pytest.mark.asyncio
async def test_workers_never_compute_on_a_stale_version(monkeypatch):
    seen = []
    real = ParamCache.fresh

    def recording(self, step, generation, timeout_s):
        values = real(self, step, generation, timeout_s)
        seen.append((step, self.step))
        return values

    monkeypatch.setattr(ParamCache, "fresh", recording)
    cfg = config(workers=2, per_process=1, steps=6)
    await run_with_shards(cfg)
    assert len(seen) == 2 * (6 + 1)  # each step, and the end of the job (a re-sync may still send them back)
    assert all(have == want for want, have in seen), seen


def _expect(key):
    return np.dtype("float32"), (4,)


@pytest.mark.asyncio
async def test_a_get_for_a_future_step_waits_then_times_out_naming_it(shard):
    server, client = shard
    await client.put([("w", 0, np.zeros(4, np.float32))], SGD)
    with pytest.raises(ShardError) as err:
        await client.get(GetHeader(0, 3, [("w", 0)], wait_s=0.3), _expect)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "group 0 to complete step 3, it has completed 0" in str(err.value)


@pytest.mark.asyncio
async def test_a_waiting_get_returns_as_soon_as_the_step_completes(shard):
    server, client = shard
    await client.put([("w", 0, np.ones(4, np.float32))], SGD)
    waiting = asyncio.create_task(client.get(GetHeader(0, 1, [("w", 0)], wait_s=10), _expect))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    await send(client, {0: np.full(4, 2.0, np.float32)}, rows=2)
    step, values, *_ = await asyncio.wait_for(waiting, 5)
    assert step == 1
    np.testing.assert_allclose(values[("w", 0)], 1.0 - 0.1 * 2.0 / 2)


@pytest.mark.asyncio
async def test_group_step_completes_only_when_all_workers_reported():
    """Two processes of one group: the first waits for the second; both get the
    averaged update (row-weighted), applied once."""
    server = ShardServer(0, 1)
    await server.start("127.0.0.1:0")
    clients = [ShardClient(server.address, 0, timeout_s=10, retries=0) for _ in range(2)]
    try:
        await clients[0].put([("w", 0, np.zeros(4, np.float32))], SGD)

        def contribute(process, grad_sum, rows):
            return send(
                clients[process], {0: np.full(4, grad_sum, np.float32)}, process=process, rows=rows, workers_per_group=2
            )

        first = asyncio.create_task(contribute(0, 3.0, 1))
        await asyncio.sleep(0.2)
        assert not first.done(), "the step must wait for the whole group"
        second = await contribute(1, 5.0, 3)
        first = await first
        for step, values, *_ in (first, second):
            assert step == 1
            np.testing.assert_allclose(values[("w", 0)], -0.1 * (3.0 + 5.0) / 4)
        assert server.store.versions[("w", 0)] == 1
    finally:
        for client in clients:
            await client.close()
        await server.stop(0)


def test_the_cache_wakes_a_waiting_worker_thread_and_takes_any_wait_limit():
    """Workers wait in threads of their own; a wait of ``inf`` (a huge train.wait_s)
    is no limit rather than an error, and a failure wakes every waiter."""
    cache = ParamCache(0, 0)
    got = []
    waiter = threading.Thread(target=lambda: got.append(cache.fresh(2, 0, float("inf"))))
    waiter.start()
    cache.publish(1, StepValues({"w": 1}))
    time.sleep(0.05)
    assert not got, "step 1 is not fresh enough for step 2"
    cache.publish(2, StepValues({"w": 2}))
    waiter.join(5)
    assert got == [StepValues({"w": 2})]
    errors = []

    def wait_for_step_3():
        try:
            cache.fresh(3, 0, 30)
        except PsfwError as err:
            errors.append(str(err))

    waiter = threading.Thread(target=wait_for_step_3)
    waiter.start()
    cache.fail(RuntimeError("shard 1 is gone"))
    waiter.join(5)
    assert errors == ["process 0 stopped: shard 1 is gone"]
    with pytest.raises(WaitTimeout, match="waited 0.1 s for parameters of step 5; the cache holds step 2"):
        _published(2).fresh(5, 0, 0.1)
    cache = _published(2)
    cache.doing("waiting for shards [1] to answer the Update of step 2")
    with pytest.raises(WaitTimeout, match=r"the stub has been waiting for shards \[1\] to answer the Update of step 2"):
        cache.fresh(3, 0, 0.1)


def _published(step):
    cache = ParamCache(0, 0)
    cache.publish(step, StepValues({}))
    return cache


@pytest.mark.asyncio
async def test_a_cancelled_job_leaves_no_worker_thread_behind():
    """Cancelling training stops each worker's thread at its next wait, and the
    cancellation waits for it: no thread outlives the job."""
    cfg = config(workers=2, per_process=2, steps=100_000)
    # waits of 30 s: a worker that waited one out would take 100 s, far past the bound below
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"wait_s": 30.0})})
    training = asyncio.create_task(run_with_shards(cfg))
    deadline = time.monotonic() + 60
    while not any(t.name.startswith("psfw-worker") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the workers never started"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # some steps in
    cancelled = time.monotonic()
    training.cancel()
    with pytest.raises(asyncio.CancelledError):
        await training
    assert time.monotonic() - cancelled < 20, "the worker threads waited out their timeouts"
    assert not [t.name for t in threading.enumerate() if t.name.startswith("psfw-worker")]
