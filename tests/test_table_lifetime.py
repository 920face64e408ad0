"""How long a table's rows live on a shard: admission after ``admit_after`` steps,
expiry after ``expire_after`` steps untouched, a cap of rows with the least recently
used going first; deterministic over shard counts and across a checkpoint; the
defaults exactly as before."""

import hashlib
import json

import numpy as np
import pytest

from psfw.compute.tables import TableSpec, check_table_optimizer, initial_rows, route
from psfw.protocol.messages import RowBlock
from psfw.services.table_lifetime import WaitingIds, oldest
from psfw.services.tables import ShardTables, parse_tables

pytestmark = pytest.mark.unit

SPEC = TableSpec(rows=None, dim=2, init="normal", scale=0.1)
SGD = check_table_optimizer({"name": "sgd", "learning_rate": 0.5})
ADAGRAD = check_table_optimizer({"name": "adagrad", "learning_rate": 0.5})


def tables(shard: int = 0, shards: int = 1, optimizer=SGD, **lifetime) -> ShardTables:
    """The tables of one shard: "t", unbounded ids, 2 wide, with ``lifetime``'s rules."""
    out = ShardTables(shard, shards)
    out.declare(json.dumps({"t": {**SPEC.describe(), "optimizer": optimizer, "seed": 3, **lifetime}}))
    return out


def step(shard: ShardTables, ids, grad: float = 1.0) -> np.ndarray:
    """One group step as a stub drives it: pull the rows of ``ids`` (those the shard
    holds), push a gradient of ``grad`` for each, commit. Returns what was pulled."""
    ids = np.unique(np.asarray(ids, np.int64))
    ids = ids[route("t", ids, shard.shards) == shard.shard]
    pulled = shard.read({"t": ids})["t"].values
    plans = shard.plan([{"t": RowBlock(ids, np.full((len(ids), 2), grad, np.float32))}], 1.0)
    shard.commit(plans)
    return pulled


def rows_of(shard: ShardTables) -> dict[int, np.ndarray]:
    table = shard.tables["t"]
    return {int(i): table.values[s].copy() for s, i in enumerate(table.ids[: table.count])}


def test_an_id_gets_its_row_at_its_admit_after_th_step_and_reads_zeros_until_then():
    """admit_after = 3: the first two steps that use an id read zeros and drop its
    gradient; at the third its row starts from its initial value and trains."""
    shard = tables(admit_after=3)
    init = initial_rows(3, "t", np.array([5]), SPEC)[0]
    for _ in range(2):
        assert (step(shard, [5]) == 0).all()
        assert shard.tables["t"].count == 0
    assert len(shard.tables["t"].waiting) == 1
    np.testing.assert_array_equal(step(shard, [5])[0], init)  # admitted: the initial row, trained from now
    np.testing.assert_allclose(rows_of(shard)[5], init - 0.5)
    assert shard.tables["t"].admitted == 1 and len(shard.tables["t"].waiting) == 0


def test_a_row_untouched_for_expire_after_steps_goes_with_its_state_and_comes_back_new():
    """expire_after = 2: a row that one step left untouched stays, one that two steps
    left untouched goes; used again, it starts from its initial value and fresh state."""
    shard = tables(optimizer=ADAGRAD, expire_after=2)
    step(shard, [1, 2])
    trained = rows_of(shard)[1]
    step(shard, [2])
    assert 1 in rows_of(shard), "untouched for 1 step: still held"
    step(shard, [2])
    assert 1 not in rows_of(shard) and shard.tables["t"].expired == 1
    pulled = step(shard, [1])
    np.testing.assert_array_equal(pulled[0], initial_rows(3, "t", np.array([1]), SPEC)[0])
    assert not np.allclose(pulled[0], trained)
    table = shard.tables["t"]
    slot = int(np.flatnonzero(table.ids[: table.count] == 1)[0])
    # the accumulator holds one step's squared gradient on its initial value, not the earlier steps' too
    assert (table.state["accumulator"][slot] < 2.0).all() and (table.state["accumulator"][slot] > 1.0).all()


def test_past_the_cap_the_least_recently_used_rows_go_and_ties_go_by_id():
    """max_rows = 3 on one shard: the rows used longest ago go first; among rows last
    used at the same step, the smaller ids go first."""
    shard = tables(max_rows=3)
    step(shard, [10, 11])
    step(shard, [12, 13, 14])  # 5 rows: the 2 of the older step go
    assert sorted(rows_of(shard)) == [12, 13, 14] and shard.tables["t"].evicted == 2
    step(shard, [13, 15])  # 4 rows: 12 and 14 tie as least recent, 12 goes
    assert sorted(rows_of(shard)) == [13, 14, 15]


def test_the_cap_over_shards_is_divided_by_the_routing():
    """max_rows is over every shard: each of 4 holds at most a quarter (rounded up)."""
    shards = [tables(i, 4, max_rows=10) for i in range(4)]
    ids = np.arange(200)
    for shard in shards:
        step(shard, ids)
        assert shard.tables["t"].count <= 3


