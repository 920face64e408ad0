"""The ``psfw`` command as a user runs it: real files; real processes where the
process itself is what is checked (a run, a signal, its exit), the command's
refusals in this process (``helpers.psfw_command``)."""

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from helpers import EXAMPLES, psfw_command

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
    from helpers import read_params

    out = tmp_path / "run"
    config = tmp_path / "short.toml"
    text = (EXAMPLES / "my_model.toml").read_text().replace("epochs = 12", "steps = 5")
    config.write_text(text.replace('path = "my_model.py"', f'path = "{EXAMPLES / "my_model.py"}"'))
    done = run("train", str(config), "--run-dir", str(out), "--no-progress")
    assert done.returncode == 0, done.stderr
    params = read_params(out / "params.safetensors")
    assert set(params) == {"hidden/w", "hidden/b", "out/w", "out/b"}
    assert params["hidden/w"].shape == (64, 64)


@pytest.mark.unit
def test_bad_config_fails_fast_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # where psfw would make runs/
    config = tmp_path / "bad.toml"
    config.write_text("[cluster]\nservers = 'two'\n")
    done = psfw_command(capsys, "train", config, "--no-progress")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"psfw: config error: {config}: cluster.servers: ") and "valid integer" in lines[0]
    assert not (tmp_path / "runs").exists()


TINY = """
[model]
hidden = []
[data]
name = "synthetic"
features = 2
classes = 2
train = 64
test = 16
[train]
batch_size = 8
steps = 3
"""


def tiny_config(tmp_path, extra: str = ""):
    """A job that trains in a moment: a linear model on 64 synthetic rows, 3 steps."""
    config = tmp_path / "tiny.toml"
    config.write_text(TINY + extra)
    return config


@pytest.mark.unit
def test_run_folder_mistakes_are_usage_errors_not_config_errors(tmp_path, monkeypatch, capsys):
    """A run folder or a flag that cannot work is one line under the command's name
    (exit 2), never called a config error, and leaves no files behind."""
    from psfw.services.checkpoint import save_shard

    monkeypatch.chdir(tmp_path)  # where psfw would make runs/
    config = tiny_config(tmp_path)
    used = tmp_path / "used"
    for shard in range(2):
        save_shard(used / "checkpoints", 4, shard, 2, {"w": np.zeros(2, np.float32)}, {})
    cases = [
        (["--run-dir", str(used)], f"{used} holds checkpoints (newest: step 4): pass --resume"),
        (["--run-dir", str(tmp_path / "new"), "--resume"], "--resume: "),
        (["--resume"], "--resume needs the --run-dir of the run to continue"),
    ]
    for flags, fragment in cases:
        done = psfw_command(capsys, "train", config, "--no-progress", *flags)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert done.stderr.startswith("psfw train: ") and fragment in done.stderr, done.stderr
    assert sorted(p.name for p in used.iterdir()) == ["checkpoints"]
    assert not (tmp_path / "new").exists() and not (tmp_path / "runs").exists()
    done = psfw_command(capsys, "worker", config, "--process", "5", "--servers", "127.0.0.1:1,127.0.0.1:2")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"psfw worker: process 5 does not exist: the cluster of {config} has processes 0..0")


@pytest.mark.slow
def test_without_a_terminal_train_writes_whole_log_lines_not_a_bar(tmp_path):
    """stdout to a pipe: the progress bar gives way to the plain step lines (whole,
    never a frame cut to 80 columns), then the result line."""
    done = run("train", str(tiny_config(tmp_path, "log_every = 1\n")), "--run-dir", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [re.match(r"group 0 step (\d) loss ", line).group(1) for line in lines[:-1]] == ["1", "2", "3"], lines
    assert lines[-1].startswith("test loss ") and "outputs in" in lines[-1]
    assert "\u2026" not in done.stdout and "\x1b" not in done.stdout


@pytest.mark.slow
def test_more_shards_than_slices_warn_once_and_the_transport_line_stays_short(tmp_path):
    """500 shards for a model of 2 slices: it trains, one warning names the idle
    shards, and how the stub reaches them is one short line."""
    config = tiny_config(tmp_path, "[cluster]\nservers = 500\n")
    done = run("train", str(config), "--run-dir", str(tmp_path / "run"), "--no-progress")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("psfw")]  # not JAX's own notes
    assert lines == [
        f"psfw: {config}: cluster.servers is 500 but the model has only 2 slices: shards 2-499 hold nothing and "
        "only slow every step down (lower cluster.servers, or cluster.slice_bytes to cut the parameters finer)",
        "psfw: process 0 of group 0: shards 0-499 in-process",
    ]


