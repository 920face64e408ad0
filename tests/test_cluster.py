"""Clusters of real OS processes: psfw launch, worker groups, staleness, health."""

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from psfw.compute.batching import BatchOrder
from psfw.jobs.config import load_config, parse_config
from psfw.jobs.embedded import train_async
from psfw.services.server import SERVICE_NAME, ShardServer
from psfw.tools.cluster import Cluster, format_status

from helpers import EXAMPLES, assert_params_close, psfw_command, read_params, reference

PSFW = [sys.executable, "-m", "psfw.cli"]


def write_config(path, *, steps, workers=4, per_process=2, batch=50, servers=2, optimizer="sgd"):
    path.write_text(
        f"""
seed = 5
[model]
name = "mlp"
hidden = [32]
[train]
batch_size = {batch}
steps = {steps}
log_every = 1
wait_s = 60
[optimizer]
name = "{optimizer}"
learning_rate = 0.2
[cluster]
workers_per_group = {workers}
workers_per_process = {per_process}
servers = {servers}
slice_bytes = 4096
"""
    )
    return path


@pytest.mark.slow
def test_one_group_over_two_processes_equals_single_process_training(tmp_path):
    """2 worker processes x 2 workers (12 + 12 + 12 + 14 rows), 2 shard processes."""
    config_path = write_config(tmp_path / "job.toml", steps=6)
    done = subprocess.run(
        [*PSFW, "launch", str(config_path), "--run-dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[worker 1]" in done.stdout and "[shard 1]" in done.stdout
    assert "shards 0-1 link (unix, shared memory)" in done.stdout, "same host: tensors in shared memory"
    expected = reference(load_config(config_path), 6)
    assert_params_close(read_params(tmp_path / "run" / "params.safetensors"), expected)


def _children(pid: int) -> list[tuple[int, str]]:
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


@contextlib.contextmanager
def _launch_training(tmp_path, own_session: bool = False):
    """``psfw launch`` of a long job, once worker 1 trains; its output is read up to there."""
    config_path = write_config(tmp_path / "job.toml", steps=100_000, batch=40)
    with subprocess.Popen(
        [*PSFW, "launch", str(config_path), "--run-dir", str(tmp_path / "run")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=own_session,
    ) as launch:
        deadline = time.monotonic() + 120
        for line in launch.stdout:
            if line.startswith("[worker 1] group 0 step"):
                break
            assert time.monotonic() < deadline, "training did not start"
        yield launch


@pytest.mark.slow
def test_launch_stops_everything_and_names_the_worker_that_was_killed(tmp_path):
    with _launch_training(tmp_path) as launch:
        children = _children(launch.pid)
        victim = next(pid for pid, cmd in children if " worker " in cmd and "--process 1" in cmd)
        os.kill(victim, signal.SIGKILL)
        rest = launch.stdout.read()
        assert launch.wait(60) == 1
    assert "worker 1 was killed by SIGKILL; stopping the others" in rest
    for pid, _ in children:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def groups_config(staleness, steps=120):
    cluster = {"worker_groups": 2, "workers_per_group": 2, "workers_per_process": 1, "servers": 2}
    if staleness is not None:
        cluster["staleness"] = staleness
    return parse_config(
        {
            "seed": 1,
            "model": {"name": "mlp", "hidden": [64]},
            "train": {"batch_size": 32, "steps": steps, "log_every": 1},
            "optimizer": {"name": "adam", "learning_rate": 0.003},
            "cluster": cluster,
        }
    )


@pytest.mark.asyncio
@pytest.mark.parametrize("staleness", [None, 0, 1])
async def test_two_groups_converge_and_the_staleness_bound_holds_at_every_step(staleness):
    result = await train_async(groups_config(staleness), progress=False, outputs=False)
    assert result.test_accuracy >= 0.9
    leads = {}
    for record in result.records:
        leads.setdefault(record["group"], []).append(record["lead"])
    assert set(leads) == {0, 1} and all(len(v) == 120 for v in leads.values())
    if staleness is not None:
        worst = max(max(v) for v in leads.values())
        assert worst <= staleness, f"a group ran {worst} steps ahead of the slowest"


@pytest.mark.unit
def test_each_group_gets_its_own_data_order():
    a, b = BatchOrder(100, 10, seed=0, group=0), BatchOrder(100, 10, seed=0, group=1)
    assert not np.array_equal(a.indices(0), b.indices(0))
    assert sorted(np.concatenate([b.indices(s) for s in range(10)])) == list(range(100))


@pytest.mark.asyncio
async def test_health_is_not_serving_until_ready_and_from_the_start_of_shutdown():
    server = ShardServer(0, 1)
    await server.start("127.0.0.1:0", ready=False)
    channel = grpc.aio.insecure_channel(server.address)
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        for service in ("", SERVICE_NAME):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=30)
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        await server.mark_ready()
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.create_task(server.stop(grace=1.0, drain=1.0))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING, "probes see the drain"
        await stopping
    finally:
        await channel.close()


@pytest.mark.asyncio
async def test_status_metrics_and_reading_a_parameter_from_a_client_script(tmp_path):
    config_file = tmp_path / "job.toml"
    config_file.write_text(
        "seed = 1\n[model]\nhidden = [64]\n[train]\nbatch_size = 32\nsteps = 20\n"
        "[cluster]\nworkers_per_group = 2\nworkers_per_process = 1\nservers = 2\ntransport = 'grpc'\n"
    )
    config = load_config(config_file)
    servers = [ShardServer(i, 2) for i in range(2)]
    for server in servers:
        await server.start("127.0.0.1:0", metrics_port=0)
    addresses = [s.address for s in servers]
    try:
        result = await train_async(config, progress=False, outputs=False, servers=addresses)
        async with Cluster(addresses, config) as cluster:
            rows = await cluster.status(interval_s=0)
            assert [r["groups"] for r in rows] == [{0: 20}, {0: 20}]
            assert sum(r["bytes"] for r in rows) == sum(v.nbytes for v in result.params.values())
            assert all(r["versions"] == (20, 20) for r in rows)
            np.testing.assert_array_equal(await cluster.read("dense0/w"), result.params["dense0/w"])
            assert "g0@20" in format_status(rows)
        cli = await asyncio.create_subprocess_exec(
            *PSFW, "status", ",".join(addresses), "--interval", "0", stdout=asyncio.subprocess.PIPE
        )
        out, _ = await cli.communicate()
        assert cli.returncode == 0 and out.decode().count("g0@20") == 2
        # no interval, no rate: shown as "-", never a measured-looking 0.0
        assert all(line.split()[6] == "-" for line in out.decode().splitlines()[1:]), out.decode()
        example = await asyncio.create_subprocess_exec(
            sys.executable,
            str(EXAMPLES / "watch_cluster.py"),
            str(config_file),
            ",".join(addresses),
            "dense0/w",
            "--every",
            "0.2",
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await asyncio.wait_for(example.communicate(), 120)
        assert example.returncode == 0 and "dense0/w: shape (64, 64)" in out.decode()
        url = f"http://127.0.0.1:{servers[0].metrics_port}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
        assert re.search(r'psfw_updates_applied_total\{shard="0"\} 20\.0', text)
        assert re.search(r'psfw_group_step\{group="0",shard="0"\} 20\.0', text)
        assert 'psfw_rpc_seconds_count{method="Update",shard="0"} 40.0' in text
        assert re.search(r'psfw_bytes_received_total\{shard="0"\} [1-9]', text)
    finally:
        for server in servers:
            await server.stop(0)


@pytest.mark.unit
def test_server_refuses_an_open_address_from_the_environment_in_one_line(monkeypatch, capsys):
    """PSFW_LISTEN=0.0.0.0:0 without TLS or --insecure: refused as the flag would be."""
    monkeypatch.setenv("PSFW_LISTEN", "0.0.0.0:0")
    monkeypatch.delenv("PSFW_INSECURE", raising=False)
    done = psfw_command(capsys, "server")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "refusing to listen on 0.0.0.0:0 without TLS" in done.stderr and "--insecure" in done.stderr


def test_server_takes_its_settings_from_the_environment():
    """``psfw server`` with no flags: shard, count and address from PSFW_* variables."""
    env = {**os.environ, "PSFW_SHARD": "1", "PSFW_SHARDS": "3", "PSFW_LISTEN": "127.0.0.1:0"}
    with subprocess.Popen([*PSFW, "server"], stdout=subprocess.PIPE, text=True, env=env) as proc:
        try:
            assert "psfw shard 1/3 listening on 127.0.0.1:" in proc.stdout.readline()
        finally:
            proc.terminate()
            assert proc.wait(30) == 0


@pytest.mark.asyncio
async def test_other_groups_start_from_group_0_after_its_warmup_steps():
    config = groups_config(None, steps=30)
    config = config.model_copy(update={"cluster": config.cluster.model_copy(update={"warmup_steps": 10})})
    result = await train_async(config, progress=False, outputs=False)
    group0 = [r for r in result.records if r["group"] == 0]
    assert max(r["lead"] for r in group0) >= 10, "group 1 waited for group 0's warmup"
    assert {r["group"] for r in result.records} == {0, 1}


def test_a_second_signal_stops_the_server_at_once():
    with subprocess.Popen(
        [*PSFW, "server", "--listen", "127.0.0.1:0", "--grace", "30", "--drain", "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert "listening on" in proc.stdout.readline()
        proc.send_signal(signal.SIGTERM)
        assert "stopping" in proc.stderr.readline()
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 1 and time.monotonic() - started < 10


@pytest.mark.slow
def test_ctrl_c_on_launch_stops_every_shard_gracefully_once(tmp_path):
    """A terminal's Ctrl-C goes to its whole foreground group: only launch may get it,
    or the shards take launch's SIGTERM as a second signal and skip their graceful stop."""
    with _launch_training(tmp_path, own_session=True) as launch:  # like a shell's foreground job
        os.killpg(launch.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        rest = launch.stdout.read()
        assert launch.wait(60) == 130
    assert "second signal" not in rest, rest[-3000:]
    assert rest.count("stopping, in-flight RPCs get") == 2, rest[-3000:]
    # the job kept no checkpoints: launch says so instead of a command that could not resume
    assert "psfw launch: interrupted, stopping every process\n" in rest, rest[-3000:]
    assert "psfw launch: every process stopped; no checkpoint was written (set train" in rest, rest[-3000:]


@pytest.mark.slow
def test_launch_into_a_run_folder_with_checkpoints_needs_resume(tmp_path):
    config_path = write_config(tmp_path / "job.toml", steps=6, workers=2, per_process=1)
    config_path.write_text(config_path.read_text().replace("wait_s = 60", "wait_s = 60\ncheckpoint_every = 3"))
    run = [*PSFW, "launch", str(config_path), "--run-dir", str(tmp_path / "run")]
    first = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    again = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "pass --resume" in again.stderr, again.stdout[-2000:] + again.stderr
    assert "[shard" not in again.stdout, "refused before anything started"
    resumed = subprocess.run([*run, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "restored step 6" in resumed.stdout


@pytest.mark.asyncio
async def test_launch_passes_on_a_line_longer_than_asyncios_line_limit(capsys):
    """A child's 200 KB line (a long error, a big status) must not end its log pump:
    the child would then block on a full pipe."""
    from psfw.jobs.children import Tail
    from psfw.jobs.supervisor import Child, _pump

    code = "import sys; sys.stdout.write('x' * 200_000 + '\\nshort\\nlast')"
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE)
    await asyncio.wait_for(_pump(Child("t", proc, Tail("t", echo=True, stream=sys.stdout))), 30)
    assert await proc.wait() == 0
    lines = capsys.readouterr().out.splitlines()
    assert [len(line) for line in lines] == [4 + 200_000, 9, 8]


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGHUP])
def test_no_process_outlives_launch(tmp_path, how):
    """Killed outright, or its terminal closed: the shards and workers go with it."""
    with _launch_training(tmp_path, own_session=True) as launch:
        children = [pid for pid, _ in _children(launch.pid)]
        assert len(children) == 4
        launch.send_signal(how)
        launch.wait(60)

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 60
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in children if alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"still running after launch ended: {left}"
