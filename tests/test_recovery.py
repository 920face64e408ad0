"""Nothing lost, nothing doubled: retries, checkpoints, and runs that are killed
(SIGKILL) at a random step and resumed end with the parameters of a run that was
never killed."""

import asyncio
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from psfw.base.atomic import write_atomic
from psfw.base.errors import ShardError
from psfw.jobs.config import load_config, parse_config
from psfw.jobs.embedded import train_async
from psfw.jobs.outputs import read_params
from psfw.protocol.messages import UpdateHeader
from psfw.runtime.grpc_transport import ShardClient
from psfw.services import checkpoint
from psfw.services.server import ShardServer

from helpers import SGD, assert_params_close, psfw_command, reference, send

PSFW = [sys.executable, "-m", "psfw.cli"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def job_file(path, *, steps, workers=3, per_process=3, every=7, wait_s=60):
    path.write_text(
        f"""
seed = 2
[model]
hidden = [32]
[train]
batch_size = 50
steps = {steps}
log_every = 1
checkpoint_every = {every}
wait_s = {wait_s}
retries = 3
[optimizer]
name = "adam"
learning_rate = 0.01
[cluster]
workers_per_group = {workers}
workers_per_process = {per_process}
servers = 2
slice_bytes = 4096
"""
    )
    return path


def wait_for_step(proc, step: int, prefix: str = "", timeout_s: float = 180) -> None:
    """Read the process's log until it reports ``step``."""
    deadline = time.monotonic() + timeout_s
    pattern = f"{prefix}group 0 step {step} "
    for line in proc.stdout:
        if line.startswith(pattern):
            return
        assert time.monotonic() < deadline, f"no step {step} within {timeout_s} s"
    raise AssertionError(f"the process ended before step {step}")


@pytest.mark.slow
def test_embedded_run_killed_at_a_random_step_resumes_to_the_same_parameters(tmp_path):
    steps = 300
    config_path = job_file(tmp_path / "job.toml", steps=steps)
    run_dir = tmp_path / "run"
    kill_and_resume(config_path, run_dir, random.Random().randint(20, 150))
    expected = reference(load_config(config_path), steps)
    assert_params_close(read_params(run_dir / "params.safetensors"), expected)


def kill_and_resume(config_path, run_dir, kill_at: int) -> None:
    """``psfw train`` killed (SIGKILL) once it reports ``kill_at``, then resumed to the end."""
    with subprocess.Popen(
        [*PSFW, "train", str(config_path), "--run-dir", str(run_dir), "--no-progress"],
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    ) as proc:
        wait_for_step(proc, kill_at)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert not (run_dir / "params.safetensors").exists(), f"the run finished before the kill at step {kill_at}"
    saved = checkpoint.complete_steps(run_dir / "checkpoints", 2)
    assert saved and saved[-1] >= 7, saved
    done = subprocess.run(
        [*PSFW, "train", str(config_path), "--run-dir", str(run_dir), "--no-progress", "--resume"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_shard(index: int, port: int, folder, grace: float = 0) -> subprocess.Popen:
    """``psfw server`` shard ``index`` of 2; ``grace``: seconds its stop gives in-flight RPCs."""
    proc = subprocess.Popen(
        [*PSFW, "server", "--shard", str(index), "--of", "2", "--listen", f"127.0.0.1:{port}", "--grace", str(grace)]
        + ["--checkpoint-dir", str(folder)],
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    assert "listening on" in proc.stdout.readline()
    return proc


def start_worker(config_path, process: int, addresses: list[str], run_dir, resume=False) -> subprocess.Popen:
    """A ``psfw worker``; ``resume``: a restarted process, which continues the job."""
    return subprocess.Popen(
        [*PSFW, "worker", str(config_path), "--process", str(process), "--servers", ",".join(addresses)]
        + ["--run-dir", str(run_dir)]
        + (["--resume"] if resume else []),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
    )


def stop_all(procs) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


@pytest.mark.slow
def test_a_killed_shard_restarts_from_its_checkpoint_and_the_job_resyncs(tmp_path):
    steps = 200
    config_path = job_file(tmp_path / "job.toml", steps=steps)
    ports = free_ports(2)
    addresses = [f"127.0.0.1:{p}" for p in ports]
    folder = tmp_path / "checkpoints"
    shards = [start_shard(i, ports[i], folder) for i in range(2)]
    procs = list(shards)
    try:
        worker = start_worker(config_path, 0, addresses, tmp_path / "run")
        procs.append(worker)
        kill_at = random.Random().randint(20, 120)
        wait_for_step(worker, kill_at)
        shards[1].send_signal(signal.SIGKILL)
        shards[1].wait(30)
        procs.append(start_shard(1, ports[1], folder))
        out = worker.stdout.read()
        assert worker.wait(300) == 0, out[-3000:]
        assert "re-synced" in out or "restored" in out, out[-3000:]
    finally:
        stop_all(procs)
    expected = reference(load_config(config_path), steps)
    assert_params_close(read_params(tmp_path / "run" / "params.safetensors"), expected)


@pytest.mark.slow
def test_a_killed_worker_process_rejoins_and_the_job_ends_as_if_never_killed(tmp_path):
    steps = 200
    config_path = job_file(tmp_path / "job.toml", steps=steps, workers=2, per_process=1)
    ports = free_ports(2)
    addresses = [f"127.0.0.1:{p}" for p in ports]
    procs = [start_shard(i, ports[i], tmp_path / "checkpoints") for i in range(2)]
    try:
        chief = start_worker(config_path, 0, addresses, tmp_path / "run")
        other = start_worker(config_path, 1, addresses, tmp_path / "other")
        procs += [chief, other]
        kill_at = random.Random().randint(20, 120)
        wait_for_step(other, kill_at)
        other.send_signal(signal.SIGKILL)
        other.wait(30)
        again = start_worker(config_path, 1, addresses, tmp_path / "other", resume=True)
        procs.append(again)
        assert again.wait(300) == 0, again.stdout.read()[-3000:]
        out = chief.stdout.read()
        assert chief.wait(300) == 0, out[-3000:]
    finally:
        stop_all(procs)
    expected = reference(load_config(config_path), steps)
    assert_params_close(read_params(tmp_path / "run" / "params.safetensors"), expected)


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


async def _update(client, process=0, wpg=1, grad=1.0, epoch=0):
    values = {0: np.full(4, grad, np.float32)}
    return await send(client, values, process=process, workers_per_group=wpg, group_processes=wpg, epoch=epoch)


@pytest.mark.asyncio
async def test_a_retried_update_gets_the_same_answer_and_is_added_once(shard):
    server, client = shard
    await client.put([("w", 0, np.zeros(4, np.float32))], SGD)
    first = await _update(client)
    again = await _update(client)
    assert first.step == again.step == 1
    np.testing.assert_array_equal(first.values[("w", 0)], again.values[("w", 0)])
    assert server.store.versions[("w", 0)] == 1 and server.store.updates_applied == 1


@pytest.mark.asyncio
async def test_a_duplicate_contribution_to_a_pending_step_is_not_added(shard):
    server, client = shard
    await client.put([("w", 0, np.zeros(4, np.float32))], SGD)
    waiting = [asyncio.create_task(_update(client, 0, 2, 1.0)) for _ in range(2)]
    await asyncio.sleep(0.2)
    assert server.store.groups[0].round.workers == 1, "the same process counted once"
    other = await _update(client, 1, 2, 3.0)
    answers = [await t for t in waiting] + [other]
    for answer in answers:
        np.testing.assert_allclose(answer.values[("w", 0)], -0.1 * (1.0 + 3.0) / 2)
    assert server.store.versions[("w", 0)] == 1


@pytest.mark.asyncio
async def test_an_update_from_another_epoch_asks_for_a_resync(shard):
    server, client = shard
    await client.put([("w", 0, np.zeros(4, np.float32))], SGD)
    with pytest.raises(ShardError) as err:
        await _update(client, epoch=3)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "re-sync" in str(err.value)


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


@pytest.mark.asyncio
async def test_a_graceful_stop_saves_a_final_checkpoint(tmp_path):
    server = ShardServer(0, 1, checkpoint_dir=tmp_path)
    await server.start("127.0.0.1:0")
    client = ShardClient(server.address, 0, timeout_s=10, retries=0)
    await client.put([("w", 0, np.zeros(4, np.float32))], SGD)
    await _update(client)
    await client.close()
    await server.stop(1.0)
    assert checkpoint.complete_steps(tmp_path, 1) == [1]


def test_resume_without_checkpoints_and_reuse_without_resume_are_refused(tmp_path, capsys):
    config = job_file(tmp_path / "job.toml", steps=3, every=1)
    run_dir = tmp_path / "run"
    done = psfw_command(capsys, "train", config, "--run-dir", run_dir, "--resume", "--no-progress")
    assert done.returncode == 2 and "holds no complete checkpoint" in done.stderr
    done = psfw_command(capsys, "train", config, "--run-dir", run_dir, "--no-progress")
    assert done.returncode == 0, done.stderr
    done = psfw_command(capsys, "train", config, "--run-dir", run_dir, "--no-progress")
    assert done.returncode == 2 and "pass --resume" in done.stderr


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
    cfg = load_config(job_file(tmp_path / "job.toml", steps=12, workers=2, per_process=2, every=3))
    with caplog.at_level(logging.ERROR, logger="psfw.server"):
        await train_async(cfg, tmp_path / "run", progress=False)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert checkpoint.complete_steps(tmp_path / "run" / "checkpoints", 2) == [6, 9, 12]


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
            old = servers[0]
            await asyncio.gather(
                old._server.stop(0), old.local.stop(0), old.data.stop(0)
            )  # a crash: no final checkpoint
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


@pytest.mark.asyncio
async def test_another_group_waits_for_group_0s_warmup_while_it_advances(shard):
    """wait_s bounds a wait without progress, not group 0's whole warmup; a group 0
    that stops advancing is named."""
    from psfw.base.errors import WaitTimeout
    from psfw.protocol.layout import plan_layout
    from psfw.runtime.param_cache import ParamCache
    from psfw.runtime.sync import ShardSync

    server, client = shard
    await client.put([("w", 0, np.zeros(4, np.float32))], SGD)
    sync = ShardSync(
        [client], plan_layout({"w": ((4,), "float32")}, 1, 1, 1 << 20), ParamCache(1, 1),
        group=1, process=1, wait_s=0.5, identity=None, resume=False, warmup_steps=8,
    )  # fmt: skip

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
    from psfw.runtime.param_cache import ParamCache

    cache = ParamCache(1, 1)
    outcome = []
    waiter = threading.Thread(target=lambda: outcome.append(cache.start(0.3)))
    waiter.start()
    for done in range(10):  # 1 s of notes, 0.1 s apart: more than three times the limit
        time.sleep(0.1)
        cache.doing(f"waiting for group 0's warmup (at {done})")
    cache.publish(4, {})
    waiter.join(5)
    assert outcome == [(4, 0)]
    cache.doing("waiting for group 0's warmup (at 10)")
    started = time.monotonic()
    with pytest.raises(WaitTimeout, match=r"the stub has been waiting for group 0's warmup \(at 10\)"):
        cache.fresh(5, 0, 0.3)
    assert time.monotonic() - started < 2


@pytest.mark.asyncio
async def test_a_shard_whose_puts_are_on_their_way_is_not_taken_for_one_that_lost_its_state():
    """A process that joins while the owner's Puts have reached one shard but not yet
    the other waits for them; once a step was made, an empty shard did lose its state."""
    from psfw.base.errors import PsfwError
    from psfw.protocol.layout import plan_layout
    from psfw.runtime.inprocess import InProcessClient
    from psfw.runtime.param_cache import ParamCache
    from psfw.runtime.sync import ShardSync

    servers = [ShardServer(i, 2) for i in range(2)]
    for server in servers:
        await server.start("127.0.0.1:0")
    try:
        clients = [InProcessClient(s, i) for i, s in enumerate(servers)]
        layout = plan_layout({"a": ((4,), "float32"), "b": ((4,), "float32")}, 2, 1, 1 << 20)
        sync = ShardSync(
            clients, layout, ParamCache(0, 1), group=0, process=1, wait_s=5, identity=None, resume=False, warmup_steps=0
        )
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
