"""metrics.jsonl says what happened in every mode: the group's loss over all its
processes (added up by the shards), and every group's records."""

import json
import subprocess
import sys

import pytest

from psfw.jobs.config import load_config
from psfw.jobs.embedded import train_async
from psfw.jobs.outputs import read_records

PSFW = [sys.executable, "-m", "psfw.cli"]


def write_config(path, groups: int, eval_every: int = 0):
    path.write_text(
        f"""
seed = 4
[model]
hidden = [32]
[train]
batch_size = 40
steps = 12
log_every = 4
eval_every = {eval_every}
wait_s = 60
[optimizer]
name = "sgd"
learning_rate = 0.2
[cluster]
worker_groups = {groups}
workers_per_group = 2
workers_per_process = 1
servers = 2
"""
    )
    return path


def launch(config_path, run_dir) -> None:
    done = subprocess.run(
        [*PSFW, "launch", str(config_path), "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.asyncio
async def test_launch_records_the_groups_loss_as_the_embedded_run_does(tmp_path):
    """One group of two worker processes: each process holds half the batch, the
    record holds the whole group's loss; process 0 evaluates the test split while
    it trains, on the parameters the embedded run evaluated."""
    config_path = write_config(tmp_path / "job.toml", groups=1, eval_every=5)
    await train_async(load_config(config_path), tmp_path / "embedded", progress=False)
    launch(config_path, tmp_path / "launched")
    embedded = read_records(tmp_path / "embedded" / "metrics.jsonl")
    launched = read_records(tmp_path / "launched" / "metrics.jsonl")
    steps = [(r["step"], r.get("eval", False)) for r in embedded]
    assert sorted(steps) == [(0, True), (4, False), (5, True), (8, False), (10, True), (12, False)]
    by_step = {(r["step"], r.get("eval", False)): r for r in embedded}
    assert sorted(by_step) == sorted((r["step"], r.get("eval", False)) for r in launched)
    for ours in launched:
        theirs = by_step[ours["step"], ours.get("eval", False)]
        assert set(ours) - {"samples_per_s", "compute_s", "comm_s", "wait_s", "wall_s"} == set(theirs) - {
            "samples_per_s",
            "compute_s",
            "comm_s",
            "wait_s",
            "wall_s",
        }
        for key in ("loss", "test_loss"):
            if key in ours:
                assert ours[key] == pytest.approx(theirs[key], rel=1e-5)
        for key in ("accuracy", "test_accuracy"):
            if key in ours:
                assert ours[key] == pytest.approx(theirs[key], abs=1e-6)


@pytest.mark.slow
def test_launch_records_every_group(tmp_path):
    config_path = write_config(tmp_path / "job.toml", groups=2)
    launch(config_path, tmp_path / "run")
    records = read_records(tmp_path / "run" / "metrics.jsonl")
    for group in (0, 1):
        assert [r["step"] for r in records if r["group"] == group] == [4, 8, 12], records
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert sum(1 for line in lines if json.loads(line).get("final")) == 1


@pytest.mark.unit
def test_a_group_restarted_alone_keeps_the_runs_final_record_and_group_0_drops_it(tmp_path):
    """A resume drops the history a group abandons; the final record is group 0's
    (its first process writes it): another group's process restarted with --resume
    after the run ended must not take it away."""
    from psfw.jobs.outputs import MetricsLog

    path = tmp_path / "metrics.jsonl"
    lines = [
        {"step": 10, "group": 0, "loss": 1.0},
        {"step": 10, "group": 1, "loss": 1.0},
        {"step": 20, "group": 1, "loss": 1.0},
        {"final": True, "step": 20, "test_loss": 0.5},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    MetricsLog(path, resume=True, groups=2).begin(1, 10)
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert kept == [lines[0], lines[1], lines[3]]
    MetricsLog(path, resume=True, groups=2).begin(0, 10)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [lines[0], lines[1]]
