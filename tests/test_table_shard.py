"""A shard's embedding tables over real gRPC: rows made from their initial value,
row-sparse updates applied once, every bad request refused with the state
unchanged, lazy Adam as a plain reference computes it."""

import contextlib
import json

import grpc
import numpy as np
import pytest
import pytest_asyncio

from psfw.base.errors import ShardError
from psfw.compute.row_optimizers import RowOptimizer
from psfw.compute.tables import TableSpec, check_table_optimizer, initial_rows, route
from psfw.proto import ps_pb2 as pb
from psfw.protocol.chunks import ChunkedMessage, chunked_deserializer, chunked_serializer
from psfw.protocol.messages import GetHeader, RowBlock, UpdateHeader
from psfw.runtime.shard_client import ShardClient
from psfw.services.server import ShardServer

from helpers import SGD

pytestmark = pytest.mark.unit

SPEC = TableSpec(rows=1000, dim=3, init="normal", scale=0.1)
UNBOUNDED = TableSpec(rows=None, dim=2, init="uniform", scale=1.0)


def declaration(optimizer=None) -> str:
    opt = check_table_optimizer(optimizer or {"name": "sgd", "learning_rate": 0.5})
    return json.dumps(
        {
            "emb": {**SPEC.describe(), "optimizer": opt, "seed": 7},
            "open": {**UNBOUNDED.describe(), "optimizer": opt, "seed": 7},
        }
    )


def mine(table: str, count: int, shard: int = 1, shards: int = 2, start: int = 0) -> np.ndarray:
    """``count`` ids of ``table`` that ``shard`` holds, sorted."""
    ids = np.arange(start, start + 20 * count, dtype=np.int64)
    return ids[route(table, ids, shards) == shard][:count]


@contextlib.asynccontextmanager
async def shard_of_tables(optimizer=None):
    """Shard 1 of 2 holding the tables "emb" (1000 x 3) and "open" (unbounded ids, 2
    wide), trained by ``optimizer`` (default: sgd, lr 0.5)."""
    server = ShardServer(1, 2)
    await server.start("127.0.0.1:0")
    client = ShardClient(server.address, 1, timeout_s=10, retries=0)
    try:
        await client.put([], SGD, "", declaration(optimizer))
        yield server, client
    finally:
        await client.close()
        await server.stop(0)


@pytest_asyncio.fixture
async def table_shard():
    async with shard_of_tables() as running:
        yield running


def head(step=0, process=0, workers=1, rows=4, wpg=1, **fields) -> UpdateHeader:
    return UpdateHeader(
        group=0, step=step, process=process, workers=workers, rows=rows, workers_per_group=wpg, **fields
    )


def none(key):
    raise KeyError(key)


@pytest.mark.asyncio
async def test_pulled_rows_start_from_a_pure_function_of_seed_table_and_id(table_shard):
    """A row's first value does not depend on the shard, the shard count or the order."""
    server, client = table_shard
    ids = mine("emb", 6)
    got = await client.get(GetHeader(0, 0, [], 5, pull={"emb": ids[::-1][::-1]}), none)
    np.testing.assert_array_equal(got.table_rows["emb"].values, initial_rows(7, "emb", ids, SPEC))
    one_by_one = np.concatenate([initial_rows(7, "emb", ids[i : i + 1], SPEC) for i in range(len(ids))])
    np.testing.assert_array_equal(one_by_one, initial_rows(7, "emb", ids, SPEC))
    assert not np.array_equal(initial_rows(7, "emb", ids, SPEC), initial_rows(7, "other", ids, SPEC))
    assert not np.array_equal(initial_rows(7, "emb", ids, SPEC), initial_rows(8, "emb", ids, SPEC))
    big = np.array([0, 2**62 + 5, 2**63 - 1], np.int64)
    opened = mine("open", 3, start=2**40)
    got = await client.get(GetHeader(0, 0, [], 5, pull={"open": opened}), none)
    np.testing.assert_array_equal(got.table_rows["open"].values, initial_rows(7, "open", opened, UNBOUNDED))
    assert np.abs(initial_rows(7, "open", big, UNBOUNDED)).max() <= 1.0
    held = server.store.tables.tables
    assert held["emb"].count == 6 and held["open"].count == 3


