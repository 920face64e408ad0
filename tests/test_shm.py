"""Shared memory between a stub and a shard process on the same host."""

import subprocess
import sys

import grpc
import numpy as np
import pytest
import pytest_asyncio

from psfw.jobs.shard_processes import shard_processes
from psfw.proto import ps_pb2 as pb
from psfw.protocol.frames import Frame, frame_deserializer, frame_serializer
from psfw.protocol.messages import UpdateHeader
from psfw.protocol.shm import SHM_DIR, Region, host_id, slot_layout
from psfw.runtime.connect import connect
from psfw.runtime.grpc_transport import ShardClient
from psfw.runtime.stub import add_up

from helpers import SGD

SPECS = [(("w", 0), np.dtype("float32"), (1000,)), (("w", 1), np.dtype("float32"), (24,))]


def _expect(key):
    return np.dtype("float32"), (1000,) if key == ("w", 0) else (24,)


def _header(step: int, rows: int = 1) -> UpdateHeader:
    return UpdateHeader(group=0, step=step, process=0, workers=1, rows=rows, workers_per_group=1, wait_s=5)


@pytest.fixture(scope="module")
def shard_process():
    with shard_processes(1) as (addresses, _):
        yield addresses[0]


@pytest_asyncio.fixture
async def clients(shard_process):
    shared = await connect(shard_process, 0, timeout_s=10, retries=0, shared_memory=SPECS)
    network = ShardClient(shard_process, 0, timeout_s=10, retries=0)
    yield shared, network
    await shared.close()
    await network.close()


def test_offsets_are_aligned_and_ordered():
    offsets, area = slot_layout(list(reversed(SPECS)))
    assert offsets == {("w", 0): 0, ("w", 1): 4032} and area == 4160
    assert all(o % 64 == 0 for o in offsets.values())


def test_regions_are_private_files_removed_on_close():
    region = Region.create(128)
    path = SHM_DIR / region.name
    assert path.exists() and path.stat().st_mode & 0o777 == 0o600
    region.close()
    assert not path.exists()
    with pytest.raises(ValueError, match="not a psfw shared-memory region"):
        Region.attach("../etc/passwd", 64)


def test_a_shard_writes_answers_through_the_mapping_or_the_file_alike():
    """Through the file (a large answer) the pages stay out of the shard's memory;
    the stub reads the same bytes either way."""
    stub = Region.create(4096)
    shard = Region.attach(stub.name, 4096)
    try:
        first, second = np.arange(256, dtype=np.float32), -np.arange(512, dtype=np.float32)
        shard.write_values(0, first)
        shard.write_values(1024, second, through_file=True)
        np.testing.assert_array_equal(stub.view(True, 0, np.float32, (256,)), first)
        np.testing.assert_array_equal(stub.view(True, 1024, np.float32, (512,)), second)
        with pytest.raises(ValueError, match="overrun the values area"):
            shard.write_values(4000, first, through_file=True)
    finally:
        shard.close()
        stub.close()


@pytest.mark.asyncio
async def test_updates_through_shared_memory_equal_the_network_path(clients):
    shared, network = clients
    values = {("w", 0): np.linspace(0, 1, 1000, dtype=np.float32), ("w", 1): np.ones(24, np.float32)}
    await network.put([(k, i, v) for (k, i), v in values.items()], SGD)
    assert shared.kind == "shared-memory" and network.kind == "grpc"
    grads = {("w", 0): np.full(1000, 2.0, np.float32), ("w", 1): np.full(24, -1.0, np.float32)}
    answer = await shared.update(_header(0, rows=4), grads, _expect)
    assert answer.step == 1
    fetched = await network.get(0, 1, [("w", 0), ("w", 1)], _expect, 5)
    for key, value in values.items():
        expected = value - 0.1 * grads[key] / 4
        np.testing.assert_allclose(answer.values[key], expected, rtol=1e-6)
        np.testing.assert_array_equal(fetched.values[key], answer.values[key])
    again = await shared.get(0, 1, [("w", 1)], _expect, 5)
    np.testing.assert_array_equal(again.values[("w", 1)], answer.values[("w", 1)])


