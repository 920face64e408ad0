"""Shared memory between a stub and a shard process on the same host: the region
and its files, Updates that carry where their tensors lie (slots) instead of the
tensors, over the shard's link or gRPC, and the refusals that send the tensors back
into the messages."""

import asyncio
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import pytest_asyncio

from psfw.base.errors import Reason, ShardError, WireError
from psfw.jobs.shard_processes import shard_processes
from psfw.proto import ps_pb2 as pb
from psfw.protocol.calls import UPDATE_REQUEST
from psfw.protocol.chunks import ChunkedMessage
from psfw.protocol.layout import plan_layout
from psfw.protocol.messages import GetHeader, UpdateHeader
from psfw.protocol.shm import SHM_DIR, Region, host_id
from psfw.runtime.connect import connect
from psfw.runtime.gradient_sums import GradientStage
from psfw.runtime.grpc_channel import reason_of
from psfw.runtime.link_connection import LinkConnection, link_place
from psfw.runtime.shard_client import ShardClient
from psfw.runtime.step_region import StepRegion
from psfw.services.server import ShardServer

from helpers import SGD, link_calls, shm_region

KEYS = [("w", 0), ("w", 1)]


def _expect(key):
    return np.dtype("float32"), (1000,) if key == ("w", 0) else (24,)


def _header(step: int, rows: int = 1, workers_per_group: int = 1, wait_s: float = 5) -> UpdateHeader:
    return UpdateHeader(
        group=0, step=step, process=0, workers=1, rows=rows, workers_per_group=workers_per_group, wait_s=wait_s
    )


def _get(step: int, keys=KEYS) -> GetHeader:
    return GetHeader(0, step, keys, 5)


VALUES = {("w", 0): np.linspace(0, 1, 1000, dtype=np.float32), ("w", 1): np.ones(24, np.float32)}


@pytest.fixture(scope="module")
def shard_process():
    with shard_processes(1) as (addresses, _):
        yield addresses[0]


@pytest_asyncio.fixture
async def clients(shard_process):
    """A client of the shard process whose Updates go through a region (over the
    shard's link), and one over gRPC alone."""
    region = shm_region(1000, 24)
    shared = await connect(shard_process, 0, timeout_s=10, retries=0, shared_memory=region)
    region.release()  # the client holds it now
    network = ShardClient(shard_process, 0, timeout_s=10, retries=0)
    yield shared, network
    await shared.close()
    await network.close()


@pytest_asyncio.fixture
async def server():
    """A shard of this process that its clients reach as from another process of this
    host (``connect`` without ``here``): a spy can watch what it is sent."""
    server = ShardServer(0, 1)
    await server.start("127.0.0.1:0")
    yield server
    await server.stop(0)


async def _shared(server: ShardServer, link: bool = True) -> ShardClient:
    """A client of ``server`` whose Updates go through a region of their own (over
    the shard's link, or gRPC without it), after a Put of VALUES."""
    region = shm_region(1000, 24)
    try:
        client = await connect(server.address, 0, timeout_s=10, retries=0, shared_memory=region, link=link)
    finally:
        region.release()  # the client holds it now
    await client.put([(k, i, v) for (k, i), v in VALUES.items()], SGD)
    return client


@pytest.mark.unit
def test_whole_parameters_lie_aligned_in_three_areas_and_answers_take_turns():
    layout = plan_layout({"b": ((10,), "float32"), "a": ((3, 100), "float32")}, shards=2, workers=1, slice_bytes=400)
    region = StepRegion(layout).acquire()
    try:
        grads = region.gradients()
        assert {n: v.shape for n, v in grads.items()} == {"a": (3, 100), "b": (10,)}
        assert region.region.size == 3 * (1216 + 64)  # "a" (1200 bytes) then "b", each from a 64-byte boundary
        even, even_slices = region.values(0)
        odd, _ = region.values(1)
        places = [region.offset_of(v) for v in (*grads.values(), *even.values(), *odd.values())]
        assert all(p is not None and p % 64 == 0 for p in places) and len(set(places)) == 6
        assert region.values(2)[0]["a"] is even["a"], "the Update after next writes where this one did"
        for s in layout.params["a"].slices:  # a slice is a view of its parameter
            assert np.shares_memory(even_slices[("a", s.index)], even["a"])
        assert region.offset_of(np.zeros(4, np.float32)) is None
    finally:
        region.release()
    assert not (SHM_DIR / region.name).exists()