def test_server_process_serves_health_and_stops_on_sigterm():
    with subprocess.Popen(
        [*PSFW, "server", "--shard", "1", "--of", "2", "--listen", "127.0.0.1:0", "--grace", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as proc:
        _check_health_then_stop(proc)


def test_server_names_its_metrics_address_and_its_drain():
    with subprocess.Popen(
        [*PSFW, "server", "--listen", "127.0.0.1:0", "--metrics-port", "0", "--drain", "0.2", "--grace", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as proc:
        try:
            line = proc.stdout.readline()
            url = re.search(r"metrics on (http://127\.0\.0\.1:[0-9]+/metrics)$", line.strip()).group(1)
            with urllib.request.urlopen(url, timeout=10) as reply:
                assert b"psfw_updates_applied" in reply.read()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
            stopping = "psfw shard 0: stopping, NOT_SERVING for 0.2 s (--drain), then in-flight RPCs get 0.0 s"
            assert stopping in proc.stderr.read().splitlines()
        finally:
            if proc.poll() is None:
                proc.kill()


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
        "from psfw.base.console import say\n"
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


def short_custom_config(tmp_path, layers: str):
    """examples/my_model.toml for 3 steps, with the model file's ``layers`` replaced."""
    model = (EXAMPLES / "my_model.py").read_text()
    start, stop = model.index("layers = ["), model.index("]\n\n", model.index("layers = [")) + 2
    (tmp_path / "model.py").write_text(model[:start] + f"layers = {layers}\n" + model[stop:])
    config = tmp_path / "job.toml"
    text = (EXAMPLES / "my_model.toml").read_text().replace("epochs = 12", "steps = 3")
    config.write_text(text.replace('path = "my_model.py"', 'path = "model.py"'))
    return config


@pytest.mark.slow
def test_a_model_may_name_its_layers_by_name_alone(tmp_path):
    out = tmp_path / "run"
    config = short_custom_config(tmp_path, '["input", "hidden", "out", "loss"]')
    done = run("train", str(config), "--run-dir", str(out), "--no-progress", timeout=300)
    assert done.returncode == 0, done.stderr
    links = json.loads((out / "net.json").read_text())["links"]
    uses = {(link["source"], link["target"]) for link in links if link["kind"] == "uses"}
    assert uses == {(f"param:{layer}/{p}", f"layer:{layer}") for layer in ("hidden", "out") for p in "wb"}
    for name in ("partition.json", "net.png", "curves.png", "params.safetensors"):
        assert (out / name).stat().st_size > 0, name


@pytest.mark.unit
def test_bad_model_layers_fail_before_training_in_one_line(tmp_path, capsys):
    config = short_custom_config(tmp_path, '[{"name": "hidden", "params": ["hiden/w"]}]')
    done = psfw_command(capsys, "train", config, "--run-dir", tmp_path / "run", "--no-progress")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "model.path: model.py: layers[0] (hidden): no parameter named hiden/w" in done.stderr
    assert not (tmp_path / "run").exists()


def psfw_with_env(monkeypatch, capsys, env: dict, *args) -> subprocess.CompletedProcess:
    """``psfw ARGS`` in this process with the ``PSFW_*`` variables of ``env`` only."""
    for name in [k for k in os.environ if k.startswith("PSFW_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return psfw_command(capsys, *args)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("variable", "value", "argv"),
    [
        ("PSFW_SHARD", "x", ["server"]),
        ("PSFW_SHARDS", "0", ["server"]),
        ("PSFW_GRACE", "soon", ["server"]),
        ("PSFW_DRAIN", "-1", ["server"]),
        ("PSFW_METRICS_PORT", "70000", ["server"]),
        ("PSFW_NONFINITE", "ignore", ["server"]),
        ("PSFW_INSECURE", "maybe", ["server"]),
        ("PSFW_LISTEN", "127.0.0.1:99999", ["server"]),
        ("PSFW_PROCESS", "first", ["worker", "job.toml"]),
    ],
)
def test_a_bad_environment_value_is_one_line_naming_the_variable(variable, value, argv, monkeypatch, capsys):
    done = psfw_with_env(monkeypatch, capsys, {variable: value}, *argv)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"psfw {argv[0]}: {variable}={value!r}: ")


@pytest.mark.unit
def test_help_and_flags_do_not_read_a_bad_variable(monkeypatch, capsys):
    done = psfw_with_env(monkeypatch, capsys, {"PSFW_SHARD": "x", "PSFW_GRACE": "soon"}, "server", "--help")
    assert done.returncode == 0 and "usage:" in done.stdout
    from psfw.cli.flags import parser

    monkeypatch.delenv("PSFW_GRACE")  # a flag given does not read its variable; the others are read
    monkeypatch.setenv("PSFW_SHARD", "x")
    monkeypatch.setenv("PSFW_INSECURE", "true")
    monkeypatch.setenv("PSFW_METRICS_PORT", "")  # empty: unset
    args = parser().parse_args(["server", "--shard", "1", "--of", "2"])
    assert (args.shard, args.insecure, args.metrics_port) == (1, True, None)
    assert parser().parse_args(["train", "job.toml"]).config == "job.toml"  # another command's variable


@pytest.mark.unit
@pytest.mark.parametrize(
    ("listen", "fragment"),
    [
        ("127.0.0.1:99999", "port 99999 is outside 0-65535"),
        ("nonsense", "is not host:port"),
        ("0.0.0.0:", "is not host:port"),
        ("::1:50051", "write an IPv6 host in brackets"),
        ("[::g]:50051", "is not an IPv6 address"),
    ],
)
def test_server_refuses_an_address_it_cannot_listen_on_in_one_line(listen, fragment, monkeypatch, capsys):
    done = psfw_with_env(monkeypatch, capsys, {}, "server", "--listen", listen, "--insecure")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"psfw server: listen address {listen!r}") and fragment in done.stderr


@pytest.mark.parametrize("flag", ["--listen", "--metrics-port"])
def test_a_taken_port_is_one_line_not_a_traceback(flag):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["--listen", f"127.0.0.1:{port}"] if flag == "--listen" else ["--metrics-port", str(port)]
        done = subprocess.run(
            [*PSFW, "server", "--listen", "127.0.0.1:0", *args], capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr
    expected = (
        f"cannot listen on 127.0.0.1:{port}" if flag == "--listen" else f"cannot serve metrics on 127.0.0.1:{port}"
    )
    assert expected in done.stderr, done.stderr


@pytest.mark.unit
def test_command_line_mistakes_are_one_line_each(tmp_path, monkeypatch, capsys):
    """A folder for a config, an unwritable run folder, a shard address without a
    port: one line under the command's name, exit 2, no traceback."""
    monkeypatch.chdir(tmp_path)  # where psfw would make runs/
    config = tiny_config(tmp_path)
    cases = [
        (["train", str(tmp_path)], "psfw: config error: ", "is a folder: give a TOML config file"),
        (["train", str(config), "--run-dir", "/proc/psfw-run"], "psfw train: ", "cannot write the run folder"),
        (["status", "localhost"], "psfw status: ", "shard address 'localhost' is not host:port"),
        (["health", "localhost"], "psfw health: ", "shard address 'localhost' is not host:port"),
        (["worker", str(config), "--servers", "127.0.0.1:5,localhost"], "psfw worker: ", "'localhost' is not host"),
    ]
    for args, prefix, fragment in cases:
        done = psfw_command(capsys, *args)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, (args, done.stderr)
        assert done.stderr.startswith(prefix) and fragment in done.stderr, (args, done.stderr)


@pytest.mark.unit
def test_help_shows_defaults_and_their_variables(capsys):
    server = psfw_command(capsys, "server", "--help").stdout
    assert "this shard's index (default: 0, or $PSFW_SHARD)" in " ".join(server.split())
    assert "server certificate (PEM): turns on TLS (or $PSFW_TLS_CERT)" in " ".join(server.split())
    bench = " ".join(psfw_command(capsys, "bench", "--help").stdout.split())
    assert (
        "measured steps per variant (default: 60; with --hosts: 12)" in bench and "(default: ==SUPPRESS==)" not in bench
    )
