"""Checkpoints: what a shard's holds comes back, a half-written one is never loaded,
a graceful stop saves a final one, a restore abandons the ones after it, embedded
shards complete theirs side by side, and a resume needs one."""

import json
import logging
import threading

import numpy as np
import pytest

from psfw.base.atomic import write_atomic
from psfw.jobs.config import load_config
from psfw.jobs.embedded import train_async
from psfw.runtime.shard_client import ShardClient
from psfw.services import checkpoint
from psfw.services.server import ShardServer

from helpers import SGD, contribute, psfw_command, recovery_job, send


@pytest.mark.unit
@pytest.mark.asyncio
async def test_checkpoints_hold_values_optimizer_state_versions_and_dedup_state(tmp_path):
    folder = tmp_path / "ckpt"
    adam = json.dumps({"name": "adam", "learning_rate": 0.1})
    servers = [ShardServer(i, 2, checkpoint_dir=folder) for i in range(2)]
    for s in servers:
        await s.start("127.0.0.1:0")
    clients = [ShardClient(s.address, i, timeout_s=10, retries=0) for i, s in enumerate(servers)]
    try:
        for c in clients:
            await c.put([("w", 0, np.zeros(4, np.float32))], adam)
        for step in range(4):
            for c in clients:
                await send(c, {0: np.full(4, step + 1.0, np.float32)}, step=step, checkpoint_every=2)
        for s in servers:
            await s.store.flush_checkpoints()
        assert checkpoint.complete_steps(folder, 2) == [2, 4]
        digests = [s.store.digest() for s in servers]
    finally:
        for c in clients:
            await c.close()
        for s in servers:
            await s.stop(0)
    restarted = ShardServer(1, 2, checkpoint_dir=folder)
    await restarted.start("127.0.0.1:0")
    try:
        assert restarted.restored_step == 4 and restarted.store.epoch == 1
        assert restarted.store.digest() == digests[1], "values, versions, steps and optimizer state come back"
        assert restarted.store.groups[0].last == [0]
    finally:
        await restarted.stop(0)


@pytest.mark.unit
def test_a_half_written_checkpoint_is_never_loaded(tmp_path):
    tensors = {"value/0": np.ones(3, np.float32)}
    meta = {"shard": 0, "shards": 2}
    assert not checkpoint.save_shard(tmp_path, 5, 0, 2, tensors, meta), "one shard of two: incomplete"
    assert checkpoint.complete_steps(tmp_path, 2) == []
    assert checkpoint.save_shard(tmp_path, 5, 1, 2, tensors, {**meta, "shard": 1})
    assert checkpoint.complete_steps(tmp_path, 2) == [5]
    checkpoint.save_shard(tmp_path, 10, 0, 2, tensors, meta)
    checkpoint.save_shard(tmp_path, 10, 1, 2, tensors, {**meta, "shard": 1})
    shard_file = checkpoint.shard_file(tmp_path, 10, 1)
    shard_file.write_bytes(shard_file.read_bytes()[:20])  # torn write of a file the manifest names
    assert checkpoint.complete_steps(tmp_path, 2) == [5]
    (checkpoint.step_dir(tmp_path, 5) / ".shard-0.safetensors.tmp-1").write_bytes(b"partial")
    assert checkpoint.complete_steps(tmp_path, 2) == [5]
    assert [p.name for p in tmp_path.rglob("*.pkl")] == []


@pytest.mark.unit
@pytest.mark.asyncio
async def test_a_graceful_stop_saves_a_final_checkpoint(tmp_path):
    server = ShardServer(0, 1, checkpoint_dir=tmp_path)
    await server.start("127.0.0.1:0")
    client = ShardClient(server.address, 0, timeout_s=10, retries=0)
    await client.put([("w", 0, np.zeros(4, np.float32))], SGD)
    await contribute(client)
    await client.close()
    await server.stop(1.0)
    assert checkpoint.complete_steps(tmp_path, 1) == [1]


@pytest.mark.unit
@pytest.mark.asyncio
async def test_a_restore_abandons_the_checkpoints_after_it(tmp_path):
    server = ShardServer(0, 1, checkpoint_dir=tmp_path)
    await server.start("127.0.0.1:0")
    client = ShardClient(server.address, 0, timeout_s=10, retries=0)
    try:
        await client.put([("w", 0, np.zeros(4, np.float32))], SGD)
        for step in range(4):
            await send(client, {0: np.ones(4, np.float32)}, step=step, checkpoint_every=2)
        await server.store.flush_checkpoints()
        (checkpoint.step_dir(tmp_path, 6)).mkdir()  # a half-written later set
        checkpoint.save_shard(tmp_path, 6, 0, 2, {"value/0": np.ones(1, np.float32)}, {})
        await client.restore(2, epoch=1)
        assert checkpoint.complete_steps(tmp_path, 1) == [2]
        assert not checkpoint.step_dir(tmp_path, 6).exists() and server.store.saved_step == 2
        assert server.store.group_step(0) == 2 and server.store.epoch == 1
    finally:
        await client.close()
        await server.stop(0)


