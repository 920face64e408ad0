"""Across hosts: shards and a worker process in two network namespaces joined by a
veth pair, each with its own address; nothing leaves the namespaces the test makes."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from helpers import read_params

SUBNET = "10.231.7."  # private addresses inside the test's own namespaces only


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_hosts():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to make network namespaces")
    tag = f"psfw{os.getpid() % 100000}"
    hosts = [f"{tag}a", f"{tag}b"]
    links = [f"{tag}x", f"{tag}y"]
    try:
        for host in hosts:
            ip("netns", "add", host)
        ip("link", "add", links[0], "type", "veth", "peer", "name", links[1])
        for n, (host, link) in enumerate(zip(hosts, links, strict=True)):
            ip("link", "set", link, "netns", host)
            ip("-n", host, "addr", "add", f"{SUBNET}{n + 1}/30", "dev", link)
            ip("-n", host, "link", "set", link, "up")
            ip("-n", host, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as err:
        for host in hosts:
            subprocess.run(["ip", "netns", "del", host], capture_output=True)
        pytest.skip(f"cannot make network namespaces here: {err.stderr.strip()}")
    yield hosts
    for host in hosts:
        subprocess.run(["ip", "netns", "del", host], capture_output=True, timeout=30)


def in_host(host: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", host, sys.executable, "-m", "psfw.cli", *args]


@pytest.mark.slow
def test_training_across_two_hosts(two_hosts, tmp_path):
    server_host, worker_host = two_hosts
    config = tmp_path / "job.toml"
    config.write_text(
        "[model]\nhidden = [32]\n[train]\nbatch_size = 32\nsteps = 8\nwait_s = 60\n"
        "[cluster]\nworkers_per_group = 2\nworkers_per_process = 2\nservers = 2\n"
    )
    shards = []
    try:
        addresses = []
        for i in range(2):
            proc = subprocess.Popen(
                in_host(
                    server_host, "server", "--shard", str(i), "--of", "2", "--listen", f"{SUBNET}1:0", "--insecure"
                ),
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            shards.append(proc)
            addresses.append(re.search(r"listening on (\S+)", proc.stdout.readline()).group(1))
        assert all(a.startswith(f"{SUBNET}1:") for a in addresses)
        done = subprocess.run(
            in_host(
                worker_host, "worker", str(config), "--servers", ",".join(addresses), "--run-dir", str(tmp_path / "run")
            ),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert "group 0 step 8" in done.stdout
        assert "shards 0-1 link (tcp)" in done.stderr, "another host: the network path, over the shards' links"
        assert set(read_params(tmp_path / "run" / "params.safetensors")) == {
            "dense0/w",
            "dense0/b",
            "dense1/w",
            "dense1/b",
        }
    finally:
        for proc in shards:
            proc.terminate()
        for proc in shards:
            proc.wait(30)
            proc.stdout.close()