@pytest.mark.unit
def test_a_bfloat16_answer_is_written_as_its_bytes():
    """bfloat16 has no buffer format of its own: a shard writes its bytes."""
    from psfw.protocol.compression import BFLOAT16

    stub = Region.create(4096)
    shard = Region.attach(stub.name)
    try:
        values = np.linspace(-2, 2, 100).astype(BFLOAT16)
        shard.write(0, values)
        shard.write(1024, values, through_file=True)
        for offset in (0, 1024):
            np.testing.assert_array_equal(stub.view(offset, BFLOAT16, (100,)), values)
    finally:
        shard.close()
        stub.close()


@pytest.mark.unit
def test_regions_are_private_files_removed_on_close():
    region = Region.create(128)
    path = SHM_DIR / region.name
    assert path.exists() and path.stat().st_mode & 0o777 == 0o600
    region.close()
    assert not path.exists()
    with pytest.raises(ValueError, match="not a psfw shared-memory region"):
        Region.attach("../etc/passwd")


@pytest.mark.unit
def test_a_shard_writes_answers_through_the_mapping_or_the_file_alike():
    """Through the file (a large answer) the pages stay out of the shard's memory;
    the stub reads the same bytes either way; nothing lands outside the region."""
    stub = Region.create(4096)
    shard = Region.attach(stub.name)
    try:
        first, second = np.arange(256, dtype=np.float32), -np.arange(512, dtype=np.float32)
        shard.write(0, first)
        shard.write(1024, second, through_file=True)
        np.testing.assert_array_equal(stub.view(0, np.float32, (256,)), first)
        np.testing.assert_array_equal(stub.view(1024, np.float32, (512,)), second)
        for offset in (4000, -4, 2):
            with pytest.raises(ValueError, match="do not lie inside region"):
                shard.write(offset, first, through_file=True)
        with pytest.raises(ValueError, match="do not lie inside region"):
            shard.view(4096 - 60, np.float32, (16,))
    finally:
        shard.close()
        stub.close()


@pytest.mark.unit
@pytest.mark.asyncio
async def test_updates_through_shared_memory_equal_the_network_path(clients):
    """Gradients and answers the caller keeps elsewhere are copied into the region
    and out of it."""
    shared, network = clients
    values = VALUES
    await network.put([(k, i, v) for (k, i), v in values.items()], SGD)
    assert shared.kind == "link (unix, shared memory)" and shared.shares_memory and shared.linked == "unix"
    assert network.kind == "grpc" and not network.shares_memory
    grads = {("w", 0): np.full(1000, 2.0, np.float32), ("w", 1): np.full(24, -1.0, np.float32)}
    answer = await shared.update(_header(0, rows=4), grads, _expect)
    assert answer.step == 1
    fetched = await network.get(_get(1), _expect)
    for key, value in values.items():
        expected = value - 0.1 * grads[key] / 4
        np.testing.assert_allclose(answer.values[key], expected, rtol=1e-6)
        np.testing.assert_array_equal(fetched.values[key], answer.values[key])
        assert shared.step_buffers.offset_of(answer.values[key]) is None, "a copy: the region's are the stub's"
    again = await shared.get(_get(1, [("w", 1)]), _expect)  # over the link: its values in the messages
    np.testing.assert_array_equal(again.values[("w", 1)], answer.values[("w", 1)])


