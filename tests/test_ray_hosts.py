"""``psfw ray`` across hosts: Ray nodes started with ``ray start`` in network
namespaces of their own addresses, on a bridge in a namespace of its own (nothing
leaves the namespaces the test makes), with Ray's token authentication on (a token
file of the test's own). Shards go to two hosts, worker processes to two others; the
job trains over the network to the single-process reference's parameters."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from psfw.jobs.config import load_config

from helpers import assert_params_close, read_params, recovery_job, reference

pytest.importorskip("ray", reason='the Ray tier needs Ray: pip install -e ".[test]"')

SUBNET = "10.231.9."  # private addresses inside the test's own namespaces only
ROLES = ["head", "shard", "shard", "worker", "worker"]
BIN = Path(sys.executable).parent


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def end_namespace(name: str) -> None:
    """End every process left in the namespace ``name`` (Ray's), then the namespace."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=30).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while pids and time.monotonic() < deadline:
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=30)
            pids = pids.stdout.split()
            time.sleep(0.2)
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


@pytest.fixture
def hosts():
    """Five hosts (``ROLES``) on a bridge in a sixth namespace; each host's name."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to make network namespaces")
    tag = f"pr{os.getpid() % 100000}"
    switch, names = f"{tag}sw", [f"{tag}h{i}" for i in range(len(ROLES))]
    made = []
    try:
        for name in [switch, *names]:
            ip("netns", "add", name)
            made.append(name)
        ip("-n", switch, "link", "add", "br0", "type", "bridge")
        ip("-n", switch, "link", "set", "br0", "up")
        for i, name in enumerate(names):
            ip("-n", switch, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", name)
            ip("-n", switch, "link", "set", f"p{i}", "master", "br0")
            ip("-n", switch, "link", "set", f"p{i}", "up")
            ip("-n", name, "addr", "add", f"{SUBNET}{i + 1}/24", "dev", "eth0")
            ip("-n", name, "link", "set", "eth0", "up")
            ip("-n", name, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as err:
        for name in made:
            end_namespace(name)
        pytest.skip(f"cannot make network namespaces here: {err.stderr.strip()}")
    try:
        yield names
    finally:
        for name in reversed(made):
            end_namespace(name)


def ray_env(token: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
        RAY_COLOR_PREFIX="0",
        RAY_DEDUP_LOGS="0",
        PYTHONUNBUFFERED="1",
        PATH=f"{BIN}:{env.get('PATH', '')}",
    )
    return env


def start_node(host: str, index: int, env: dict[str, str], temp: str) -> subprocess.Popen:
    role = ROLES[index]
    args = ["ip", "netns", "exec", host, str(BIN / "ray"), "start", "--block", f"--node-ip-address={SUBNET}{index + 1}"]
    if role == "head":
        args += ["--head", "--port=6379", "--num-cpus=0", "--include-dashboard=false", f"--temp-dir={temp}"]
    else:
        args += [f"--address={SUBNET}1:6379", "--num-cpus=1", f'--resources={{"psfw_{role}_host": 1}}']
    args.append("--object-store-memory=100000000")
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_nodes(host: str, env: dict[str, str], count: int, nodes: list, timeout_s: float = 60) -> None:
    check = f"import ray; ray.init(address='{SUBNET}1:6379'); print(sum(n['Alive'] for n in ray.nodes()))"
    deadline = time.monotonic() + timeout_s
    seen = ""
    while time.monotonic() < deadline:
        done = subprocess.run(
            ["ip", "netns", "exec", host, sys.executable, "-c", check],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        seen = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-500:]
        if seen == str(count):
            return
        ended = next((n for n in nodes if n.poll() is not None), None)
        if ended is not None:
            raise AssertionError(f"a Ray node ended: {ended.stderr.read()[-2000:]}")
        time.sleep(1)
    raise AssertionError(f"the Ray cluster did not reach {count} nodes within {timeout_s:.0f} s: {seen}")


@pytest.mark.slow
@pytest.mark.ray
def test_shards_on_two_hosts_and_workers_on_two_others_train_as_the_reference(hosts, tmp_path):
    steps = 40
    token = tmp_path / "token"
    token.write_text(os.urandom(32).hex())
    token.chmod(0o600)
    env = ray_env(token)
    temp = tempfile.mkdtemp(prefix="psfwray-")  # Ray's socket paths must stay short
    nodes = []
    try:
        for i, host in enumerate(hosts):  # one at a time: nodes of one machine share Ray's session folder
            nodes.append(start_node(host, i, env, temp))
            wait_for_nodes(hosts[0], env, i + 1, nodes)
        config = recovery_job(tmp_path / "job.toml", steps=steps, workers=2, per_process=1)
        config.write_text(
            config.read_text()
            + "[ray]\ninsecure = true\n"
            + "[ray.shard]\nresources = { psfw_shard_host = 1 }\n"
            + "[ray.worker]\nresources = { psfw_worker_host = 1 }\n"
        )
        driver = subprocess.run(
            ["ip", "netns", "exec", hosts[0], sys.executable, "-m", "psfw.cli", "ray", str(config)]
            + ["--address", f"{SUBNET}1:6379", "--run-dir", str(tmp_path / "run")],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        out = driver.stdout + driver.stderr
        assert driver.returncode == 0, out[-4000:]
    finally:
        for node in nodes:
            node.terminate()
        for node in nodes:
            try:
                node.wait(30)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
            node.stderr.close()
        shutil.rmtree(temp, ignore_errors=True)
    shards = dict(re.findall(r"psfw ray: shard (\d) on node (\S+) \(\w+\) at \S+", out))
    workers = dict(re.findall(r"psfw ray: worker process (\d) on node (\S+) ", out))
    assert sorted(shards.values()) == [f"{SUBNET}2", f"{SUBNET}3"], out[-3000:]
    assert sorted(workers.values()) == [f"{SUBNET}4", f"{SUBNET}5"], out[-3000:]
    assert re.search(r"shards 0-1 link \(tcp\)", out), out[-3000:]  # between hosts: the link's TCP port
    expected = reference(load_config(config), steps)
    assert_params_close(read_params(tmp_path / "run" / "params.safetensors"), expected)
