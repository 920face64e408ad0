"""``psfw ray`` on a real multi-node Ray cluster started on this machine
(``ray.cluster_utils.Cluster``: a head and nodes of their own resources, every
socket on 127.0.0.1): placement on different nodes, a shard's process killed, a node
removed, and the refusals of a job the cluster cannot place. The tests set Ray's
auth mode themselves (Ray 2.60 turns token authentication on from a file in the home
folder) and end the nodes they started by their process ids, never ``ray stop``
(which ends every Ray process on the machine)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from psfw.jobs.config import load_config

from certs import make_pki
from helpers import assert_params_close, read_params, recovery_job, reference

# read once, when Ray is imported: its nodes (and their actors) then take 127.0.0.1 as
# their address instead of the machine's own
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray", reason='the Ray tier needs Ray: pip install -e ".[test]"')

NODES = 4
# every Ray process of the test (nodes, the psfw ray driver) on loopback, without
# token authentication, with the workers' lines uncoloured and each one shown
RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_COLOR_PREFIX": "0",
    "RAY_DEDUP_LOGS": "0",
    "PYTHONUNBUFFERED": "1",
}
STEP_LINE = re.compile(r"group 0 step (\d+) ")
SHARD_LINE = re.compile(r"psfw ray: shard (\d+) on node \S+ \((\w+)\) at \S+, pid (\d+)")


@contextlib.contextmanager
def starting_nodes():
    """Ray starts a node's processes with a fork: JAX, imported by other tests of this
    process, warns of a fork at all (the child execs Ray's own programs at once)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "os.fork", RuntimeWarning)
        yield


@pytest.fixture(scope="module")
def cluster():
    """A head without CPUs, ``NODES`` nodes of one CPU each and a spare one (for a
    job that loses a node), shared by the module (a cluster takes seconds to start)."""
    from ray.cluster_utils import Cluster

    saved = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)
    with starting_nodes():
        c = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 0, "object_store_memory": 10**8, "include_dashboard": False},
        )
    try:
        with starting_nodes():
            for i in range(NODES):
                c.add_node(num_cpus=1, object_store_memory=10**8, resources={f"psfw_host{i}": 1})
            c.add_node(num_cpus=1, object_store_memory=10**8, resources={"psfw_spare": 1})
            c.wait_for_nodes()
        yield c
    finally:
        with starting_nodes():
            c.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def psfw_ray(config: Path, address: str, run_dir: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "psfw.cli", "ray", str(config), "--address", address, "--run-dir", str(run_dir), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **RAY_ENV},
    )


def read_until(proc: subprocess.Popen, found, timeout_s: float = 240) -> list[str]:
    """The lines ``proc`` printed until ``found(line)`` held for one (bounded)."""
    deadline = time.monotonic() + timeout_s
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if found(line):
            return lines
        assert time.monotonic() < deadline, "".join(lines[-30:])
    raise AssertionError("psfw ray ended first:\n" + "".join(lines[-30:]))


def until_step(proc: subprocess.Popen, step: int) -> list[str]:
    """The lines ``proc`` printed until a worker reported ``step`` (bounded)."""
    return read_until(proc, lambda line: (m := STEP_LINE.search(line)) is not None and int(m.group(1)) >= step)


def finish(proc: subprocess.Popen, before: list[str], timeout_s: float = 300) -> str:
    try:
        rest, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        rest, _ = proc.communicate()
        raise AssertionError("psfw ray did not finish:\n" + "".join(before)[-3000:] + rest[-3000:]) from None
    out = "".join(before) + rest
    assert proc.returncode == 0, out[-4000:]
    return out


def spread_job(path: Path, steps: int) -> Path:
    """The recovery tests' job (2 shards, a checkpoint every 7 steps) in 2 worker
    processes, each shard and worker process on a node of its own."""
    recovery_job(path, steps=steps, workers=2, per_process=1)
    path.write_text(path.read_text().replace("[cluster]", '[cluster]\nplacement = "strict_spread"'))
    return path