@pytest.mark.unit
@pytest.mark.asyncio
async def test_a_stub_s_own_buffers_in_the_region_are_used_in_place(clients):
    """The gradient sums are read where the stub added them up, and the answer is
    written into the parameters the stub publishes: the values returned are those
    very buffers."""
    shared, network = clients
    region = shared.step_buffers
    step = (await network.describe()).groups[0].step
    before = (await network.get(_get(step), _expect)).values
    region.gradients()["w"][:] = 3.0
    whole, into = region.values(step)
    answer = await shared.update(_header(step, rows=2), {k: region.gradient_slot(k) for k in KEYS}, _expect, into)
    for key in KEYS:
        assert answer.values[key] is into[key]
        np.testing.assert_allclose(answer.values[key], before[key] - 0.1 * 3.0 / 2, atol=1e-6)
    np.testing.assert_array_equal(whole["w"], np.concatenate([answer.values[k] for k in KEYS]))
    assert not np.shares_memory(region.values(step + 1)[0]["w"], whole["w"])


CARRIERS = ["grpc", "link"]


async def _refused(carrier: str, network: ShardClient, request) -> tuple[grpc.StatusCode, str, Reason]:
    """A request of one message (an UpdateRequest, or a GetRequest) as any client of
    this host could send it, over gRPC or the shard's link (its Unix socket); the
    shard's refusal: its code, message and reason."""
    method = "Get" if isinstance(request, pb.GetRequest) else "Update"
    message = request.SerializeToString() if method == "Get" else UPDATE_REQUEST(ChunkedMessage(request, []))
    if carrier == "link":
        place = link_place(await network.describe(), network.address)
        assert place is not None and place.kind == "unix"
        link = await LinkConnection.open(place, None, None)
        try:
            answer = await link.call(method, lambda: [[message]], lambda replies: replies, 10)
        finally:
            await link.close()
        assert isinstance(answer, WireError), "not refused"
        return answer.code, answer.message, answer.reason
    async with grpc.aio.insecure_channel(network.address) as channel:
        path = f"/psfw.v1.ParameterServer/{method}"
        call = channel.unary_stream(path) if method == "Get" else channel.stream_stream(path)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in call(message if method == "Get" else iter([message]), timeout=10):
                pass
    return err.value.code(), err.value.details(), reason_of(err.value)


@pytest.mark.unit
@pytest.mark.asyncio
@pytest.mark.parametrize("carrier", CARRIERS)
async def test_a_region_the_shard_cannot_map_is_refused_with_no_shared_memory(clients, carrier):
    """An Update that names a region the shard cannot map: FAILED_PRECONDITION with
    the reason NO_SHARED_MEMORY (what tells a client to send its tensors in the
    messages), over gRPC and over the link alike."""
    _, network = clients
    request = pb.UpdateRequest(group=0, step=5, process=0, workers=1, rows=1, workers_per_group=1, shm="psfw-1-bad")
    code, message, reason = await _refused(carrier, network, request)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and reason == Reason.NO_SHARED_MEMORY
    assert "cannot use shared-memory region psfw-1-bad" in message


@pytest.mark.unit
@pytest.mark.asyncio
async def test_a_client_whose_region_the_shard_cannot_map_goes_on_with_tensors_in_the_messages(clients):
    """The shard can no longer open the client's region: its Update is refused with
    NO_SHARED_MEMORY, sent again with the tensors in its messages (over the link
    still), and answered into the same buffers; the client keeps the region (its
    buffers, and the other shards, use it) and sends tensors from then on."""
    shared, network = clients
    step = (await network.describe()).groups[0].step
    assert shared.kind == "link (unix, shared memory)"
    region = shared.step_buffers
    (SHM_DIR / region.name).unlink()  # the shard can no longer open it
    region.gradients()["w"][:] = 0
    into = region.values(step)[1]
    answer = await shared.update(_header(step), {k: region.gradient_slot(k) for k in KEYS}, _expect, into)
    assert answer.step == step + 1
    assert shared.kind == "link (unix)" and not shared.shares_memory and shared.linked == "unix"
    assert all(answer.values[k] is into[k] for k in KEYS), "the answer in the messages lands in the same buffers"
    assert shared.step_buffers is region, "the others (and the stub's buffers) still use the region"
    answer = await shared.update(_header(step + 1), {k: region.gradient_slot(k) for k in KEYS}, _expect)
    assert answer.step == step + 2 and shared.kind == "link (unix)"


