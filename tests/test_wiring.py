"""Cluster wiring: each shard is where --servers says, and a worker says what it waits for."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import tomllib

import pytest
import pytest_asyncio

from psfw.base.errors import PsfwError, UsageError
from psfw.cli.main import main
from psfw.jobs.config import parse_config
from psfw.jobs.embedded import train_async
from psfw.runtime import waiting
from psfw.runtime.connect import connect_all
from psfw.services.server import ShardServer
from psfw.tools.cluster import Cluster

from helpers import assert_params_close, reference, shm_region

CONFIG = """
seed = 3
[model]
name = "mlp"
hidden = [8]
[train]
batch_size = 16
steps = 2
wait_s = 20
[cluster]
servers = 2
transport = "{transport}"
"""


@pytest_asyncio.fixture
async def two_shards():
    """Shards 0 and 1 of 2, on ports of their own."""
    servers = [ShardServer(i, 2) for i in range(2)]
    for server in servers:
        await server.start("127.0.0.1:0")
    yield [s.address for s in servers]
    for server in servers:
        await server.stop(0)


async def _refusal(addresses: list[str]) -> str:
    with pytest.raises(UsageError) as refused:
        await connect_all(addresses, who="", timeout_s=10, retries=0)
    return str(refused.value)


@pytest.mark.unit
@pytest.mark.asyncio
async def test_swapped_addresses_are_refused_at_connect_naming_the_shard_and_its_place(two_shards):
    first, second = two_shards
    assert await _refusal([second, first]) == (
        f"{second} is shard 1 of 2, but --servers lists it first: "
        "list the shards in the order of their --shard (shard 0 first)"
    )


@pytest.mark.unit
@pytest.mark.asyncio
async def test_a_shard_started_for_another_count_is_refused_at_connect(two_shards):
    lone = ShardServer(0, 1)
    await lone.start("127.0.0.1:0")
    try:
        assert await _refusal([two_shards[0], lone.address]) == (
            f"{lone.address} was started --of 1, but --servers lists 2 shards: "
            "start every shard with --of 2, or list the shards of one cluster"
        )
    finally:
        await lone.stop(0)


@pytest.mark.unit
@pytest.mark.asyncio
async def test_an_address_listed_twice_is_refused_before_connecting():
    # nothing listens there: the refusal comes before any connection is tried
    assert await _refusal(["127.0.0.1:1", "127.0.0.1:1"]) == (
        "--servers lists 127.0.0.1:1 twice: give each shard's address once, in the order of their --shard"
    )


@pytest.mark.unit
@pytest.mark.asyncio
async def test_shards_of_this_process_are_checked_too(two_shards):
    """The in-process path (shards that run in this very process) checks the same."""
    config = parse_config(tomllib.loads(CONFIG.format(transport="auto")), "job.toml")
    with pytest.raises(UsageError, match=r"is shard 1 of 2, but --servers lists it first"):
        await train_async(config, progress=False, outputs=False, servers=two_shards[::-1])


@pytest.mark.unit
@pytest.mark.asyncio
async def test_psfw_worker_with_swapped_servers_says_so_in_one_line(two_shards, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "job.toml").write_text(CONFIG.format(transport="grpc"))
    first, second = two_shards
    argv = ["worker", "job.toml", "--servers", f"{second},{first}", "--run-dir", str(tmp_path / "run")]
    code = await asyncio.to_thread(main, argv)  # its own event loop, beside the shards'
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.strip() == (
        f"psfw worker: {second} is shard 1 of 2, but --servers lists it first: "
        "list the shards in the order of their --shard (shard 0 first)"
    )


@pytest.mark.unit
def test_psfw_worker_refuses_an_address_given_twice(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "job.toml").write_text(CONFIG.format(transport="grpc"))
    code = main(["worker", "job.toml", "--servers", "127.0.0.1:1,127.0.0.1:1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == (
        "psfw worker: --servers lists 127.0.0.1:1 twice: give each shard's address once, in the order of their --shard"
    )


@pytest.mark.unit
@pytest.mark.asyncio
async def test_status_shows_each_shards_own_index_and_says_what_is_wrong(two_shards, capsys):
    first, second = two_shards
    async with Cluster([second, first]) as cluster:
        rows = await cluster.status(interval_s=0)
    assert [r["shard"] for r in rows] == [1, 0]
    assert rows[0]["problem"].startswith(f"{second} is shard 1 of 2, but the address list has it first")
    code = await asyncio.to_thread(main, ["status", f"{second},{first}", "--interval", "0"])
    out, err = capsys.readouterr()
    assert code == 1
    assert f"psfw status: {second} is shard 1 of 2, but the address list has it first" in err
    assert f"psfw status: {first} is shard 0 of 2, but the address list has it second" in err
    assert len(out.splitlines()) == 3, out  # the table is still shown


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.asyncio
async def test_a_worker_started_before_its_same_host_shard_takes_the_same_host_path(caplog):
    """The path is chosen when the shard first answers, not at the first try."""
    address = f"127.0.0.1:{_free_port()}"
    region = shm_region(1000, 24)
    server = ShardServer(0, 1)
    caplog.set_level(logging.INFO, logger="psfw")
    try:
        connecting = asyncio.create_task(
            connect_all([address], who="process 0", layout=region.layout, timeout_s=30, retries=0)
        )
        await asyncio.sleep(0.5)
        assert not connecting.done(), "connect waits for a shard that is not up yet"
        await server.start(address)
        [transport] = await asyncio.wait_for(connecting, 40)
        try:
            assert transport.step_buffers is not None, "the same-host path declares the region as its buffers"
            assert "process 0: shard 0 link (unix, shared memory)" in caplog.text
        finally:
            await transport.close()
    finally:
        region.release()
        await server.stop(0)


ONE_PARAMETER_MODEL = """
import jax.numpy as jnp