@pytest.mark.unit
def test_a_set_re_cut_for_another_count_lies_beside_the_shards_own_and_counts_once_whole(tmp_path):
    """A re-cut set (psfw.jobs.reshard) is a checkpoint of its own count in the same
    step folder: its files first, its manifest last; the shards of each count find
    their own files; a file it names that goes missing makes it incomplete."""
    tensors = {"value/0": np.ones(3, np.float32)}
    for shard in range(2):
        checkpoint.save_shard(tmp_path, 40, shard, 2, tensors, {"shard": shard, "shards": 2})
    recut = [({"value/0": np.full(2, float(s), np.float32)}, {"shard": s, "shards": 3}) for s in range(3)]
    checkpoint.save_resharded(tmp_path, 40, recut, resharded_from=2)
    assert checkpoint.complete_steps(tmp_path, 2) == checkpoint.complete_steps(tmp_path, 3) == [40]
    assert checkpoint.complete_steps(tmp_path) == [40] and checkpoint.complete_counts(tmp_path, 40) == [2, 3]
    assert checkpoint.saved_file(tmp_path, 40, 1, 2).name == "shard-1.safetensors"
    assert checkpoint.saved_file(tmp_path, 40, 1, 3).name == "shard-1-of-3.safetensors"
    values, meta = checkpoint.load_shard(tmp_path, 40, 2, 3)
    assert meta == {"shard": 2, "shards": 3} and values["value/0"].tolist() == [2.0, 2.0]
    assert [s.resharded_from for s in checkpoint.checkpoint_sets(tmp_path)] == [0, 2]
    checkpoint.resharded_file(tmp_path, 40, 2, 3).unlink()
    assert checkpoint.complete_steps(tmp_path, 3) == [] and checkpoint.complete_steps(tmp_path, 2) == [40]
    assert checkpoint.checkpoint_sets(tmp_path)[1].missing() == ["shard-2-of-3.safetensors"]


@pytest.mark.unit
def test_two_threads_writing_the_same_file_atomically_both_succeed(tmp_path):
    """In-process shards complete a checkpoint's manifest from two threads at once:
    each write has a temporary file of its own, and the file is always whole."""
    path = tmp_path / "MANIFEST.json"
    start = threading.Barrier(2)
    errors = []

    def write(payload: bytes) -> None:
        try:
            start.wait(timeout=10)
            for _ in range(200):
                write_atomic(path, payload)
        except Exception as err:  # noqa: BLE001 - collected for the assertion
            errors.append(err)

    threads = [threading.Thread(target=write, args=(bytes([i]) * 4096,)) for i in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors[0]
    assert path.read_bytes() in (b"\x01" * 4096, b"\x02" * 4096)
    assert not [p.name for p in tmp_path.iterdir() if p.name != "MANIFEST.json"], "no temporary file is left"


@pytest.mark.asyncio
async def test_embedded_shards_complete_their_checkpoints_without_errors(tmp_path, caplog):
    """Two in-process shards write each checkpoint side by side: every one completes,
    the old ones are pruned, and nothing is logged as failed."""
    cfg = load_config(recovery_job(tmp_path / "job.toml", steps=12, workers=2, per_process=2, every=3))
    with caplog.at_level(logging.ERROR, logger="psfw.server"):
        await train_async(cfg, tmp_path / "run", progress=False)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert checkpoint.complete_steps(tmp_path / "run" / "checkpoints", 2) == [6, 9, 12]


def test_resume_without_checkpoints_and_reuse_without_resume_are_refused(tmp_path, capsys):
    config = recovery_job(tmp_path / "job.toml", steps=3, every=1)
    run_dir = tmp_path / "run"
    done = psfw_command(capsys, "train", config, "--run-dir", run_dir, "--resume", "--no-progress")
    assert done.returncode == 2 and "holds no complete checkpoint" in done.stderr
    done = psfw_command(capsys, "train", config, "--run-dir", run_dir, "--no-progress")
    assert done.returncode == 0, done.stderr
    done = psfw_command(capsys, "train", config, "--run-dir", run_dir, "--no-progress")
    assert done.returncode == 2 and "pass --resume" in done.stderr