@pytest.mark.slow
@pytest.mark.ray
def test_a_job_on_four_nodes_trains_as_the_single_process_reference(cluster, tmp_path):
    steps = 400  # long enough that psfw status finds it running on a fast machine
    config = spread_job(tmp_path / "job.toml", steps)
    proc = psfw_ray(config, cluster.address, tmp_path / "run")
    lines = until_step(proc, 10)
    status = subprocess.run(
        [sys.executable, "-m", "psfw.cli", "status", "--ray", cluster.address, "--interval", "0"],
        capture_output=True,
        text=True,
        env={**os.environ, **RAY_ENV},
        timeout=120,
    )
    out = finish(proc, lines)
    assert status.returncode == 0, status.stdout + status.stderr
    assert re.search(r"job job-\w+ \(Ray\): 2 shards", status.stdout), status.stdout
    addresses = set(re.findall(r"at (127\.0\.0\.1:\d+), pid", out))
    assert len(addresses) == 2 and all(a in status.stdout for a in addresses), status.stdout
    nodes = {m.group(2) for m in SHARD_LINE.finditer(out)}
    workers = set(re.findall(r"psfw ray: worker process \d on node \S+ \((\w+)\)", out))
    assert len(nodes) == 2 and len(workers) == 2 and not nodes & workers, out[-3000:]
    assert "test accuracy" in out and "psfw ray: every worker process finished" in out
    expected = reference(load_config(config), steps)
    assert_params_close(read_params(tmp_path / "run" / "params.safetensors"), expected)


@pytest.mark.slow
@pytest.mark.ray
def test_shards_with_tls_and_a_token_take_only_the_jobs_workers(cluster, tmp_path):
    pki = make_pki(tmp_path)
    cert, key = pki["server"]
    steps = 1500
    config = spread_job(tmp_path / "job.toml", steps)
    config.write_text(
        config.read_text()
        + f'[ray]\ntls_cert = "{cert}"\ntls_key = "{key}"\ntls_ca = "{pki["ca"]}"\ntoken_file = "{pki["token"]}"\n'
    )
    proc = psfw_ray(config, cluster.address, tmp_path / "run")
    lines = until_step(proc, 10)

    def status(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "psfw.cli", "status", "--ray", cluster.address, "--interval", "0", *flags],
            capture_output=True,
            text=True,
            env={**os.environ, **RAY_ENV},
            timeout=120,
        )

    member, stranger = status("--tls-ca", str(pki["ca"]), "--token-file", str(pki["token"])), status()
    out = finish(proc, lines)
    assert "link (unix, TLS, shared memory)" in out, out[-3000:]
    assert stranger.returncode == 1 and "probably serves TLS" in stranger.stderr, stranger.stdout + stranger.stderr
    assert member.returncode == 0, member.stdout + member.stderr
    expected = reference(load_config(config), steps)
    assert_params_close(read_params(tmp_path / "run" / "params.safetensors"), expected)


@pytest.mark.slow
@pytest.mark.ray
def test_a_shard_process_killed_is_restarted_by_ray_restored_and_the_job_ends_as_if_never_killed(cluster, tmp_path):
    steps = 300  # long enough that the kill comes mid-run on a fast machine
    config = spread_job(tmp_path / "job.toml", steps)
    proc = psfw_ray(config, cluster.address, tmp_path / "run")
    lines = until_step(proc, 30)
    pids = {int(m.group(1)): int(m.group(3)) for m in SHARD_LINE.finditer("".join(lines))}
    os.kill(pids[1], signal.SIGKILL)
    out = finish(proc, lines)
    assert re.search(r"psfw ray: shard 1 restarted on node .* restored step \d+", out), out[-4000:]
    assert "moved" in out, out[-4000:]  # the workers found it at its new address
    expected = reference(load_config(config), steps)
    assert_params_close(read_params(tmp_path / "run" / "params.safetensors"), expected)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize(
    "flags, said",
    [
        (["--set", "ray.worker.num_gpus=1"], "needs 2 GPUs in all, the cluster has 0 GPUs"),
        (
            ["--set", "cluster.workers_per_group=4", "--set", "ray.worker.num_cpus=0.5"],
            "strict_spread puts each of the 6 shards and worker processes on a node of its own, and the cluster has "
            f"{NODES + 1} nodes that can hold one",
        ),
        (["--set", "ray.shard.num_cpus=1.5"], "a shard needs 1.5 CPUs on one node, and no node has that much"),
    ],
)
def test_a_job_the_cluster_cannot_place_is_refused_in_one_line_within_the_wait(cluster, tmp_path, flags, said):
    config = spread_job(tmp_path / "job.toml", 10)
    began = time.monotonic()
    proc = psfw_ray(config, cluster.address, tmp_path / "run", "--set", "ray.place_timeout_s=2", *flags)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert said in out and "Ray cannot place the job within 2 s" in out, out
    assert "Traceback" not in out
    assert time.monotonic() - began < 60


@pytest.mark.slow
@pytest.mark.ray
def test_a_relative_run_folder_on_several_nodes_is_refused(cluster, tmp_path):
    config = spread_job(tmp_path / "job.toml", 10)
    proc = subprocess.Popen(
        [sys.executable, "-m", "psfw.cli", "ray", str(config), "--address", cluster.address, "--run-dir", "rel"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **RAY_ENV},
        cwd=tmp_path,
    )
    out, _ = proc.communicate(timeout=120)
    assert (
        proc.returncode == 2
        and "--run-dir rel is relative" in out
        and f"has {len(cluster.list_all_nodes())} nodes" in out
    ), out
    assert not (tmp_path / "rel").exists()


