"""A flood of junk connections or refused calls writes nothing but psfw's own
rate-limited refusal lines: gRPC's C core logs each failed TLS handshake at INFO
unless told otherwise, which the psfw command does."""

import os
import re
import signal
import socket
import subprocess
import sys

import grpc
import pytest

from certs import make_pki

PSFW = [sys.executable, "-m", "psfw.cli"]
# the C core's log lines (absl's format): I1207 13:37:39.397226   13795 ssl_transport_security.cc:2563] ...
CORE_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")
FIRST = (
    "psfw.server: shard 0 refused Describe from 127.0.0.1: UNAUTHENTICATED: wrong bearer token: "
    "send 'authorization: Bearer <token>'"
)
REPEATS = re.compile(
    r"psfw\.server: shard 0 refused (\d+) more Describe from 127\.0\.0\.1 \(UNAUTHENTICATED\) in \d+ s"
)


def quiet_env() -> dict[str, str]:
    """The environment of a user who never heard of GRPC_VERBOSITY."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_")}
    return {**env, "PYTHONUNBUFFERED": "1"}


def junk(port: int, count: int) -> None:
    """Connections that never speak TLS: an HTTP/1 request, zeros, nothing at all."""
    for i in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall([b"GET / HTTP/1.1\r\nHost: shard\r\n\r\n", b"\0" * 64, b""][i % 3])
            conn.shutdown(socket.SHUT_WR)
            try:
                conn.recv(100)
            except OSError:
                pass


def wrong_tokens(address: str, ca: bytes, count: int) -> None:
    with grpc.secure_channel(address, grpc.ssl_channel_credentials(ca)) as channel:
        describe = channel.unary_unary("/psfw.v1.ParameterServer/Describe")
        for _ in range(count):
            with pytest.raises(grpc.RpcError) as err:
                describe(b"", metadata=[("authorization", "Bearer guess")], timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.slow
def test_a_flood_writes_only_psfw_refusal_lines_and_clients_print_no_core_lines(tmp_path):
    pki = make_pki(tmp_path)
    cert, key = pki["server"]
    server = [*PSFW, "server", "--listen", "127.0.0.1:0", "--tls-cert", str(cert), "--tls-key", str(key)]
    server += ["--token-file", str(pki["token"])]
    env = quiet_env()
    with subprocess.Popen(server, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        try:
            line = proc.stdout.readline()
            assert "listening on 127.0.0.1:" in line, line + proc.stderr.read()
            address = re.search(r"listening on (\S+)", line).group(1)
            junk(int(address.rpartition(":")[2]), 60)
            wrong_tokens(address, pki["ca"].read_bytes(), 30)
            clients = {
                "status": [*PSFW, "status", address, "--tls-ca", str(pki["rogue-ca"])],
                "health": [*PSFW, "health", address, "--tls-ca", str(pki["rogue-ca"])],
            }
            for name, command in clients.items():
                done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
                lines = (done.stdout + done.stderr).strip().splitlines()
                assert done.returncode == 1 and len(lines) == 1, f"psfw {name}: {lines}"
                assert "not signed by the CA this client trusts" in lines[0]
        finally:
            proc.send_signal(signal.SIGTERM)
            _, errors = proc.communicate(timeout=60)
    lines = errors.strip().splitlines()
    assert not [line for line in lines if CORE_LINE.match(line)], errors
    assert all(line.startswith("psfw") for line in lines), errors
    # one line for the first refusal of an interval, a count for its repeats (one
    # interval here, or a few on a slow machine): 30 refusals in all
    counted = 0
    for line in (line for line in lines if "refused" in line):
        repeats = REPEATS.fullmatch(line)
        assert line == FIRST or repeats, line
        counted += int(repeats.group(1)) if repeats else 1
    assert counted == 30, errors
    assert len(lines) <= 8, errors