def init(key):
    return {"w": jnp.zeros((10, 1), jnp.float32)}


def loss(params, x, y):
    return jnp.mean((x @ params["w"] - y.reshape(-1, 1)) ** 2), {}
"""


@pytest.mark.slow
@pytest.mark.asyncio
async def test_a_step_that_waits_for_a_process_names_it_every_few_seconds(tmp_path, monkeypatch, caplog):
    """Process 1 of the group never starts: process 0 says so while it waits, long
    before its wait runs out."""
    monkeypatch.setattr(waiting, "REPORT_EVERY_S", 0.2)
    (tmp_path / "model.py").write_text(ONE_PARAMETER_MODEL)  # one parameter: process 0 owns it
    config = parse_config(
        {
            "model": {"name": "custom", "path": "model.py"},
            "data": {"name": "diabetes"},
            "train": {"batch_size": 8, "steps": 3, "wait_s": 120},
            "cluster": {"workers_per_group": 2, "workers_per_process": 1, "servers": 1},
        },
        "job.toml",
        str(tmp_path),
    )
    server = ShardServer(0, 1)
    await server.start("127.0.0.1:0")
    job = asyncio.create_task(
        train_async(config, progress=False, outputs=False, servers=[server.address], processes=[0])
    )
    try:
        said = []
        for _ in range(600):  # at most 60 s, for the start (JAX compiles) and a few intervals
            said = [r.getMessage() for r in caplog.records if "waiting for process" in r.getMessage()]
            if len(said) >= 2 or job.done():
                break
            await asyncio.sleep(0.1)
        assert not job.done(), "the job waits (wait_s = 120)"
        assert len(said) >= 2, "said again every interval"
        first = re.fullmatch(r"group 0 step 0: waiting for process 1 since \d\d:\d\d:\d\d \((\d+) s\)", said[0])
        assert first is not None, said[0]
        assert int(first.group(1)) <= 5
    finally:
        job.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await job
        await server.stop(0)


@pytest.mark.slow
@pytest.mark.asyncio
async def test_a_process_started_twice_is_refused_and_the_running_job_ends_as_if_alone(two_shards):
    steps = 5000  # long enough to run on while the second start looks (a second or two, twice)
    config = parse_config(
        {
            "seed": 4,
            "model": {"name": "mlp", "hidden": [8]},
            "train": {"batch_size": 16, "steps": steps, "wait_s": 60},
            "optimizer": {"name": "sgd", "learning_rate": 0.1},
            "cluster": {"workers_per_group": 2, "workers_per_process": 1, "servers": 2},
        },
        "job.toml",
    )
    run = dict(progress=False, outputs=False, servers=two_shards)
    job = asyncio.create_task(train_async(config, processes=[0, 1], **run))
    async with Cluster(two_shards) as cluster:
        for _ in range(600):  # at most 60 s: until the job is well under way
            step = min(r.groups[0].step if r.groups else 0 for r in await cluster.describe())
            if step >= 20 or job.done():
                break
            await asyncio.sleep(0.1)
    assert not job.done() and step >= 20
    for resume in (False, True):  # --resume would not make it a restart either
        with pytest.raises(PsfwError) as refused:
            await train_async(config, processes=[1], resume=resume, **run)
        assert re.fullmatch(
            r"process 1 of group 0 is already running against these shards \(last report \d+ s ago\): "
            r"stop it first, or start this one as another --process",
            str(refused.value),
        ), str(refused.value)
    assert not job.done(), "the refusal came while the job ran"
    result = await asyncio.wait_for(job, 300)
    assert result.steps == steps
    assert_params_close(result.params, reference(config, steps))