@pytest.mark.unit
@pytest.mark.asyncio
@pytest.mark.parametrize("carrier", CARRIERS)
async def test_slots_outside_the_region_or_of_other_slices_are_refused_and_change_nothing(clients, carrier):
    """Slots that lie outside the region, off the element size or name a slice the
    shard does not hold: INVALID_ARGUMENT; a region named without slots (an older
    psfw) and a Get through shared memory: NO_SHARED_MEMORY; over either carrier,
    and the shard's state is as it was."""
    shared, network = clients
    region = shared.step_buffers
    step = (await network.describe()).groups[0].step
    before = (await network.get(_get(step), _expect)).values
    size = region.region.size
    good = {("w", 0): (0, size // 3), ("w", 1): (4000, size // 3 + 4000)}

    def update(slots: dict) -> pb.UpdateRequest:
        return pb.UpdateRequest(
            group=0, step=step, process=0, workers=1, rows=1, workers_per_group=1, wait_s=5, shm=region.name,
            shm_slots=[pb.ShmSlot(key=k, slice=i, grads=g, values=v) for (k, i), (g, v) in slots.items()],
        )  # fmt: skip

    bad = [
        ({**good, ("w", 1): (size - 64, 0)}, "do not lie inside region"),
        ({**good, ("w", 1): (4000, size)}, "do not lie inside region"),
        ({**good, ("w", 0): (2, 0)}, "on a 4-byte boundary"),
        ({**good, ("v", 0): (0, 0)}, "which shard 0 does not hold"),
    ]
    for slots, expected in bad:
        code, message, _ = await _refused(carrier, network, update(slots))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and expected in message, message
    # a stub of an older psfw names its region without the places: it is sent to the network
    code, message, reason = await _refused(carrier, network, update({}))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "older psfw" in message
    assert reason == Reason.NO_SHARED_MEMORY
    code, message, reason = await _refused(carrier, network, pb.GetRequest(group=0, step=step, shm=region.name))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "answers no Get through shared memory" in message
    assert reason == Reason.NO_SHARED_MEMORY
    after = await network.get(_get(step), _expect)
    assert (await network.describe()).groups[0].step == step
    for key, value in before.items():
        np.testing.assert_array_equal(after.values[key], value)


@pytest.mark.unit
@pytest.mark.asyncio
@pytest.mark.parametrize("link", [True, False], ids=["link", "grpc"])
async def test_an_update_through_shared_memory_carries_slots_not_tensors(server, link, monkeypatch):
    """A client on the shard's host: its Update is one message that names the region
    and where each slice's sum and answer lie (no tensor bytes), over the shard's link
    (its Unix socket) or over gRPC; the shard reads the sums there and writes its
    answer there, counted as an Update."""
    carried = link_calls(server, monkeypatch)
    seen = []
    apply_update = server.requests.apply_update

    async def watched(frames):
        async def each():
            async for frame in frames:
                seen.append(frame)
                yield frame

        return await apply_update(each())

    monkeypatch.setattr(server.requests, "apply_update", watched)
    shared = await _shared(server, link)
    try:
        assert shared.shares_memory and shared.kind == (
            "link (unix, shared memory)" if link else "grpc (shared memory)"
        )
        grads = {("w", 0): np.full(1000, 4.0, np.float32), ("w", 1): np.full(24, -2.0, np.float32)}
        answer = await shared.update(_header(0, rows=2), grads, _expect)
        assert answer.step == 1
        [message] = seen
        assert message.header.shm == shared.step_buffers.name and not message.chunks, "no tensor bytes"
        assert sorted((slot.key, slot.slice) for slot in message.header.shm_slots) == KEYS
        fetched = await shared.get(_get(1), _expect)
        for key, value in VALUES.items():
            np.testing.assert_allclose(answer.values[key], value - 0.1 * grads[key] / 2, rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(fetched.values[key], answer.values[key])
        assert server.requests.rpc_counts["Update"] == 1
        assert [method for method, _ in carried] == (["Put", "Update", "Get"] if link else [])
        assert all(peer == "link from this host" for _, peer in carried)
    finally:
        await shared.close()


@pytest.mark.unit
@pytest.mark.asyncio
async def test_a_refusal_of_an_update_through_shared_memory_is_the_same_shard_error_and_keeps_the_link(server):
    """An Update through the region that waits for a group that never completes: the
    same DEADLINE_EXCEEDED as over gRPC; the link and the region stay in use."""
    shared = await _shared(server)
    try:
        grads = {("w", 0): np.zeros(1000, np.float32), ("w", 1): np.zeros(24, np.float32)}
        with pytest.raises(ShardError) as err:
            await shared.update(_header(0, workers_per_group=2, wait_s=0.2), grads, _expect)
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and "shard 0" in str(err.value)
        assert shared.kind == "link (unix, shared memory)"
    finally:
        await shared.close()


@pytest.mark.unit
@pytest.mark.asyncio
async def test_updates_through_shared_memory_go_on_over_grpc_while_the_link_is_down(server, monkeypatch):
    """The shard's link goes away: the Update still goes through the region, over
    gRPC, applied once; when the shard names a new link, the next Describe opens it
    and the Updates go over it again, still through the region."""
    carried = link_calls(server, monkeypatch)
    shared = await _shared(server)
    try:
        grads = {("w", 0): np.ones(1000, np.float32), ("w", 1): np.ones(24, np.float32)}
        await server.link.stop(0)
        answer = await shared.update(_header(0), grads, _expect)
        assert answer.step == 1 and shared.kind == "grpc (shared memory)"
        np.testing.assert_allclose(answer.values[("w", 1)], VALUES[("w", 1)] - 0.1, rtol=1e-6)
        await server.link.start("127.0.0.1")
        requests = server.requests
        requests.link_socket, requests.link_port, requests.link_id = (
            server.link.socket,
            server.link.port,
            server.link.id,
        )
        await shared.describe()
        assert shared.kind == "link (unix, shared memory)"
        answer = await shared.update(_header(1), grads, _expect)
        assert answer.step == 2 and shared.kind == "link (unix, shared memory)"
        assert [method for method, _ in carried] == ["Put", "Update"], "the first Update went over gRPC"
        assert server.description().slices[0].version == 2, "each Update was applied once"
    finally:
        await shared.close()


@pytest.mark.unit
@pytest.mark.asyncio
async def test_a_stopping_shard_ends_an_update_through_shared_memory_within_its_grace(server):
    """An Update through the region that waits for the rest of its group when the
    shard stops: the stop returns within its grace and the stub gets an error, never
    a hang."""
    shared = await _shared(server)
    try:
        grads = {("w", 0): np.ones(1000, np.float32), ("w", 1): np.ones(24, np.float32)}
        waiting = asyncio.create_task(shared.update(_header(0, workers_per_group=2, wait_s=30), grads, _expect))
        deadline = time.monotonic() + 10
        while not server.description().groups and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.wait_for(server.stop(0.2), 10)
        with pytest.raises(ShardError):
            await asyncio.wait_for(waiting, 10)
    finally:
        await shared.close()


@pytest.mark.unit
@pytest.mark.asyncio
async def test_the_region_file_goes_when_the_last_client_using_it_closes():
    """One region for a process's shards on this host: each client holds it, also
    after its shard refused it; the file goes when the last of them closes."""
    servers = [ShardServer(0, 1) for _ in range(2)]
    for each in servers:
        await each.start("127.0.0.1:0")
    region = shm_region(1000, 24)
    path = SHM_DIR / region.name
    clients = []
    try:
        for each in servers:
            clients.append(await connect(each.address, 0, timeout_s=10, retries=0, shared_memory=region))
        region.release()
        assert all(c.shares_memory for c in clients) and path.exists()
        await clients[0].close()
        assert path.exists(), "the other client still uses it"
        await clients[1].close()
        assert not path.exists()
    finally:
        for client in clients:
            await client.close()
        for each in servers:
            await each.stop(0)


@pytest.mark.unit
@pytest.mark.asyncio
async def test_a_shard_on_another_host_gets_no_shared_memory_and_makes_no_region_file():
    """A shard whose Describe answer names another host (or none): the client keeps
    its tensors in the messages, and a process whose shards are all elsewhere makes
    no region file."""
    layout = plan_layout({"w": ((100,), "float32")}, shards=1, workers=1, slice_bytes=400)
    region = StepRegion(layout)
    client = ShardClient("127.0.0.1:1", 0, timeout_s=1, retries=0)
    try:
        for host in ("another-host", ""):
            assert not client.share_memory(region, pb.DescribeReply(host=host))
        assert not client.shares_memory and client.step_buffers is None and region.region is None
    finally:
        await client.close()


@pytest.mark.unit
def test_workers_gradients_are_added_up_as_they_report_and_a_stale_report_adds_nothing():
    generation = [0]
    targets = {"a": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.float32)}
    stage = GradientStage(targets, lambda: generation[0])

    def grads(value):  # a worker's report: every parameter, and more (a table's rows) that is not staged
        return {"a": np.full((2, 3), value, np.float32), "b": np.full(4, value, np.float32), "rows": object()}

    assert stage.add(0, 0, grads(1.0)) and stage.add(0, 0, grads(2.0))
    assert (targets["a"] == 3.0).all() and (targets["b"] == 3.0).all()
    assert stage.add(1, 0, grads(5.0)), "a new step starts anew"
    assert (targets["a"] == 5.0).all()
    generation[0] = 1  # a re-sync
    assert not stage.add(1, 0, grads(7.0)), "computed before the re-sync"
    assert (targets["a"] == 5.0).all()
    assert stage.add(1, 1, grads(0.5)), "the same step of the new generation starts anew"
    assert (targets["b"] == 0.5).all()


def test_another_network_namespace_counts_as_another_host():
    if subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot make a network namespace here")
    other = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", "from psfw.protocol.shm import host_id; print(host_id())"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert other.returncode == 0, other.stderr
    assert other.stdout.strip() and other.stdout.strip() != host_id()


def test_a_terminated_worker_process_removes_its_regions_and_says_so(tmp_path):
    """SIGTERM (a container's stop, psfw launch stopping the others) cleans up like Ctrl-C."""
    import os
    import signal
    import time

    config = tmp_path / "job.toml"
    config.write_text(
        "[train]\nbatch_size = 20\nsteps = 50\nwait_s = 60\n"
        "[cluster]\nworkers_per_group = 2\nworkers_per_process = 1\nservers = 2\n"
    )
    with shard_processes(2) as (addresses, _):
        worker = subprocess.Popen(
            [sys.executable, "-m", "psfw.cli", "worker", str(config), "--process", "0"]
            + ["--servers", ",".join(addresses), "--run-dir", str(tmp_path / "run")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            mine = f"psfw-{worker.pid}-"
            deadline = time.monotonic() + 60
            # process 1 never starts: process 0 holds its regions and waits for its Puts
            while not any(n.startswith(mine) for n in os.listdir(SHM_DIR)) and time.monotonic() < deadline:
                assert worker.poll() is None, worker.stdout.read()
                time.sleep(0.05)
            assert any(n.startswith(mine) for n in os.listdir(SHM_DIR)), "the worker made no region"
            worker.send_signal(signal.SIGTERM)
            out, _ = worker.communicate(timeout=60)
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.communicate()
    assert worker.returncode == 128 + signal.SIGTERM, out
    assert "psfw: terminated" in out and "Traceback" not in out, out
    assert not [n for n in os.listdir(SHM_DIR) if n.startswith(mine)]


@pytest.mark.unit
def test_a_shard_maps_no_link_and_no_file_of_another_user(tmp_path):
    """A region name is only a name: a link in /dev/shm to another file, or a file
    another user made (and could shrink under the mapping), is refused."""
    import os
    import uuid

    area = 4096
    victim = tmp_path / "victim"
    victim.write_bytes(b"\0" * 2 * area)
    link = SHM_DIR / f"psfw-1-{uuid.uuid4().hex}"
    link.symlink_to(victim)
    try:
        with pytest.raises(OSError):
            Region.attach(link.name)
    finally:
        link.unlink()
    if os.geteuid() != 0:
        return  # making a file of another user needs root
    other = SHM_DIR / f"psfw-1-{uuid.uuid4().hex}"
    other.write_bytes(b"\0" * 2 * area)
    os.chown(other, 65534, 65534)
    try:
        with pytest.raises(ValueError, match="not a plain file of this shard's user"):
            Region.attach(other.name)
    finally:
        other.unlink()


@pytest.mark.asyncio
async def test_table_rows_beyond_one_message_ride_beside_the_shared_region():
    """A push and a pull of more rows than one message carries: the Update stays on
    the shared region (several messages), and the rows come back in pieces."""
    with shard_processes(1) as (addresses, _):  # a fresh shard: the module's holds other values of w
        region = shm_region(1000, 24)
        shared = await connect(addresses[0], 0, timeout_s=20, retries=0, shared_memory=region)
        region.release()
        network = ShardClient(addresses[0], 0, timeout_s=20, retries=0)
        try:
            await _push_and_pull_many_rows(shared, network)
        finally:
            await shared.close()
            await network.close()


async def _push_and_pull_many_rows(shared, network):
    import json

    from psfw.compute.tables import check_table_optimizer
    from psfw.protocol.messages import RowBlock

    table = {"rows": 10**6, "dim": 8, "init": "zeros", "scale": 0.0, "seed": 0}
    table["optimizer"] = check_table_optimizer({"name": "sgd", "learning_rate": 1.0})
    await network.put([("w", 0, np.zeros(1000, np.float32)), ("w", 1, np.zeros(24, np.float32))], SGD)
    await network.put([], SGD, "", json.dumps({"big": table}))
    ids = np.arange(0, 2 * 10**5, 1, dtype=np.int64)  # 1.6 MB of ids, 6.4 MB of rows: several pieces
    grads = {("w", 0): np.zeros(1000, np.float32), ("w", 1): np.zeros(24, np.float32)}
    head = UpdateHeader(
        group=0, step=0, process=0, workers=1, rows=1, workers_per_group=1, wait_s=20,
        push={"big": RowBlock(ids, np.ones((len(ids), 8), np.float32))}, pull={"big": ids},
    )  # fmt: skip
    answer = await shared.update(head, grads, _expect)
    assert shared.kind == "link (unix, shared memory)"
    np.testing.assert_array_equal(answer.table_rows["big"].ids, ids)
    np.testing.assert_array_equal(answer.table_rows["big"].values, -np.ones((len(ids), 8), np.float32))


@pytest.mark.asyncio
@pytest.mark.parametrize("optimizer", [{"name": "sgd", "learning_rate": 0.3}, {"name": "adam", "learning_rate": 0.01}])
async def test_training_through_the_region_with_parameters_cut_over_both_shards_equals_single_process_training(
    optimizer, caplog
):
    """Two workers add their gradients up in the region; both shards write their
    slices of one parameter into it (slices that start off a 64-byte boundary too),
    by turns: the result is full-batch training."""
    import logging

    from psfw.jobs.config import parse_config
    from psfw.jobs.job import build_job
    from psfw.jobs.worker_processes import run_worker_processes
    from psfw.runtime.fetch import fetch_params

    from helpers import assert_params_close, reference

    config = parse_config(
        {
            "data": {"name": "digits"},
            "model": {"hidden": [10]},
            "optimizer": optimizer,
            "train": {"batch_size": 50, "steps": 7},
            "cluster": {"workers_per_group": 2, "workers_per_process": 2, "servers": 2, "slice_bytes": 1000},
        }
    )
    job = build_job(config)
    starts = [s.start * 4 for p in job.layout.params.values() for s in p.slices]
    assert any(start % 64 for start in starts) and {s.shard for s in job.layout.params["dense0/w"].slices} == {0, 1}
    with shard_processes(2) as (addresses, _):
        with caplog.at_level(logging.INFO, logger="psfw"):
            await run_worker_processes(job, addresses)
        assert "shards 0-1 link (unix, shared memory)" in caplog.text
        clients = [ShardClient(a, i, timeout_s=30) for i, a in enumerate(addresses)]
        try:
            params = await fetch_params(clients, job.layout, 0, job.steps, list(job.layout.params), 30)
        finally:
            for client in clients:
                await client.close()
    assert_params_close(params, reference(config, job.steps))
