"""The ``psfw`` command as a user runs it: real processes, real files."""

import json
import os
import re
import signal
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from helpers import EXAMPLES

PSFW = [sys.executable, "-m", "psfw.cli"]


def run(*args, timeout=300):
    return subprocess.run([*PSFW, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_train_on_the_shipped_example_reaches_the_accuracy_bar(tmp_path):
    out = tmp_path / "run"
    done = run("train", str(EXAMPLES / "digits_mlp.toml"), "--run-dir", str(out), "--no-progress")
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = records[-1]
    assert final["final"] is True and final["test_accuracy"] >= 0.95
    steps = [r for r in records if not r.get("final")]
    for key in ("step", "loss", "accuracy", "samples_per_s", "compute_s", "comm_s", "wait_s"):
        assert all(key in r for r in steps), key
    assert steps[-1]["loss"] < steps[0]["loss"]
    for name in ("net.json", "partition.json", "net.png", "curves.png", "params.safetensors"):
        assert (out / name).stat().st_size > 0, name
    net = json.loads((out / "net.json").read_text())
    assert {"nodes", "links"} <= set(net)
    assert {n["kind"] for n in net["nodes"]} == {"layer", "param", "shard"}
    partition = json.loads((out / "partition.json").read_text())
    assert {p["owner_worker"] for p in partition["params"]} == {0, 1}
    assert (out / "net.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_train_writes_parameters_that_reload_safely(tmp_path):
    from psfw.outputs import read_params

    out = tmp_path / "run"
    config = tmp_path / "short.toml"
    text = (EXAMPLES / "my_model.toml").read_text().replace("epochs = 12", "steps = 5")
    config.write_text(text.replace('path = "my_model.py"', f'path = "{EXAMPLES / "my_model.py"}"'))
    done = run("train", str(config), "--run-dir", str(out), "--no-progress")
    assert done.returncode == 0, done.stderr
    params = read_params(out / "params.safetensors")
    assert set(params) == {"hidden/w", "hidden/b", "out/w", "out/b"}
    assert params["hidden/w"].shape == (64, 64)


def test_bad_config_fails_fast_with_one_line(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[cluster]\nservers = 'two'\n")
    done = run("train", str(config), "--no-progress", timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "cluster.servers" in lines[0] and "valid integer" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_server_process_serves_health_and_stops_on_sigterm():
    with subprocess.Popen(
        [*PSFW, "server", "--shard", "1", "--of", "2", "--listen", "127.0.0.1:0", "--grace", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as proc:
        _check_health_then_stop(proc)


def _check_health_then_stop(proc):
    try:
        line = proc.stdout.readline()
        address = re.search(r"listening on (\S+)", line).group(1)
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service="psfw.v1.ParameterServer"), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        probe = run("health", address, timeout=60)
        assert probe.returncode == 0 and "SERVING" in probe.stdout
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        probe = run("health", address, "--timeout", "1", timeout=60)
        assert probe.returncode == 1 and "UNAVAILABLE" in probe.stdout
    finally:
        if proc.poll() is None:
            proc.kill()


def test_processes_sharing_a_log_never_cut_each_others_lines(tmp_path):
    """Shards of one host write to one terminal or log: every line arrives whole."""
    code = (
        "import sys\n"
        "from psfw.console import say\n"
        "for _ in range(2000):\n"
        "    say(f'psfw shard {sys.argv[1]}: stopping, in-flight RPCs get 0.0 s')\n"
    )
    log = tmp_path / "shared.log"
    with open(log, "w") as out:
        procs = [subprocess.Popen([sys.executable, "-c", code, str(k)], stderr=out) for k in range(2)]
        for proc in procs:
            assert proc.wait(timeout=60) == 0
    lines = log.read_text().splitlines()
    assert len(lines) == 4000
    assert all(re.fullmatch(r"psfw shard [01]: stopping, in-flight RPCs get 0\.0 s", line) for line in lines)
