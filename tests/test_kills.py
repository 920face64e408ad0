"""Processes killed (SIGKILL) at a random step and started again: a whole ``psfw
train``, one of two shard processes, one of two worker processes. The job ends with
the parameters of a run that was never killed."""

import random
import signal

import pytest

from psfw.jobs.config import load_config

from helpers import (
    assert_params_close,
    free_ports,
    kill_and_resume,
    read_params,
    recovery_job,
    reference,
    start_shard,
    start_worker,
    stop_all,
    wait_for_step,
)


@pytest.mark.slow
def test_embedded_run_killed_at_a_random_step_resumes_to_the_same_parameters(tmp_path):
    steps = 300
    config_path = recovery_job(tmp_path / "job.toml", steps=steps)
    run_dir = tmp_path / "run"
    kill_and_resume(config_path, run_dir, random.Random().randint(20, 150))
    expected = reference(load_config(config_path), steps)
    assert_params_close(read_params(run_dir / "params.safetensors"), expected)


@pytest.mark.slow
def test_a_killed_shard_restarts_from_its_checkpoint_and_the_job_resyncs(tmp_path):
    steps = 200
    config_path = recovery_job(tmp_path / "job.toml", steps=steps)
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
    config_path = recovery_job(tmp_path / "job.toml", steps=steps, workers=2, per_process=1)
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
