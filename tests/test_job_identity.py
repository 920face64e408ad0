"""Shards know which job they serve: a process never joins another job's parameters,
nor continues a finished or running job, by accident."""

import json
import os
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import pytest_asyncio

from psfw.base.errors import PsfwError, ShardError
from psfw.base.identity import differences, job_identity
from psfw.jobs.config import parse_config
from psfw.jobs.embedded import train_async
from psfw.protocol.messages import GetHeader, UpdateHeader
from psfw.runtime.shard_client import ShardClient
from psfw.services.server import ShardServer
from psfw.tools.cluster import Cluster, format_status

PSFW = [sys.executable, "-m", "psfw.cli"]


def job(steps=6, lr=0.1, hidden=32, name=None, seed=3):
    data = {
        "seed": seed,
        "model": {"name": "mlp", "hidden": [hidden]},
        "train": {"batch_size": 32, "steps": steps, "wait_s": 20},
        "optimizer": {"name": "adam", "learning_rate": lr},
        "cluster": {"servers": 2, "workers_per_group": 2, "workers_per_process": 2},
    }
    if name:
        data["name"] = name
    return parse_config(data, source="job.toml")


@pytest_asyncio.fixture
async def shards():
    servers = [ShardServer(i, 2) for i in range(2)]
    for server in servers:
        await server.start("127.0.0.1:0")
    yield servers
    for server in servers:
        await server.stop(0)


async def run(config, servers, **options):
    return await train_async(config, progress=False, outputs=False, servers=[s.address for s in servers], **options)


@pytest.mark.unit
def test_the_identity_names_what_makes_a_job_and_what_differs():
    base = job_identity(job(), {"dense0/w": ("float32", (64, 32))})
    assert base["name"] == "job" and len(base["fingerprint"]) == 16
    assert job_identity(job(steps=60), {"dense0/w": ("float32", (64, 32))}) == base, "more steps: the same job"
    other = job_identity(job(lr=0.01, name="digits-mlp"), {"dense0/w": ("float32", (64, 16))})
    assert differences(base, other) == [
        "name: (none) -> digits-mlp",
        "parameter dense0/w: float32[64, 32] -> float32[64, 16]",
        "optimizer.learning_rate: 0.1 -> 0.01",
    ]


@pytest.mark.asyncio
@pytest.mark.usefixtures("short_twin_watch")
async def test_shards_that_finished_a_job_refuse_a_rerun_without_resume(shards):
    first = await run(job(), shards)
    assert first.steps == 6
    described = await Cluster([s.address for s in shards]).describe()
    held = json.loads(described[0].job)
    assert held["name"] == "job" and held["optimizer"]["learning_rate"] == 0.1
    with pytest.raises(PsfwError) as err:
        await run(job(), shards)
    message = str(err.value)
    assert "the shards hold this job (job) with group 0 at step 6 (finished, 6 steps)" in message
    assert "pass --resume to continue it, or start the shards fresh" in message and "\n" not in message
    # more steps with --resume: an explicit continuation
    more = await run(job(steps=9), shards, resume=True)
    assert more.steps == 9 and all(s.store.group_step(0) == 9 for s in shards)


@pytest.mark.asyncio
@pytest.mark.usefixtures("short_twin_watch")
async def test_a_rerun_from_another_file_is_refused_naming_the_job_the_shards_hold(shards):
    """The same settings in another file are the same job: the line names the job as
    the shards hold it, and the file it came from now."""
    await run(job(), shards)
    with pytest.raises(PsfwError) as err:
        await run(job().model_copy(update={"source": "elsewhere/copy.toml"}), shards)
    assert str(err.value).startswith(
        "the shards hold this job (job, the settings of copy) with group 0 at step 6 (finished, 6 steps): "
    )


@pytest.mark.asyncio
@pytest.mark.usefixtures("short_twin_watch")
@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"lr": 0.01}, "optimizer.learning_rate: 0.1 -> 0.01"),
        ({"hidden": 16}, "parameter dense0/b: float32[32] -> float32[16]"),
        ({"seed": 4}, "seed: 3 -> 4"),
    ],
)
async def test_shards_that_hold_another_job_are_refused_naming_what_differs(shards, change, said):
    await run(job(), shards)
    digests = [await s.store.state_digest() for s in shards]
    with pytest.raises(PsfwError) as err:
        await run(job(**change), shards, resume=True)  # not even --resume joins another job
    message = str(err.value)
    assert message.startswith("shard 0 holds job job (step 6, adam lr 0.1); this job differs: ")
    assert said in message and message.endswith("start the shards fresh, or run the config they hold")
    assert [await s.store.state_digest() for s in shards] == digests