def test_ids_spread_over_the_shards_whatever_their_pattern():
    """Small ids, ids of one stride and Zipf-hot ids all land on every shard about evenly."""
    for ids in (np.arange(4000), np.arange(0, 64000, 16), np.arange(0, 2**40, 2**28)):
        counts = np.bincount(route("emb", ids, 4), minlength=4)
        assert counts.min() > 0.8 * len(ids) / 4, counts
    assert (route("emb", np.arange(100), 4) != route("item", np.arange(100), 4)).any()


@pytest.mark.asyncio
async def test_a_row_update_is_applied_once_and_answers_the_next_rows(table_shard):
    """A retried Update is acknowledged, never added twice; the rows it pulls come
    after the step."""
    server, client = table_shard
    ids = mine("emb", 4)
    grads = np.arange(12, dtype=np.float32).reshape(4, 3)
    push = {"emb": RowBlock(ids, grads)}
    first = await client.update(head(push=push, pull={"emb": ids}), {}, none)
    expected = initial_rows(7, "emb", ids, SPEC) - 0.5 * grads / 4  # sgd, the mean over 4 rows
    np.testing.assert_allclose(first.table_rows["emb"].values, expected, rtol=1e-6)
    digest = server.store.digest()
    again = await client.update(head(push=push, pull={"emb": ids}), {}, none)
    assert again.step == 1 and server.store.digest() == digest
    np.testing.assert_array_equal(again.table_rows["emb"].values, first.table_rows["emb"].values)


@pytest.mark.asyncio
async def test_two_processes_pushes_add_up_before_the_update(table_shard):
    server, client = table_shard
    ids = mine("emb", 5)
    a, b = ids[[0, 1, 2]], ids[[1, 3, 4]]
    ga, gb = np.ones((3, 3), np.float32), np.full((3, 3), 2.0, np.float32)
    import asyncio

    await asyncio.gather(
        client.update(head(process=0, rows=2, wpg=2, push={"emb": RowBlock(a, ga)}), {}, none),
        client.update(head(process=1, rows=2, wpg=2, push={"emb": RowBlock(b, gb)}), {}, none),
    )
    rows = (await client.get(GetHeader(0, 1, [], 5, pull={"emb": ids}), none)).table_rows["emb"].values
    total = {int(i): 0.0 for i in ids}
    for i in a:
        total[int(i)] += 1.0
    for i in b:
        total[int(i)] += 2.0
    step = np.array([total[int(i)] for i in ids], np.float32)[:, None] / 4
    np.testing.assert_allclose(rows, initial_rows(7, "emb", ids, SPEC) - 0.5 * step, rtol=1e-6)


def _bad_pushes(ids):
    three = np.ones((len(ids), 3), np.float32)
    other_shard = mine("emb", 2, shard=0)
    return {
        "out of range": ({"emb": RowBlock(np.array([5, 1000], np.int64), np.ones((2, 3), np.float32))}, "outside"),
        "negative": ({"emb": RowBlock(np.array([-1], np.int64), np.ones((1, 3), np.float32))}, "outside"),
        "unsorted": ({"emb": RowBlock(ids[::-1].copy(), three)}, "not sorted and unique"),
        "repeated": ({"emb": RowBlock(np.repeat(ids[:1], 2), np.ones((2, 3), np.float32))}, "not sorted and unique"),
        "another shard's": ({"emb": RowBlock(other_shard, np.ones((2, 3), np.float32))}, "belongs to another shard"),
        "wrong width": ({"emb": RowBlock(ids, np.ones((len(ids), 4), np.float32))}, "the table's are float32[3, 3]"),
        "nan row": ({"emb": RowBlock(ids, np.where(np.eye(len(ids), 3) > 0, np.nan, 1).astype(np.float32))}, "NaN"),
        "unknown table": ({"nope": RowBlock(ids, three)}, "no embedding table 'nope'"),
    }


