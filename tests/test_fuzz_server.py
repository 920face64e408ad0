"""Every method of a shard started as ``psfw server``, sent bytes that do not parse
and well-formed messages with hostile values: each is answered with a precise status
and a one-line reason (never UNKNOWN or INTERNAL), the shard stays SERVING, its
state digest is unchanged, its memory stays bounded, and its log gets at most one
line per kind of refusal, the repeats counted."""

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from psfw.jobs.children import read_ready
from psfw.jobs.shard_processes import rss_bytes
from psfw.proto import ps_pb2 as pb
from psfw.protocol.chunks import Chunk, ChunkedMessage, chunked_serializer

PSFW = [sys.executable, "-m", "psfw.cli"]
SERVICE = "/psfw.v1.ParameterServer/"
METHODS = ("Put", "Get", "Update", "Describe", "Restore")
HELD = {("w", 0): (4,), ("w", 1): (3,), ("b", 0): (2,)}
ADAM = json.dumps({"name": "adam", "learning_rate": 0.01})
PRECISE = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}


class ServerProcess:
    """``psfw server`` on 127.0.0.1, its log in a file, called with blocking gRPC:
    ``call(method, messages)`` sends raw bytes or Frames."""

    def __init__(self, folder: Path, *extra: str, stderr=None):
        folder.mkdir(parents=True, exist_ok=True)
        self.log = folder / "server.log"
        ready = folder / "ready.json"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [*PSFW, "server", "--listen", "127.0.0.1:0", "--ready-file", str(ready), *extra],
                stdout=subprocess.DEVNULL,
                stderr=stderr if stderr is not None else log,
            )
        deadline = time.monotonic() + 60
        while (record := read_ready(ready)) is None:
            assert self.proc.poll() is None and time.monotonic() < deadline, "psfw server did not start"
            time.sleep(0.05)
        self.address = record["address"]
        self.channel = grpc.insecure_channel(self.address)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        raw = {"request_serializer": _as_bytes, "response_deserializer": lambda b: b}
        self.methods = {
            "Put": self.channel.stream_unary(SERVICE + "Put", **raw),
            "Get": self.channel.unary_stream(SERVICE + "Get", **raw),
            "Update": self.channel.stream_stream(SERVICE + "Update", **raw),
            "Describe": self.channel.unary_unary(SERVICE + "Describe", **raw),
            "Restore": self.channel.unary_unary(SERVICE + "Restore", **raw),
        }

    def call(self, method: str, request) -> None:
        """One RPC; ``request`` is bytes or a message (a list of them for a stream)."""
        stub = self.methods[method]
        if method in ("Put", "Update"):
            result = stub(iter(request if isinstance(request, list) else [request]), timeout=10)
        else:
            result = stub(request, timeout=10)
        if method in ("Get", "Update"):
            for _ in result:
                pass

    def digest(self) -> str:
        reply = pb.DescribeReply.FromString(
            self.methods["Describe"](pb.DescribeRequest(digest=True).SerializeToString(), timeout=30)
        )
        assert reply.digest
        return reply.digest

    def serving(self) -> bool:
        reply = self.health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def stop(self) -> int:
        self.channel.close()
        self.proc.terminate()
        return self.proc.wait(30)


_PUT, _UPDATE = chunked_serializer(pb.PutRequest), chunked_serializer(pb.UpdateRequest)


def _as_bytes(request) -> bytes:
    if isinstance(request, bytes):
        return request
    if isinstance(request, ChunkedMessage):
        return (_PUT if isinstance(request.header, pb.PutRequest) else _UPDATE)(request)
    return request.SerializeToString()


def _chunk(key: str, index: int, shape=(4,), dtype="float32", offset=0, data=None) -> Chunk:
    if data is None:
        data = np.ones(math.prod(shape), dtype).tobytes()
    return Chunk(key, index, dtype, tuple(shape), offset, data)


def _held(value: float = 0.5) -> list[Chunk]:
    return [_chunk(k, i, s, data=np.full(s, value, np.float32).tobytes()) for (k, i), s in HELD.items()]


def _update(**fields) -> pb.UpdateRequest:
    base = dict(group=0, step=1, process=0, workers=1, rows=1, workers_per_group=1, wait_s=0.2)
    return pb.UpdateRequest(**{**base, **fields})


