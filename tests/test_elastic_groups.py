"""Groups that come and go in a running job, with real processes: two asynchronous
groups, one killed mid-run, the other finishing, a third joining; bounded staleness
with a group frozen (SIGSTOP), the others going on after the group timeout; a worker
process started again by psfw launch. Every such job is paced
(``tests/models/paced_mlp.py``), so that a kill or a join falls mid-run however fast
or busy the machine is; every wait is bounded. And, in this OS process, a group of
two processes joining a running job."""

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from psfw.jobs.children import read_ready
from psfw.jobs.config import parse_config
from psfw.jobs.embedded import train_async
from psfw.services.server import ShardServer

from helpers import REPO

PSFW = [sys.executable, "-m", "psfw.cli"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
PACED = REPO / "tests" / "models" / "paced_mlp.py"


def paced_job(path: Path, *, steps: int, **cluster) -> Path:
    """An MLP on the digits, each step at least 20 ms, one worker per group on 2 shards."""
    settings = "\n".join(f"{key} = {json.dumps(value)}" for key, value in cluster.items())
    path.write_text(
        f"""
seed = 2
[model]
name = "custom"
path = "{PACED}"
options = {{ step_s = 0.02 }}
[train]
batch_size = 50
steps = {steps}
log_every = 1
wait_s = 30
[optimizer]
name = "adam"
learning_rate = 0.01
[cluster]
workers_per_group = 1
workers_per_process = 1
servers = 2
slice_bytes = 4096
{settings}
"""
    )
    return path


class Logged:
    """A psfw process whose output goes to a file, read back as text."""

    def __init__(self, log: Path, *args: str):
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen([*PSFW, *args], stdout=out, stderr=subprocess.STDOUT, env=ENV)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a frozen one takes its SIGKILL as well, but may hold a TERM
            self.proc.kill()
        self.proc.wait(30)


def until(ready, what: str, timeout_s: float = 120) -> None:
    """Wait (at most ``timeout_s``) until ``ready()``."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s:.0f} s"
        time.sleep(0.1)


@contextmanager
def cluster(tmp_path: Path, config: Path):
    """Two ``psfw server`` shards; yields a function that starts a ``psfw worker``
    (its flags) and the shards, all stopped afterwards."""
    with ExitStack() as stack:
        started: list[Logged] = []
        stack.callback(lambda: [p.stop() for p in started])
        shards = []
        for i in range(2):
            ready = tmp_path / f"shard-{i}.json"
            args = ["server", "--shard", str(i), "--of", "2", "--listen", "127.0.0.1:0", "--ready-file", str(ready)]
            shards.append(Logged(tmp_path / f"shard-{i}.log", *args, "--grace", "0"))
            started.append(shards[-1])
        until(lambda: all(read_ready(tmp_path / f"shard-{i}.json") for i in range(2)), "the shards' start")
        addresses = ",".join(read_ready(tmp_path / f"shard-{i}.json")["address"] for i in range(2))

        def worker(name: str, *flags: str) -> Logged:
            started.append(Logged(tmp_path / f"{name}.log", "worker", str(config), "--servers", addresses, *flags))
            return started[-1]

        yield worker, shards


def at_step(proc: Logged, group: int, step: int) -> bool:
    """Whether ``proc``'s log has reached ``step`` of ``group``."""
    return any(
        line.startswith(f"group {group} step ") and int(line.split()[3]) >= step for line in proc.text().splitlines()
    )


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_a_killed_async_group_leaves_the_other_finishes_and_a_new_group_joins(tmp_path):
    """Groups 0 and 1 train asynchronously; group 1 is killed (SIGKILL) at step 30:
    each shard says it left once the group timeout is over, and group 0 trains on.
    Then group 2, which the job did not start with, joins where the job stands: each
    shard says so, it trains to the end, and its records are in the run's metrics
    beside group 0's. Group 0's final accuracy is that of a run where nothing left."""
    config = paced_job(tmp_path / "job.toml", steps=700, worker_groups=2, group_timeout_s=3, max_groups=3)
    run = tmp_path / "run"
    with cluster(tmp_path, config) as (worker, shards):
        chief = worker("group-0", "--process", "0", "--run-dir", str(run))
        other = worker("group-1", "--process", "1", "--run-dir", str(run))
        until(lambda: at_step(other, 1, 30), "group 1's step 30")
        other.proc.send_signal(signal.SIGKILL)
        until(lambda: all("group 1 left" in s.text() for s in shards), "the shards' line that group 1 left")
        assert chief.proc.poll() is None, "group 0 finished before group 1 was counted out: pace it slower"
        joiner = worker("group-2", "--group", "2", "--run-dir", str(run))
        assert joiner.proc.wait(120) == 0, joiner.text()[-3000:]
        assert chief.proc.wait(120) == 0, chief.text()[-3000:]
        logs = [s.text() for s in shards]
    joined = int(joiner.text().split("group 2 joins the job at step ")[1].split()[0])
    for log in logs:
        assert "group 1 left: no Update for" in log and "groups active: [0]" in log
        assert f"group 2 joined at step {joined}; groups active: [0, 2]" in log
        assert "Traceback" not in log
    steps = {g: [r["step"] for r in records(run) if r.get("group") == g and "loss" in r] for g in (0, 1, 2)}
    assert steps[0][-1] == 700 and 30 <= steps[1][-1] < 700
    assert steps[2] == list(range(joined + 1, 701)), "group 2 trains from where it joined to the end"
    final = next(r for r in records(run) if r.get("final"))
    assert final["test_accuracy"] >= 0.9, final


@pytest.mark.slow
def test_with_bounded_staleness_a_frozen_group_holds_the_others_only_until_the_group_timeout(tmp_path):
    """Staleness 2: group 1 is frozen (SIGSTOP) at step 30. Group 0 may not run more
    than 2 steps ahead of it, so it waits, but only until group 1 has sent no Update
    for the group timeout (3 s): each shard says group 1 left, and group 0 trains to
    the end instead of waiting for ever (or failing after train.wait_s)."""
    config = paced_job(tmp_path / "job.toml", steps=300, worker_groups=2, staleness=2, group_timeout_s=3)
    run = tmp_path / "run"
    with cluster(tmp_path, config) as (worker, shards):
        chief = worker("group-0", "--process", "0", "--run-dir", str(run))
        other = worker("group-1", "--process", "1", "--run-dir", str(run))
        until(lambda: at_step(other, 1, 30), "group 1's step 30")
        other.proc.send_signal(signal.SIGSTOP)
        assert chief.proc.wait(120) == 0, chief.text()[-3000:]
        logs = [s.text() for s in shards]
    for log in logs:
        assert "group 1 left: no Update for" in log and "it no longer bounds the staleness" in log
    mine = [r for r in records(run) if r.get("group") == 0 and "loss" in r]
    theirs = [r["step"] for r in records(run) if r.get("group") == 1 and "loss" in r]
    assert mine[-1]["step"] == 300 and theirs[-1] < 300 - 2
    stopped = theirs[-1]
    assert max(r["lead"] for r in mine if r["step"] <= stopped) <= 2, "the bound held while group 1 trained"
    held = [r["wall_s"] for r in mine if stopped < r["step"] <= stopped + 4]  # the step past the bound
    assert max(held) >= 2.0, "it waited for group 1 until the timeout (a busy machine only adds to it)"


@pytest.mark.slow
def test_launch_starts_a_killed_worker_process_again_and_it_rejoins_its_group(tmp_path):
    """``cluster.restart``: the worker process of group 1, killed (SIGKILL) at step 30,
    is started again with --resume; it rejoins its group where the shards hold it,
    and the job ends as usual."""
    config = paced_job(tmp_path / "job.toml", steps=200, worker_groups=2, restart=True)
    run = tmp_path / "run"
    launch = Logged(tmp_path / "launch.log", "launch", str(config), "--run-dir", str(run))
    try:
        until(lambda: "[worker 1] group 1 step 30 " in launch.text(), "group 1's step 30")
        victim = next(pid for pid, cmd in _children(launch.proc.pid) if "--process 1 " in cmd)
        os.kill(victim, signal.SIGKILL)
        assert launch.proc.wait(120) == 0, launch.text()[-3000:]
    finally:
        launch.stop()
    out = launch.text()
    assert "psfw launch: worker 1 was killed by SIGKILL; starting it again (1 of 3): it rejoins its group" in out
    assert "psfw launch: every worker process finished" in out
    steps = [r["step"] for r in records(run) if r.get("group") == 1 and "loss" in r]
    # the step under way when it was killed may be applied by the shards with its record never
    # written (the process died in between): the one after step 30, and no other, may lack one
    missing = set(range(1, 201)) - set(steps)
    assert steps[-1] == 200 and missing <= {31}, f"group 1 went on from where it was (no record of {missing})"
    assert next(r for r in records(run) if r.get("final"))["test_accuracy"] >= 0.9


def _children(pid: int) -> list[tuple[int, str]]:
    """The processes ``pid`` started, with their command lines."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            found.append((int(entry), cmdline))
    return found


@pytest.mark.asyncio
async def test_the_processes_of_a_joining_group_start_at_one_step_from_the_current_values(caplog):
    """A group of two worker processes joins a running job of one group (in this OS
    process, against shards of its own): its first process decides where the job
    stands, the other starts there too, and the new group bounds group 0 as any
    group does."""

    def config():
        return parse_config(
            {
                "seed": 1,
                "model": {"name": "mlp", "hidden": [32]},
                "train": {"batch_size": 32, "steps": 300, "log_every": 1, "wait_s": 60},
                "optimizer": {"name": "adam", "learning_rate": 0.003},
                "cluster": {"workers_per_group": 2, "workers_per_process": 1, "staleness": 2, "max_groups": 2},
            }
        )

    servers = [ShardServer(i, 2) for i in range(2)]
    for server in servers:
        await server.start("127.0.0.1:0")
    addresses = [s.address for s in servers]
    try:
        with caplog.at_level(logging.WARNING):
            first = asyncio.create_task(
                train_async(config(), progress=False, outputs=False, servers=addresses, processes=[0, 1])
            )
            deadline = time.monotonic() + 120
            while servers[0].store.group_step(0) < 50:
                assert time.monotonic() < deadline and not first.done(), "group 0 did not reach step 50"
                await asyncio.sleep(0.02)
            joining = train_async(config(), progress=False, outputs=False, servers=addresses, processes=[2, 3])
            joined, done = await asyncio.wait_for(asyncio.gather(joining, first), 120)
    finally:
        for server in servers:
            await server.stop(0)
    starts = {r.getMessage() for r in caplog.records if "joins the job at step" in r.getMessage()}
    assert len(starts) == 2 and len({line.split()[-1] for line in starts}) == 1, starts
    at = int(next(iter(starts)).split()[-1])
    assert at >= 50
    assert [r["step"] for r in joined.records if r["group"] == 1] == list(range(at + 1, 301))
    assert max(r["lead"] for r in done.records) <= 2 and done.test_accuracy >= 0.9