@pytest.mark.asyncio
@pytest.mark.parametrize("case", sorted(_bad_pushes(np.arange(3))))
async def test_a_bad_push_is_refused_and_changes_nothing(table_shard, case):
    server, client = table_shard
    ids = mine("emb", 3)
    await client.get(GetHeader(0, 0, [], 5, pull={"emb": ids}), none)
    before = server.store.digest()
    push, fragment = _bad_pushes(ids)[case]
    with pytest.raises(ShardError) as err:
        await client.update(head(push=push), {}, none)
    assert err.value.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    assert fragment in str(err.value)
    assert server.store.digest() == before
    assert server.store.group_step(0) == 0


@pytest.mark.asyncio
async def test_malformed_row_bytes_are_refused_with_the_state_unchanged(table_shard):
    server, client = table_shard
    before = server.store.digest()
    channel = grpc.aio.insecure_channel(server.address)
    update = channel.stream_stream(
        "/psfw.v1.ParameterServer/Update",
        request_serializer=chunked_serializer(pb.UpdateRequest),
        response_deserializer=chunked_deserializer(pb.UpdateReply),
    )
    ids = mine("emb", 2)
    cases = {
        "ids not whole int64": (pb.RowBlock(table="emb", ids=b"\0" * 12, values=b"", dim=3), "not whole int64"),
        "values short": (pb.RowBlock(table="emb", ids=ids.tobytes(), values=b"\0" * 8, dim=3), "bytes of values"),
    }
    try:
        for block, fragment in cases.values():
            request = pb.UpdateRequest(group=0, step=0, process=0, workers=1, rows=2, workers_per_group=1, wait_s=2)
            request.push.append(block)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in update(iter([ChunkedMessage(request, [])]), timeout=10):
                    pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in err.value.details()
        bad_pull = pb.GetRequest(
            group=0, step=0, wait_s=1, pull=[pb.RowBlock(table="emb", ids=np.array([4000]).tobytes())]
        )
        get = channel.unary_stream("/psfw.v1.ParameterServer/Get", request_serializer=pb.GetRequest.SerializeToString)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in get(bad_pull, timeout=10):
                pass
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "outside 0..999" in err.value.details()
    finally:
        await channel.close()
    assert server.store.digest() == before


@pytest.mark.asyncio
async def test_another_table_declaration_is_refused(table_shard):
    _, client = table_shard
    await client.put([], SGD, "", declaration())  # the same again: acknowledged
    with pytest.raises(ShardError, match="other embedding tables"):
        await client.put([], SGD, "", declaration({"name": "adagrad", "learning_rate": 0.1}))


def lazy_adam_reference(rows, grads_by_step, lr=0.01, b1=0.9, b2=0.999, eps=1e-8):
    """Adam on each row by itself, for the steps that touch it (``grads_by_step``:
    per step, {row: gradient}); a row's bias correction counts its own updates."""
    rows = {k: v.astype(np.float64) for k, v in rows.items()}
    m = {k: 0.0 for k in rows}
    v = {k: 0.0 for k in rows}
    t = {k: 0 for k in rows}
    for grads in grads_by_step:
        for k, g in grads.items():
            t[k] += 1
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            m_hat, v_hat = m[k] / (1 - b1 ** t[k]), v[k] / (1 - b2 ** t[k])
            rows[k] = rows[k] - lr * m_hat / (np.sqrt(v_hat) + eps)
    return rows


@pytest.mark.asyncio
async def test_lazy_adam_moves_only_touched_rows_as_the_reference_does():
    async with shard_of_tables({"name": "adam", "learning_rate": 0.01}) as (_, client):
        ids = mine("emb", 6)
        rng = np.random.default_rng(0)
        start = dict(zip(ids.tolist(), initial_rows(7, "emb", ids, SPEC), strict=True))
        history = []
        for step in range(6):
            touched = np.sort(rng.choice(ids, 3, replace=False))  # rows first seen late, rows skipped
            grads = rng.normal(size=(3, 3)).astype(np.float32)
            await client.update(head(step=step, rows=1, push={"emb": RowBlock(touched, grads)}), {}, none)
            history.append({int(k): g for k, g in zip(touched, grads, strict=True)})
        got = (await client.get(GetHeader(0, 6, [], 5, pull={"emb": ids}), none)).table_rows["emb"].values
        expected = lazy_adam_reference(start, history)
        np.testing.assert_allclose(got, np.stack([expected[int(i)] for i in ids]), rtol=1e-5, atol=1e-6)
        never = [int(i) for i in ids if all(int(i) not in h for h in history)]
        for i in never:
            np.testing.assert_array_equal(got[list(ids).index(i)], start[i])