@pytest.fixture(scope="module")
def training(tmp_path_factory):
    """A shard that holds three slices with Adam and has applied one step (so new
    slices can no longer be put), with an empty checkpoint folder."""
    folder = tmp_path_factory.mktemp("training")
    server = ServerProcess(folder, "--checkpoint-dir", str(folder / "checkpoints"))
    server.call("Put", ChunkedMessage(pb.PutRequest(optimizer=ADAM), _held(0.5)))
    server.call("Update", ChunkedMessage(_update(step=0), _held(0.1)))
    yield server
    assert server.stop() == 0
    log = server.log.read_text()
    assert "Traceback" not in log and "INTERNAL" not in log, log[-3000:]


@pytest.fixture(scope="module")
def empty(tmp_path_factory):
    """A shard that holds nothing yet: its first Put fixes the optimizer."""
    server = ServerProcess(tmp_path_factory.mktemp("empty"))
    yield server
    assert server.stop() == 0
    assert "Traceback" not in server.log.read_text()


def expect_refusal(server: ServerProcess, method: str, request, codes=PRECISE) -> grpc.StatusCode | None:
    """Run the call; a refusal must be precise, one line, and change nothing. Returns
    the code, or None for a request that was valid after all (Describe, say)."""
    before = server.digest()
    try:
        server.call(method, request)
    except grpc.RpcError as err:
        assert err.code() in codes, (method, err.code(), err.details())
        details = err.details() or ""
        assert len(details) > 10 and "\n" not in details, details
        assert server.digest() == before, f"state changed by a refused {method}: {details}"
        return err.code()
    finally:
        assert server.serving()
    return None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(METHODS), blob=st.binary(max_size=300))
def test_random_bytes_to_any_method_are_refused_precisely(training, method, blob):
    expect_refusal(training, method, blob)


# bytes that cannot parse, for each method: a truncated varint, a string that is not UTF-8
TRUNCATED = b"\x08\xff"
BAD_UTF8_REF = b"\x1a\x04\x0a\x02\xff\xfe"  # GetRequest.slices[0].key = b"\xff\xfe"
BAD_UTF8_SHM = b"\x72\x02\xff\xfe"  # UpdateRequest.shm = b"\xff\xfe"


@pytest.mark.parametrize(
    ("method", "blob"),
    [(m, TRUNCATED) for m in METHODS] + [("Get", BAD_UTF8_REF), ("Update", BAD_UTF8_SHM), ("Put", b"\x0a\x01\xff")],
)
def test_a_message_that_does_not_parse_is_invalid_argument_for_every_method(training, method, blob):
    code = expect_refusal(training, method, blob, {grpc.StatusCode.INVALID_ARGUMENT})
    assert code == grpc.StatusCode.INVALID_ARGUMENT