@pytest.mark.parametrize("shards", [2, 3])
def test_admission_and_expiry_are_the_same_whatever_the_number_of_shards(shards):
    """The same stream of steps through 1 shard and through several: the same rows
    (ids and values) held at every step, the same admissions and expiries."""
    rng = np.random.default_rng(0)
    stream = [rng.zipf(1.5, 40) % 300 for _ in range(60)]
    rules = {"admit_after": 2, "expire_after": 5}
    one, many = tables(**rules), [tables(i, shards, **rules) for i in range(shards)]
    for ids in stream:
        step(one, ids)
        for shard in many:
            step(shard, ids)
        held = {}
        for shard in many:
            held.update(rows_of(shard))
        alone = rows_of(one)
        assert held.keys() == alone.keys()
        for i, value in alone.items():
            np.testing.assert_array_equal(held[i], value)
    for what in ("admitted", "expired"):
        assert getattr(one.tables["t"], what) == sum(getattr(s.tables["t"], what) for s in many)
    assert one.tables["t"].expired > 0 and len(one.tables["t"].waiting) > 0, "the stream exercised both rules"


def test_a_checkpoint_keeps_the_counts_and_last_uses_and_resumes_to_the_same_rows():
    """Snapshot mid-stream, load it, go on: the rows, the ids waiting and the
    counters equal those of the shard that never stopped."""
    rng = np.random.default_rng(1)
    stream = [rng.zipf(1.4, 30) % 200 for _ in range(50)]
    rules = {"admit_after": 2, "expire_after": 4, "max_rows": 40}
    kept = tables(**rules)
    for ids in stream[:25]:
        step(kept, ids)
    tensors, meta = kept.snapshot()
    resumed = ShardTables.load(0, 1, tensors, json.loads(json.dumps(meta)))
    for ids in stream[25:]:
        step(kept, ids)
        step(resumed, ids)
    assert _digest(kept) == _digest(resumed)
    for what in ("admitted", "expired", "evicted"):
        assert getattr(kept.tables["t"], what) == getattr(resumed.tables["t"], what)


def test_the_default_rules_keep_every_row_as_before_and_leave_the_declaration_as_it_was():
    """No admission, expiry or cap unless asked: every id used gets a row at once and
    keeps it; the declaration reads as one made before the rules existed."""
    shard = tables()
    for ids in ([1, 2], [3], [4], [5]):
        step(shard, ids)
    assert sorted(rows_of(shard)) == [1, 2, 3, 4, 5]
    assert shard.tables["t"].expired == shard.tables["t"].evicted == 0
    declared = parse_tables(json.dumps({"t": {**SPEC.describe(), "optimizer": SGD, "seed": 3}}))
    assert set(declared["t"]) == {"rows", "dim", "init", "scale", "optimizer", "seed", "materialize"}


@pytest.mark.parametrize(
    ("rules", "says"),
    [
        ({"admit_after": 0}, "admit_after 0 must be a whole number from 1"),
        ({"expire_after": -1}, "expire_after -1"),
        ({"max_rows": 1.5}, "max_rows 1.5"),
    ],
)
def test_a_declaration_with_bad_rules_is_refused_saying_which(rules, says):
    with pytest.raises(Exception) as err:
        parse_tables(json.dumps({"t": {**SPEC.describe(), "optimizer": SGD, "seed": 3, **rules}}))
    assert says in str(err.value)


def test_removing_rows_keeps_the_index_and_the_rows_that_stay():
    """Rows removed from anywhere (bounded and unbounded tables): every id that stays
    finds its own row, the removed ones none."""
    rng = np.random.default_rng(2)
    for rows in (None, 500):
        spec = {**TableSpec(rows=rows, dim=2).describe(), "optimizer": SGD, "seed": 1}
        shard = ShardTables(0, 1)
        shard.declare(json.dumps({"t": spec}))
        table = shard.tables["t"]
        ids = np.unique(rng.integers(0, 500, 200))
        shard.read({"t": ids})
        before = {int(i): table.values[s].copy() for s, i in enumerate(table.ids[: table.count])}
        gone = rng.random(table.count) < 0.4
        gone_ids = set(table.ids[: table.count][gone].tolist())
        table.remove(gone)
        assert table.count == len(ids) - len(gone_ids)
        slots = table.lookup(ids)
        for i, slot in zip(ids.tolist(), slots.tolist(), strict=True):
            if i in gone_ids:
                assert slot == -1
            else:
                np.testing.assert_array_equal(table.values[slot], before[i])


def test_the_least_recently_used_are_found_with_ties_by_id():
    last = np.array([5, 1, 3, 1, 1, 9])
    ids = np.array([60, 50, 40, 30, 20, 10])
    assert np.flatnonzero(oldest(last, ids, 2)).tolist() == [3, 4]  # ids 30 and 20 of the three at step 1
    assert oldest(last, ids, 4).sum() == 4 and oldest(last, ids, 4)[2]


def test_ids_waiting_are_forgotten_when_untouched_and_past_their_limit():
    waiting = WaitingIds()
    waiting.used(np.array([1, 5, 9]), now=0)
    waiting.used(np.array([5, 7]), now=3)
    assert waiting.counts_of(np.array([1, 5, 7, 8])).tolist() == [1, 2, 1, 0]
    waiting.forget(now=5, after=3, limit=0)
    assert waiting.ids.tolist() == [5, 7]
    waiting.forget(now=5, after=0, limit=1)
    assert waiting.ids.tolist() == [7]  # same last use: the smaller id goes first


def _digest(shard: ShardTables) -> str:
    h = hashlib.sha256()
    shard.digest_into(h)
    return h.hexdigest()
