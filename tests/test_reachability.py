"""A client that cannot talk to a shard says why at once (a failed TLS handshake,
with the flag to fix), and one that cannot reach it says so every few seconds and
when it got through; the shard's state is unchanged. Real shards on 127.0.0.1 with
certificates made by the test."""

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from psfw.base.errors import ShardError
from psfw.base.security import Security
from psfw.runtime.shard_client import ShardClient
from psfw.services.server import ShardServer

from certs import TOKEN
from helpers import free_port, psfw_command

PSFW = [sys.executable, "-m", "psfw.cli"]


def _security(cert=None, ca=None, token=None) -> Security:
    return Security.from_files(
        str(cert[0]) if cert else None, str(cert[1]) if cert else None, str(ca) if ca else None, token=token
    )


# (shard's settings, client's settings) -> what the one line must say
HANDSHAKES = {
    "no client certificate": ("mtls", dict(ca="ca", token=True), "--tls-cert/--tls-key"),
    "a client certificate of another CA": ("mtls", dict(cert="rogue", ca="ca", token=True), "--tls-client-ca"),
    "a shard certificate of another CA": ("mtls", dict(cert="client", ca="rogue-ca", token=True), "--tls-ca"),
    "a shard certificate for another name": ("other-name", dict(ca="ca"), "another name"),
    "plaintext to a TLS shard": ("mtls", dict(), "give --tls-ca"),
    "TLS to a plaintext shard": ("plain", dict(ca="ca"), "drop --tls-ca"),
}


async def _shard(pki, kind: str) -> ShardServer:
    security = {
        "mtls": lambda: _security(pki["server"], pki["ca"], TOKEN),
        "other-name": lambda: _security(pki["other-name"]),
        "plain": lambda: Security(),
    }[kind]()
    server = ShardServer(0, 1, security=security)
    await server.start("127.0.0.1:0")
    return server


# a shard that refuses the handshake by closing each new connection is named only once
# it has closed them for CLOSED_FOR_S (psfw.runtime.shard_client, 5 s): those cases wait it out
WAIT_OUT_CLOSED_FOR_S = ("no client certificate", "a client certificate of another CA", "plaintext to a TLS shard")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=() if c in WAIT_OUT_CLOSED_FOR_S else pytest.mark.unit) for c in sorted(HANDSHAKES)]
)
async def test_a_failed_handshake_ends_the_client_at_once_naming_the_cause_and_the_flag(pki, case):
    shard_kind, client, fix = HANDSHAKES[case]
    server = await _shard(pki, shard_kind)
    before = await server.store.state_digest()
    security = _security(
        pki[client["cert"]] if "cert" in client else None,
        pki[client["ca"]] if "ca" in client else None,
        TOKEN if client.get("token") else None,
    )
    # the patience of a real job: the error must come long before it runs out
    shard = ShardClient(server.address, 0, timeout_s=300, retries=5, security=security)
    started = time.monotonic()
    try:
        with pytest.raises(ShardError) as err:
            for _ in range(100):  # as the stub does: describe again while the shard seems down
                try:
                    await shard.describe()
                except ShardError as e:
                    if e.code != grpc.StatusCode.UNAVAILABLE:
                        raise
                    await asyncio.sleep(0.2)
        elapsed = time.monotonic() - started
        message = str(err.value)
        assert elapsed < 10, f"{case}: {elapsed:.1f} s"
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert message.startswith(f"shard 0 at {server.address}: cannot connect: ") and "\n" not in message
        assert fix in message, message
        assert await server.store.state_digest() == before
    finally:
        await shard.close()
        await server.stop(0)


JOB = """
seed = 2
[model]
name = "mlp"
hidden = [16]
[train]
batch_size = 32
steps = 5
wait_s = 300
[optimizer]
name = "sgd"
learning_rate = 0.1
[cluster]
workers_per_group = 1
workers_per_process = 1
servers = 1
"""


@pytest.mark.slow
def test_a_worker_says_every_few_seconds_that_it_waits_and_when_it_got_through(tmp_path: Path):
    """The worker starts first (no shard listens yet), the shard 12 s later."""
    config = tmp_path / "job.toml"
    config.write_text(JOB)
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    worker = subprocess.Popen(
        [*PSFW, "worker", str(config), "--servers", address, "--run-dir", str(tmp_path / "run")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    shard = None
    try:
        time.sleep(12)
        shard = subprocess.Popen([*PSFW, "server", "--listen", address], stdout=subprocess.DEVNULL, env=env)
        output, _ = worker.communicate(timeout=240)
    finally:
        for proc in (worker, shard):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert worker.returncode == 0, output
    waits = [line for line in output.splitlines() if f"waiting for shard 0 at {address}: connection refused" in line]
    assert 2 <= len(waits) <= 4, output  # every 5 s for about 12 s
    assert waits[0].endswith("s of 300")
    assert f"shard 0 at {address} answered after" in output
    assert "test loss" in output


def test_a_worker_without_its_client_certificate_stops_in_seconds_with_one_line(tmp_path, pki):
    config = tmp_path / "job.toml"
    config.write_text(JOB)
    cert, key = pki["server"]
    with subprocess.Popen(
        [*PSFW, "server", "--listen", "127.0.0.1:0", "--tls-cert", str(cert), "--tls-key", str(key)]
        + ["--tls-client-ca", str(pki["ca"]), "--token-file", str(pki["token"])],
        stdout=subprocess.PIPE,
        text=True,
    ) as shard:
        try:
            address = shard.stdout.readline().split("listening on ")[1].split()[0].rstrip(",")
            started = time.monotonic()
            done = subprocess.run(
                [*PSFW, "worker", str(config), "--servers", address, "--tls-ca", str(pki["ca"])]
                + ["--token-file", str(pki["token"])],
                capture_output=True,
                text=True,
                timeout=120,
            )
            elapsed = time.monotonic() - started
            status = subprocess.run(
                [*PSFW, "status", address, "--tls-ca", str(pki["ca"]), "--token-file", str(pki["token"])],
                capture_output=True,
                text=True,
                timeout=60,
            )
            health = subprocess.run([*PSFW, "health", address], capture_output=True, text=True, timeout=60)
        finally:
            shard.terminate()
            shard.wait(30)
    assert done.returncode == 1 and elapsed < 30, (elapsed, done.stderr)
    errors = [line for line in done.stderr.splitlines() if "cannot connect" in line]
    assert len(errors) == 1 and errors[0].startswith("psfw: ") and "Traceback" not in done.stderr, done.stderr
    assert f"shard 0 at {address}: cannot connect:" in errors[0] and "--tls-cert/--tls-key" in errors[0]
    assert status.returncode == 1 and "--tls-cert/--tls-key" in status.stderr, status.stderr
    assert health.returncode == 1 and "give --tls-ca" in health.stdout, health.stdout


def test_status_and_health_of_a_shard_that_is_down_answer_within_their_timeout(capsys):
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    status = psfw_command(capsys, "status", address)
    health = psfw_command(capsys, "health", address, "--timeout", "2")
    assert time.monotonic() - started < 40
    assert status.returncode == 1 and f"shard 0 ({address}) Describe: cannot connect: connection refused" in (
        status.stderr
    )
    assert health.returncode == 1 and "connection refused" in health.stdout, health.stdout
