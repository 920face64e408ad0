"""psfw's child processes start from any folder, with psfw installed as a user
installs it, and one that fails before it is ready is one error with its last lines."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from psfw.base.errors import PsfwError
from psfw.jobs.shard_processes import shard_processes

from helpers import REPO

PSFW = [sys.executable, "-m", "psfw.cli"]

SHORT_JOB = """
seed = 3
[model]
name = "mlp"
hidden = [16]
[train]
batch_size = 32
steps = 12
log_every = 4
wait_s = 60
[optimizer]
name = "sgd"
learning_rate = 0.1
[cluster]
workers_per_group = 2
workers_per_process = 1
servers = 2
"""


@pytest.fixture
def taken_port():
    """A port of 127.0.0.1 that something else holds."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_a_shard_that_fails_to_start_is_one_error_with_its_last_lines(taken_port):
    with pytest.raises(PsfwError) as err, shard_processes(1, "--metrics-port", str(taken_port)):
        pass
    message = str(err.value)
    assert message.startswith("shard 0 exited with code 2 before it was ready; its last lines:")
    assert f"[shard 0] psfw server: cannot serve metrics on 127.0.0.1:{taken_port}" in message


def test_a_shard_writes_its_ready_record(tmp_path):
    with shard_processes(2) as (addresses, procs):
        assert len(set(addresses)) == 2 and all(a.startswith("127.0.0.1:") for a in addresses)
    ready = tmp_path / "ready.json"
    with subprocess.Popen([*PSFW, "server", "--listen", "127.0.0.1:0", "--ready-file", str(ready)]) as proc:
        try:
            for _ in range(600):
                if ready.exists() or proc.poll() is not None:
                    break
                time.sleep(0.05)
            record = json.loads(ready.read_text())
        finally:
            proc.terminate()
            proc.wait(30)
    assert record["pid"] == proc.pid and record["shard"] == 0 and record["shards"] == 1
    assert record["address"].startswith("127.0.0.1:") and not record["address"].endswith(":0")


def test_launch_reports_a_shard_that_fails_to_start_in_one_error(tmp_path, taken_port):
    config = tmp_path / "job.toml"
    config.write_text(SHORT_JOB)
    env = {**os.environ, "PSFW_METRICS_PORT": str(taken_port)}  # the shards read it; this one is taken
    done = subprocess.run(
        [*PSFW, "launch", str(config), "--run-dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
    assert "psfw: shard 0 exited with code 2 before it was ready; its last lines:" in done.stderr
    assert f"[shard 0] psfw server: cannot serve metrics on 127.0.0.1:{taken_port}" in done.stderr


def _fresh_install(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the source folder and a fresh virtual environment with psfw
    installed from it, not editable (``pip install .``). The dependencies are
    taken from this test environment's packages (a path, not an install), so the
    test downloads nothing but the build backend."""
    source = tmp_path / "psfw-src"
    shutil.copytree(
        REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "runs", "*.egg-info", "__pycache__")
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = {p for p in sys.path if p.endswith("site-packages")}
    Path(site, "test-dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    done = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--no-deps", "."],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return source, venv / "bin" / "psfw"


@pytest.mark.slow
def test_an_installed_psfw_launches_and_benchmarks_from_the_source_folder(tmp_path, taken_port):
    """The README's way in: ``pip install .``, then psfw's commands in the project
    folder, where ``psfw/`` (the source, without compute and services) sits in
    the current folder."""
    source, psfw = _fresh_install(tmp_path)
    (source / "job.toml").write_text(SHORT_JOB)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PSFW_") and k != "PYTHONPATH"}

    def run(*args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(psfw), *args], cwd=source, capture_output=True, text=True, timeout=600, env={**clean, **env}
        )

    done = run("launch", "job.toml", "--run-dir", str(tmp_path / "run"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "psfw launch: every worker process finished" in done.stdout
    assert (tmp_path / "run" / "params.safetensors").exists()

    done = run("bench", "--json", "--transfer", "1MiB")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["grpc_push_gb_s"] > 0

    done = run("launch", "job.toml", "--run-dir", str(tmp_path / "run2"), PSFW_METRICS_PORT=str(taken_port))
    assert done.returncode == 1 and "Traceback" not in done.stdout + done.stderr
    assert "shard 0 exited with code 2 before it was ready" in done.stderr
