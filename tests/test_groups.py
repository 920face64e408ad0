"""Groups that come and go, at the shard: a group that sends no Update for the job's
group timeout is gone (it no longer bounds the staleness, one log line says it, the
metrics count it out), one that reports again is back, and a group the job did not
start with joins at the step where the job stands, up to ``cluster.max_groups``.
Without a timeout and without joins, every group counts for ever, as before."""

import asyncio
import json
import logging

import grpc
import numpy as np
import pytest

from psfw.base.errors import WireError
from psfw.jobs.config import parse_config
from psfw.protocol.messages import UpdateHeader
from psfw.runtime.sync import job_step
from psfw.services.metrics import ShardMetrics
from psfw.services.requests import describe_store
from psfw.services.store import ShardStore
from psfw.tools.cluster import format_status

pytestmark = pytest.mark.unit

SGD = json.dumps({"name": "sgd", "learning_rate": 0.1})
GRADS = {("w", 0): np.ones(4, np.float32)}


class Clock:
    """A clock the test moves (the presence's), so that no test waits out a timeout."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _store(clock: Clock | None = None) -> ShardStore:
    store = ShardStore()
    await store.put({("w", 0): np.zeros(4, np.float32)}, SGD)
    if clock is not None:
        store.presence.clock = clock
    return store


def _head(group: int, step: int, **job) -> UpdateHeader:
    settings = {"worker_groups": 2, "staleness": 1, "group_timeout_s": 10.0, "wait_s": 30.0, **job}
    return UpdateHeader(group=group, step=step, process=group, workers=1, rows=1, workers_per_group=1, **settings)


async def _steps(store: ShardStore, group: int, steps: range, **job) -> None:
    for step in steps:
        await store.update(_head(group, step, **job), GRADS)


async def _held(task: asyncio.Task) -> bool:
    """Whether ``task`` is still waiting after the loop ran everything else it could."""
    for _ in range(20):
        await asyncio.sleep(0)
    return not task.done()


def _active(store: ShardStore) -> float:
    return ShardMetrics(store).registry.get_sample_value("psfw_groups_active", {"shard": "0"})


@pytest.mark.asyncio
async def test_a_group_that_stops_reporting_holds_the_others_only_until_the_timeout(caplog):
    """Staleness 1: group 0 waits for group 1, which stopped at step 1; once group 1
    has sent nothing for the timeout, it is gone (one line, the metrics), and group
    0 goes on."""
    clock = Clock()
    store = await _store(clock)
    await _steps(store, 1, range(1))
    await _steps(store, 0, range(2))
    held = asyncio.create_task(store.update(_head(0, 2), GRADS))  # 3 steps against 1: more than 1 ahead
    assert await _held(held)
    assert _active(store) == 2
    clock.now += 9.0
    await store.notify()  # any wake-up looks again: not gone yet
    assert await _held(held)
    with caplog.at_level(logging.WARNING, "psfw.server"):
        clock.now += 2.0
        await store.notify()
        result = await asyncio.wait_for(held, 10)
    assert result.step == 3 and result.slowest_step == 3  # group 1 no longer bounds it
    left = [r.getMessage() for r in caplog.records if "left" in r.getMessage()]
    assert left == [
        "shard 0: group 1 left: no Update for 11.0 s (cluster.group_timeout_s = 10); it no longer bounds the "
        "staleness; groups active: [0]"
    ]
    assert _active(store) == 1
    assert [(g.group, g.gone) for g in describe_store(store).groups] == [(0, False), (1, True)]
    await _steps(store, 0, range(3, 6))  # and on, unheld


@pytest.mark.asyncio
async def test_without_a_timeout_a_stopped_group_holds_the_others_until_their_wait_runs_out():
    """Today's rule where the config sets no group timeout: the wait ends in an
    error that names the group behind, however long the group has been quiet."""
    clock = Clock()
    store = await _store(clock)
    job = {"group_timeout_s": 0.0}
    await _steps(store, 1, range(1), **job)
    await _steps(store, 0, range(2), **job)
    clock.now += 1e6
    with pytest.raises(WireError) as err:
        await store.update(_head(0, 2, wait_s=0.0, **job), GRADS)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "group 0 may not start step 3 with staleness 1: groups [1] are further behind" in err.value.message
    assert store.presence.gone == set() and _active(store) == 2


@pytest.mark.asyncio
async def test_groups_in_lockstep_never_count_one_as_gone():
    """Staleness 0 is one synchronous step across groups: it waits for every group."""
    clock = Clock()
    store = await _store(clock)
    job = {"staleness": 0}
    await asyncio.gather(_steps(store, 1, range(1), **job), _steps(store, 0, range(1), **job))
    clock.now += 1e6
    with pytest.raises(WireError, match="groups \\[1\\] are further behind"):
        await store.update(_head(0, 1, wait_s=0.0, **job), GRADS)
    assert store.presence.gone == set()


@pytest.mark.asyncio
async def test_a_group_that_never_reported_is_gone_a_timeout_after_the_shard_learnt_it():
    clock = Clock()
    store = await _store(clock)
    await _steps(store, 0, range(1))
    held = asyncio.create_task(store.update(_head(0, 1), GRADS))  # group 1 has not begun
    assert await _held(held)
    clock.now += 10.5
    await store.notify()
    assert (await asyncio.wait_for(held, 10)).step == 2
    assert store.presence.counted() == [0]


@pytest.mark.asyncio
async def test_an_asynchronous_group_that_reports_again_is_back_at_once(caplog):
    clock = Clock()
    store = await _store(clock)
    job = {"staleness": -1}
    await _steps(store, 1, range(1), **job)
    clock.now += 20
    await _steps(store, 0, range(3), **job)  # an Update of another group says it
    assert store.presence.gone == {1}
    with caplog.at_level(logging.WARNING, "psfw.server"):
        await _steps(store, 1, range(1, 2), **job)
    assert store.presence.gone == set() and _active(store) == 2
    assert "shard 0: group 1 is back at step 1; groups active: [0, 1]" in caplog.text


@pytest.mark.asyncio
async def test_a_group_back_from_far_behind_counts_again_once_within_the_bound():
    """A group stopped for long would hold every other one until it caught up: it
    trains meanwhile, and bounds the others again once it is within the bound."""
    clock = Clock()
    store = await _store(clock)
    await _steps(store, 1, range(1))
    await _steps(store, 0, range(1))
    clock.now += 20
    await _steps(store, 0, range(1, 5))  # group 1 is gone: group 0 runs ahead to 5
    assert store.presence.gone == {1}
    await _steps(store, 1, range(1, 4))  # at 3 when its last Update came: two behind group 0, bound 1
    assert store.presence.gone == {1}
    await _steps(store, 1, range(4, 5))  # at 4: within the bound
    assert store.presence.gone == set()
    await _steps(store, 0, range(5, 6))  # 6 against 5
    held = asyncio.create_task(store.update(_head(0, 6), GRADS))  # 7 against 5: held again
    assert await _held(held)
    await _steps(store, 1, range(5, 6))
    assert (await asyncio.wait_for(held, 10)).step == 7


@pytest.mark.asyncio
async def test_a_group_joins_at_the_step_where_the_job_stands_and_bounds_the_others(caplog):
    clock = Clock()
    store = await _store(clock)
    job = {"max_groups": 3}
    await asyncio.gather(_steps(store, 1, range(4), **job), _steps(store, 0, range(4), **job))
    with caplog.at_level(logging.WARNING, "psfw.server"):
        await _steps(store, 2, range(3, 4), **job)  # the job stands at 4 now: a step behind is fine
    assert "shard 0: group 2 joined at step 3; groups active: [0, 1, 2]" in caplog.text
    assert store.group_step(2) == 4 and _active(store) == 3
    held = asyncio.create_task(store.update(_head(0, 4, **job), GRADS))  # 5 against group 2's 4: fine
    assert (await asyncio.wait_for(held, 10)).step == 5
    held = asyncio.create_task(store.update(_head(0, 5, **job), GRADS))  # 6 against 4: held
    assert await _held(held)
    await _steps(store, 1, range(4, 5), **job)
    assert await _held(held), "the new group bounds it as the others do"
    await _steps(store, 2, range(4, 5), **job)
    assert (await asyncio.wait_for(held, 10)).step == 6


@pytest.mark.asyncio
async def test_a_group_the_job_does_not_take_is_refused_in_one_line_that_says_what_to_do():
    store = await _store()
    await _steps(store, 0, range(2), staleness=-1)
    cases = [
        (
            {},
            "group 2 step 0: the job has groups 0..1 (cluster.worker_groups) and takes no other: to let groups "
            "join a running job, set cluster.max_groups",
        ),
        ({"max_groups": 2}, "set cluster.max_groups"),  # as many as worker_groups: none joins
    ]
    for job, says in cases:
        with pytest.raises(WireError) as err:
            await store.update(_head(2, 0, staleness=-1, **job), GRADS)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and says in err.value.message
    with pytest.raises(WireError, match=r"the job takes groups 0..2 \(cluster.max_groups\): raise it"):
        await store.update(_head(3, 0, staleness=-1, max_groups=3), GRADS)
    with pytest.raises(WireError) as err:  # past every group: it joins where the job stands
        await store.update(_head(2, 5, staleness=-1, max_groups=3), GRADS)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "group 2 cannot join at step 5: no group is past step 2" in err.value.message
    for job in ({"max_groups": -2}, {"group_timeout_s": float("nan")}, {"group_timeout_s": -1.0}):
        with pytest.raises(WireError) as err:
            await store.update(_head(0, 2, staleness=-1, **job), GRADS)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(store.groups) == [0] and store.group_step(0) == 2  # nothing changed
    await _steps(store, 7, range(1, 2), staleness=-1, max_groups=-1)  # any number
    assert sorted(store.groups) == [0, 7]


@pytest.mark.asyncio
async def test_the_next_change_is_when_the_quietest_group_runs_out_of_time():
    clock = Clock()
    store = await _store(clock)
    assert store.presence.next_change_s() == float("inf")  # no timeout learnt yet
    await _steps(store, 0, range(1))
    clock.now += 4
    await _steps(store, 1, range(1))
    clock.now += 1
    assert store.presence.next_change_s() == pytest.approx(5.0)  # group 0's: quiet for 5 of 10 s


def test_where_a_running_job_stands_is_its_slowest_active_group():
    from psfw.proto import ps_pb2 as pb

    def reply(*groups):
        return pb.DescribeReply(groups=[pb.GroupInfo(group=g, step=s, gone=gone) for g, s, gone in groups])

    assert job_step([reply(), reply()]) == 0
    assert job_step([reply((0, 40, False), (1, 12, True)), reply((0, 39, False), (1, 12, True))]) == 39
    assert job_step([reply((0, 40, True), (1, 12, True))]) == 40  # every group gone: the furthest


def test_status_marks_the_groups_a_shard_counts_as_gone():
    row = {
        "shard": 0, "address": "127.0.0.1:1", "keys": 1, "slices": 1, "bytes": 16, "versions": (9, 9),
        "updates_per_s": None, "job": "-", "groups": {0: 9, 1: 3}, "gone": [1],
    }  # fmt: skip
    assert "g0@9 g1@3(gone)" in format_status([row])


@pytest.mark.parametrize(
    ("cluster", "says"),
    [
        ({"staleness": 0, "worker_groups": 2, "group_timeout_s": 5}, "cluster.group_timeout_s: groups in lockstep"),
        ({"staleness": 0, "max_groups": 3}, "cluster.max_groups: groups in lockstep"),
        ({"group_timeout_s": 5}, "cluster.group_timeout_s: a job of one group waits for its workers"),
        ({"worker_groups": 3, "max_groups": 2}, "cluster.max_groups: 2 is below cluster.worker_groups (3)"),
        ({"max_groups": 0}, 'cluster.max_groups: give a number of groups (at least 1), or "any" for no limit'),
        ({"worker_groups": 2, "group_timeout_s": 0}, "cluster.group_timeout_s: Input should be greater than 0"),
        (
            {"worker_groups": 2, "staleness": 2, "group_timeout_s": 120},
            "cluster.group_timeout_s: 120 s is not shorter than train.wait_s (120 s)",
        ),
    ],
)
def test_group_settings_that_cannot_work_are_refused_naming_the_key(cluster, says):
    from psfw.base.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        parse_config({"cluster": cluster}, "job.toml")
    assert str(err.value).startswith("job.toml: ") and says in str(err.value) and "\n" not in str(err.value)


def test_the_defaults_keep_groups_as_they_were():
    c = parse_config({"cluster": {"worker_groups": 2}}).cluster
    assert (c.group_timeout_s, c.max_groups, c.restart, c.groups_limit, c.groups_leave) == (None, None, False, 2, False)
    assert parse_config({"cluster": {"max_groups": "any", "group_timeout_s": 30}}).cluster.groups_limit is None
