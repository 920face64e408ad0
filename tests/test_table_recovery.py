"""Embedding tables survive what dense parameters survive: a run killed at a random
step and resumed, and a shard process killed and restarted from its checkpoint
(the shard processes share memory with the worker: tensors in shared memory),
end with the rows and parameters of plain dense training."""

import random
import signal

import numpy as np
import pytest
from test_tables import MODEL, click_data, dense_reference

import psfw
from psfw.jobs.config import load_config

from helpers import free_ports, kill_and_resume, start_shard, start_worker, stop_all


def job_file(folder, steps: int, every: int = 7):
    data = click_data(folder)
    path = folder / "tables.toml"
    path.write_text(
        f"""
seed = 4
[model]
name = "custom"
path = "{MODEL}"
[data]
path = "{data}"
[train]
batch_size = 48
steps = {steps}
log_every = 1
checkpoint_every = {every}
wait_s = 60
retries = 3
[optimizer]
name = "adagrad"
learning_rate = 0.1
[tables.optimizer]
name = "adagrad"
learning_rate = 0.1
[cluster]
workers_per_group = 2
workers_per_process = 1
servers = 2
"""
    )
    return path


def assert_same_training(config_path, run_dir, steps: int) -> None:
    params, tables = dense_reference(load_config(config_path), steps)
    got = psfw.load_params(run_dir)
    np.testing.assert_allclose(got["out"]["w"], params["out"]["w"], rtol=5e-5, atol=5e-6)
    for name, table in tables.items():
        ids, rows = psfw.load_table(run_dir, name)
        np.testing.assert_allclose(rows, table[ids], rtol=5e-5, atol=5e-6, err_msg=name)


@pytest.mark.slow
def test_a_table_run_killed_at_a_random_step_resumes_to_the_same_rows(tmp_path):
    steps = 120
    config_path = job_file(tmp_path, steps)
    run_dir = tmp_path / "run"
    kill_and_resume(config_path, run_dir, random.Random().randint(15, 80))
    assert_same_training(config_path, run_dir, steps)


@pytest.mark.slow
def test_a_killed_table_shard_restarts_from_its_checkpoint_and_the_job_ends_the_same(tmp_path):
    steps = 120
    config_path = job_file(tmp_path, steps, every=5)
    ports = free_ports(2)
    addresses = [f"127.0.0.1:{p}" for p in ports]
    run_dir = tmp_path / "run"
    folder = run_dir / "checkpoints"  # where psfw.load_table reads the run's tables
    shards = [start_shard(i, ports[i], folder, grace=5) for i in range(2)]
    procs = list(shards)
    try:
        workers = [start_worker(config_path, p, addresses, run_dir if p == 0 else tmp_path / "w1") for p in (0, 1)]
        procs += workers
        kill_at = random.Random().randint(15, 80)
        seen = []
        for line in workers[0].stdout:  # as wait_for_step, keeping the lines
            seen.append(line)
            if line.startswith(f"group 0 step {kill_at} "):
                break
        shards[1].send_signal(signal.SIGKILL)
        shards[1].wait(30)
        procs.append(start_shard(1, ports[1], folder, grace=5))
        outs = [w.stdout.read() for w in workers]
        outs[0] = "".join(seen) + outs[0]
        for worker, out in zip(workers, outs, strict=True):
            assert worker.wait(300) == 0, out[-3000:]
        assert "link (unix, shared memory)" in outs[0], outs[0][:2000]
        assert "re-synced" in outs[0] or "restored" in outs[0], outs[0][-3000:]
    finally:
        stop_all(procs)  # a graceful stop: the shards save their final rows
    assert_same_training(config_path, run_dir, steps)