@pytest.mark.asyncio
async def test_a_region_the_shard_cannot_map_is_refused_and_the_client_falls_back(shard_process, clients):
    shared, network = clients
    request = pb.UpdateRequest(group=0, step=5, process=0, workers=1, rows=1, workers_per_group=1, shm="psfw-1-bad")
    async with grpc.aio.insecure_channel(shard_process) as channel:
        call = channel.stream_stream(
            "/psfw.v1.ParameterServer/Update",
            request_serializer=frame_serializer(pb.UpdateRequest),
            response_deserializer=frame_deserializer(pb.UpdateReply),
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in call(iter([Frame(request, [])]), timeout=10):
                pass
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cannot use shared-memory region psfw-1-bad" in err.value.details()

    step = (await network.describe()).groups[0].step
    assert shared.kind == "shared-memory"
    (SHM_DIR / shared._region.name).unlink()  # the shard can no longer open it
    grads = shared.gradient_buffers(SPECS)  # the stub adds its sums up in the region
    for view in grads.values():
        view[:] = 0
    answer = await shared.update(_header(step), grads, _expect)
    assert answer.step == step + 1 and shared.kind == "grpc"
    assert shared.gradient_buffers(SPECS) is None, "from now on the sums go anywhere"


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


def test_a_region_of_another_layout_is_refused():
    region = Region.create(4096)
    try:
        with pytest.raises(ValueError, match="the layouts differ"):
            Region.attach(region.name, 2048)
        Region.attach(region.name, 4096).close()
    finally:
        region.close()


@pytest.mark.asyncio
async def test_workers_parts_are_added_into_the_region(shard_process):
    """The stub adds its workers' gradients up straight into the region's slots, and
    the Update carries only the region's name."""
    shared = await connect(shard_process, 0, timeout_s=10, retries=0, shared_memory=SPECS)
    network = ShardClient(shard_process, 0, timeout_s=10, retries=0)
    try:
        step = (await network.describe()).groups[0].step
        before = await network.get(0, step, [("w", 0), ("w", 1)], _expect, 5)
        parts = {
            ("w", 0): (np.full(1000, 1.0, np.float32), np.full(1000, 2.0, np.float32)),
            ("w", 1): (np.full(24, 0.5, np.float32), np.full(24, 0.5, np.float32), np.ones(24, np.float32)),
        }
        slots = shared.gradient_buffers(SPECS)
        grads = {key: add_up(ps, slots[key]) for key, ps in parts.items()}
        assert all(grads[key] is slots[key] for key in grads)
        answer = await shared.update(_header(step, rows=2), grads, _expect)
        np.testing.assert_allclose(answer.values[("w", 0)], before.values[("w", 0)] - 0.1 * 3.0 / 2, atol=1e-6)
        np.testing.assert_allclose(answer.values[("w", 1)], before.values[("w", 1)] - 0.1 * 2.0 / 2, atol=1e-6)
    finally:
        await shared.close()
        await network.close()


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
            Region.attach(link.name, area)
    finally:
        link.unlink()
    if os.geteuid() != 0:
        return  # making a file of another user needs root
    other = SHM_DIR / f"psfw-1-{uuid.uuid4().hex}"
    other.write_bytes(b"\0" * 2 * area)
    os.chown(other, 65534, 65534)
    try:
        with pytest.raises(ValueError, match="not a plain file of this shard's user"):
            Region.attach(other.name, area)
    finally:
        other.unlink()


@pytest.mark.asyncio
async def test_table_rows_beyond_one_message_ride_beside_the_shared_region():
    """A push and a pull of more rows than one message carries: the Update stays on
    the shared region (several messages), and the rows come back in pieces."""
    with shard_processes(1) as (addresses, _):  # a fresh shard: the module's holds other values of w
        shared = await connect(addresses[0], 0, timeout_s=20, retries=0, shared_memory=SPECS)
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
    assert shared.kind == "shared-memory"
    np.testing.assert_array_equal(answer.table_rows["big"].ids, ids)
    np.testing.assert_array_equal(answer.table_rows["big"].values, -np.ones((len(ids), 8), np.float32))