@pytest.mark.slow
@pytest.mark.ray
def test_a_worker_process_killed_is_restarted_and_rejoins_its_group(cluster, tmp_path):
    steps = 300  # long enough that the kill comes mid-run on a fast machine
    config = spread_job(tmp_path / "job.toml", steps)
    proc = psfw_ray(config, cluster.address, tmp_path / "run")
    lines = until_step(proc, 30)
    pid = int(re.search(r"psfw ray: worker process 1 on node .*, pid (\d+)", "".join(lines)).group(1))
    os.kill(pid, signal.SIGKILL)
    out = finish(proc, lines)
    assert re.search(
        rf"psfw ray: worker process 1 died; Ray restarted it on node .*, pid (?!{pid}\b)\d+, and it rejoins", out
    ), out[-4000:]
    expected = reference(load_config(config), steps)
    assert_params_close(read_params(tmp_path / "run" / "params.safetensors"), expected)


@pytest.mark.slow
@pytest.mark.ray
def test_an_interrupted_job_stops_every_actor_and_resumes_to_the_reference(cluster, tmp_path):
    steps = 300  # long enough that the kill comes mid-run on a fast machine
    config = spread_job(tmp_path / "job.toml", steps)
    proc = psfw_ray(config, cluster.address, tmp_path / "run")
    until_step(proc, 30)
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, rest[-3000:]
    hint = re.search(
        r"psfw ray: interrupted; every actor stopped; the newest checkpoint is of step (\d+); "
        r"continue with: (.*--resume)",
        rest,
    )
    assert hint and int(hint.group(1)) >= 28, rest[-3000:]
    again = psfw_ray(config, cluster.address, tmp_path / "run", "--resume")
    out = finish(again, [])
    assert f"restored step {hint.group(1)}" in out, out[-3000:]
    expected = reference(load_config(config), steps)
    assert_params_close(read_params(tmp_path / "run" / "params.safetensors"), expected)


@pytest.mark.slow
@pytest.mark.ray
def test_async_groups_a_node_removed_with_a_groups_worker_process_the_job_goes_on(cluster, tmp_path):
    with starting_nodes():  # room for the group's actor to come back on
        cluster.add_node(num_cpus=1, object_store_memory=10**8, resources={"psfw_extra": 1})
        cluster.wait_for_nodes()
    config = spread_job(tmp_path / "job.toml", 300)
    config.write_text(config.read_text().replace("[cluster]", "[cluster]\nworker_groups = 2"))
    proc = psfw_ray(config, cluster.address, tmp_path / "run", "--set", "cluster.workers_per_group=1")
    lines = until_step(proc, 30)
    node = re.search(r"psfw ray: worker process 1 on node \S+ \((\w+)\)", "".join(lines)).group(1)
    with starting_nodes():
        cluster.remove_node(next(n for n in cluster.worker_nodes if n.node_id.startswith(node)))
    out = finish(proc, lines)  # the cluster keeps as many nodes as before: the extra one replaced the removed one
    assert re.search(r"psfw ray: worker process 1 died; Ray restarted it on node \S+ \((?!" + node + r")\w+\)", out), (
        out[-4000:]
    )
    accuracy = float(re.search(r"test accuracy (\d\.\d+)", out).group(1))
    assert accuracy > 0.9, out[-2000:]


@pytest.mark.slow
@pytest.mark.ray
def test_a_node_removed_its_shard_comes_back_on_another_node(cluster, tmp_path):
    steps = 300  # long enough that the kill comes mid-run on a fast machine
    config = spread_job(tmp_path / "job.toml", steps)
    proc = psfw_ray(config, cluster.address, tmp_path / "run")
    lines = until_step(proc, 30)
    nodes = {int(m.group(1)): m.group(2) for m in SHARD_LINE.finditer("".join(lines))}
    gone = next(n for n in cluster.worker_nodes if n.node_id.startswith(nodes[1]))
    with starting_nodes():
        cluster.remove_node(gone)  # the module's last test: the others had all nodes
    out = finish(proc, lines)
    again = re.search(r"psfw ray: shard 1 restarted on node \S+ \((\w+)\)", out)
    assert again and again.group(1) != nodes[1], out[-4000:]
    expected = reference(load_config(config), steps)
    assert_params_close(read_params(tmp_path / "run" / "params.safetensors"), expected)