def test_global_bias_correction_counts_the_tables_updates():
    """TensorFlow's LazyAdam: a row first seen after the table's 10,000th update
    gets a first step of about 3.16 lr (1-b1)/sqrt(1-b2); per-row correction gives
    every row's first step about 1 lr."""
    spec = check_table_optimizer({"name": "adam", "learning_rate": 0.1, "bias_correction": "global"})
    opt = RowOptimizer(spec)
    rows, g = np.zeros((1, 1), np.float32), np.ones((1, 1), np.float32)
    moved, _ = opt.apply(rows, opt.initial_state(1, 1), g, updates=10_000)
    per_row = RowOptimizer(check_table_optimizer({"name": "adam", "learning_rate": 0.1}))
    first, _ = per_row.apply(rows, per_row.initial_state(1, 1), g, updates=10_000)
    assert abs(first[0, 0] + 0.1) < 1e-4
    assert abs(moved[0, 0] + 0.316) < 0.01


@pytest.mark.asyncio
async def test_an_update_that_would_overflow_a_rows_state_is_refused():
    """A finite gradient of 1e20 squares to Inf in Adagrad's accumulator: refused,
    nothing written (that row would never move again)."""
    async with shard_of_tables({"name": "adagrad", "learning_rate": 0.1}) as (server, client):
        ids = mine("emb", 2)
        await client.get(GetHeader(0, 0, [], 5, pull={"emb": ids}), none)
        before = server.store.digest()
        huge = np.full((2, 3), 1e20, np.float32)
        with pytest.raises(ShardError, match="NaN or Inf"):
            await client.update(head(rows=1, push={"emb": RowBlock(ids, huge)}), {}, none)
        assert server.store.digest() == before


@pytest.mark.asyncio
async def test_a_materialized_table_comes_back_from_its_checkpoint_as_it_was(tmp_path):
    from psfw.services.store import ShardStore

    opt = check_table_optimizer({"name": "adagrad", "learning_rate": 0.5})
    spec = {**SPEC.describe(), "optimizer": opt, "seed": 7, "materialize": True}
    store = ShardStore(0, 1, checkpoints=tmp_path)  # a checkpoint is complete with every shard's file
    await store.put({}, SGD, tables=json.dumps({"emb": spec}))
    table = store.tables.tables["emb"]
    held = table.count
    assert held == 1000  # every row, made at once
    ids = np.arange(4, dtype=np.int64)
    await store.update(head(rows=1, push={"emb": RowBlock(ids, np.ones((4, 3), np.float32))}, checkpoint_every=1), {})
    await store.flush_checkpoints()
    digest = store.digest()
    again = ShardStore(0, 1, checkpoints=tmp_path)
    assert await again.load_newest() == 1
    assert again.tables.tables["emb"].count == held
    assert again.digest() == digest


@pytest.mark.asyncio
async def test_in_process_rows_of_other_dtypes_are_taken_as_the_wire_takes_them():
    """int32 ids and float64 rows work as over gRPC; strings do not, in one line."""
    from psfw.runtime.inprocess import InProcessClient

    server = ShardServer(1, 2)  # not started: its store is called directly
    client = InProcessClient(server, 1)
    await client.put([], SGD, "", declaration())
    ids = mine("emb", 3)
    answer = await client.update(
        head(rows=1, push={"emb": RowBlock(ids.astype(np.int32), np.ones((3, 3)))}, pull={"emb": list(ids)}), {}, none
    )
    np.testing.assert_allclose(answer.table_rows["emb"].values, initial_rows(7, "emb", ids, SPEC) - 0.5)
    with pytest.raises(ShardError, match="ids must be integers"):
        await client.get(GetHeader(0, 1, [], 5, pull={"emb": np.array(["a"])}), none)