@pytest.mark.unit
@pytest.mark.asyncio
async def test_a_put_of_another_job_is_refused_and_checkpoints_keep_the_job(tmp_path):
    server = ShardServer(0, 1, checkpoint_dir=tmp_path)
    await server.start("127.0.0.1:0")
    client = ShardClient(server.address, 0, timeout_s=10, retries=0)
    ours = json.dumps({"name": "a", "fingerprint": "aaaa"})
    try:
        await client.put([("w", 0, np.zeros(4, np.float32))], '{"name": "sgd", "learning_rate": 0.1}', ours)
        with pytest.raises(ShardError) as err:
            await client.put([("w", 0, np.zeros(4, np.float32))], "", json.dumps({"name": "b", "fingerprint": "bb"}))
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "holds the parameters of job a (aaaa), the request is of another job (bb)" in str(err.value)
        with pytest.raises(ShardError, match="not a psfw job identity"):
            await client.put([("w", 0, np.zeros(4, np.float32))], "", "{nope")
        expect = lambda key: (np.dtype("float32"), (4,))  # noqa: E731
        with pytest.raises(ShardError, match=r"holds the parameters of job a \(aaaa\), the request is of another"):
            await client.get(GetHeader(0, 0, [("w", 0)], wait_s=1, job="bb"), expect)
        with pytest.raises(ShardError, match="the request is of another job") as err:
            header = UpdateHeader(
                group=0, step=0, process=0, workers=1, rows=1, workers_per_group=1, job="bb", wait_s=1
            )
            await client.update(header, {("w", 0): np.ones(4, np.float32)}, expect)
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and server.store.group_step(0) == 0
        assert (await client.get(GetHeader(0, 0, [("w", 0)], wait_s=1, job="aaaa"), expect)).step == 0
    finally:
        await client.close()
        await server.stop(0)  # a final checkpoint
    again = ShardServer(0, 1, checkpoint_dir=tmp_path)
    await again.start("127.0.0.1:0")
    try:
        assert again.store.job == ours
    finally:
        await again.stop(0)


@pytest.mark.asyncio
async def test_status_shows_the_job(shards):
    await run(job(name="digits-mlp"), shards)
    async with Cluster([s.address for s in shards]) as cluster:
        text = format_status(await cluster.status(0))
    fingerprint = json.loads(shards[0].store.job)["fingerprint"]
    assert f"digits-mlp#{fingerprint}" in text


@pytest.mark.slow
def test_hand_started_workers_rerun_against_finished_shards_are_refused(tmp_path):
    """The issue's case: shards started by hand, a job run, the same command again."""
    config = tmp_path / "job.toml"
    config.write_text(
        "seed = 3\n[model]\nhidden = [16]\n[train]\nbatch_size = 32\nsteps = 4\nwait_s = 30\n"
        "[cluster]\nservers = 1\nworkers_per_group = 1\nworkers_per_process = 1\n"
    )
    ready = tmp_path / "ready.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(
        [*PSFW, "server", "--listen", "127.0.0.1:0", "--ready-file", str(ready)], stdout=subprocess.DEVNULL, env=env
    ) as shard:
        try:
            for _ in range(600):
                if ready.exists() or shard.poll() is not None:
                    break
                time.sleep(0.05)
            address = json.loads(ready.read_text())["address"]
            worker = [*PSFW, "worker", str(config), "--servers", address]
            first = subprocess.run([*worker, "--run-dir", str(tmp_path / "one")], capture_output=True, text=True)
            again = subprocess.run([*worker, "--run-dir", str(tmp_path / "two")], capture_output=True, text=True)
            resumed = subprocess.run([*worker, "--resume"], capture_output=True, text=True, cwd=tmp_path)
        finally:
            shard.terminate()
            shard.wait(30)
    assert first.returncode == 0, first.stderr
    assert again.returncode == 1 and "test accuracy" not in again.stdout
    assert "with group 0 at step 4 (finished, 4 steps): pass --resume" in again.stderr, again.stderr
    assert resumed.returncode == 0 and "nothing left to train" in resumed.stderr, resumed.stderr