BIG = 2**64 - 1
HOSTILE = {
    "Get of step 2^64-1": ("Get", pb.GetRequest(step=BIG, wait_s=0.05), "DEADLINE_EXCEEDED"),
    "Get of group 2^32-1": ("Get", pb.GetRequest(group=2**32 - 1, step=5, wait_s=0.05), "DEADLINE_EXCEEDED"),
    "Get with wait_s NaN": ("Get", pb.GetRequest(step=BIG, wait_s=math.nan), "DEADLINE_EXCEEDED"),
    "Get of a path": ("Get", pb.GetRequest(slices=[pb.SliceRef(key="../../etc/passwd")]), "NOT_FOUND"),
    "Get of a name with NUL": ("Get", pb.GetRequest(slices=[pb.SliceRef(key="w\0")]), "NOT_FOUND"),
    "Get of slice 2^32-1": ("Get", pb.GetRequest(slices=[pb.SliceRef(key="w", slice=2**32 - 1)]), "NOT_FOUND"),
    "Get into a region path": ("Get", pb.GetRequest(shm="../../tmp/x"), "FAILED_PRECONDITION"),
    "Restore to step 2^64-1": ("Restore", pb.RestoreRequest(step=BIG, epoch=BIG), "NOT_FOUND"),
    "Update of step 2^64-1": ("Update", ChunkedMessage(_update(step=BIG), _held()), "FAILED_PRECONDITION"),
    "Update with 2^64-1 rows": ("Update", ChunkedMessage(_update(rows=BIG), _held()), "INVALID_ARGUMENT"),
    "Update from group 2^32-1": ("Update", ChunkedMessage(_update(group=2**32 - 1, worker_groups=1), _held()), None),
    "Update at offset 2^63": ("Update", ChunkedMessage(_update(), [_chunk("w", 0, offset=2**63)]), "INVALID_ARGUMENT"),
    "Update of a huge shape": (
        "Update",
        ChunkedMessage(_update(), [_chunk("w", 0, shape=(2**31, 2**31), data=b"\0" * 16)]),
        None,
    ),
    "Put of a new slice": ("Put", ChunkedMessage(pb.PutRequest(), [_chunk("../../escape", 0)]), "FAILED_PRECONDITION"),
    "Put of a name with NUL": ("Put", ChunkedMessage(pb.PutRequest(), [_chunk("w\0x", 0)]), "INVALID_ARGUMENT"),
    "Put of other values": ("Put", ChunkedMessage(pb.PutRequest(), [_chunk("w", 0)]), "ALREADY_EXISTS"),
    "Put of 4 TiB": (
        "Put",
        ChunkedMessage(pb.PutRequest(), [_chunk("huge", 0, shape=(2**20, 2**20), data=b"\0" * 64)]),
        "RESOURCE_EXHAUSTED",
    ),
    "Put of a huge offset": (
        "Put",
        ChunkedMessage(pb.PutRequest(), [_chunk("x", 0, offset=2**63)]),
        "INVALID_ARGUMENT",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_values_in_well_formed_messages_are_refused(training, case):
    method, request, expected = HOSTILE[case]
    code = expect_refusal(training, method, request)
    assert code is not None, f"{case} was accepted"
    if expected is not None:
        assert code.name == expected, case


SPECS = {
    "learning rate 1e400": '{"name": "adam", "learning_rate": 1e400}',
    "negative learning rate": '{"name": "sgd", "learning_rate": -0.1}',
    "NaN learning rate": '{"name": "sgd", "learning_rate": NaN}',
    "unknown optimizer": '{"name": "lion9", "learning_rate": 0.1}',
    "not JSON": "{adam",
    "no spec": "",
    "a list": "[1, 2]",
    "deeply nested": "[" * 100_000 + "]" * 100_000,
    "huge spec": json.dumps({"name": "sgd", "learning_rate": 0.1, "x": "y" * 100_000}),
}


@pytest.mark.parametrize("case", sorted(SPECS))
def test_a_first_put_with_an_optimizer_that_cannot_train_is_refused(empty, case):
    code = expect_refusal(empty, "Put", ChunkedMessage(pb.PutRequest(optimizer=SPECS[case]), [_chunk("w", 0)]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, case


def test_the_shard_survives_the_fuzzing_with_bounded_memory(training):
    """Runs after the tests above (same module shard): what they sent left no
    lasting cost, and the shard still trains."""
    peak = rss_bytes(training.proc.pid)
    assert peak < 1.5 * 2**30, f"peak RSS {peak / 2**20:.0f} MiB"
    assert training.serving()
    before = training.digest()
    training.call("Update", ChunkedMessage(_update(step=1), _held(0.1)))
    assert training.digest() != before


def test_a_flood_of_garbage_is_logged_in_a_few_lines(tmp_path):
    """400 refusals from one client, the shard's log a pipe nobody reads meanwhile:
    the shard answers at once, and its log has one line per kind and one count."""
    server = ServerProcess(tmp_path, stderr=subprocess.PIPE)
    try:
        for _ in range(200):
            for method in ("Get", "Describe"):
                with pytest.raises(grpc.RpcError) as err:
                    server.call(method, TRUNCATED)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        started = time.monotonic()
        assert server.serving() and time.monotonic() - started < 5
    finally:
        server.stop()
    with server.proc.stderr:
        log = server.proc.stderr.read().decode()
    lines = [line for line in log.splitlines() if "refused" in line]
    assert "Traceback" not in log
    assert len(lines) == 4, log
    assert any("refused Get from 127.0.0.1: INVALID_ARGUMENT: malformed GetRequest" in line for line in lines)
    assert any("refused 199 more Get from 127.0.0.1 (INVALID_ARGUMENT)" in line for line in lines)
    assert any("refused 199 more Describe from 127.0.0.1 (INVALID_ARGUMENT)" in line for line in lines)
