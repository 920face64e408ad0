"""``psfw bench --sparse --stream`` with tiny numbers: its figures agree with each
other and with the rules they measure (this checks the harness and the rules, not
the speed)."""

import json

import pytest

from psfw.tools.event_stream import EventStream, tail_range


@pytest.mark.unit
def test_the_stream_holds_about_the_distinct_ids_asked_for_and_a_prefix_is_the_same_stream():
    stream = EventStream(200_000, 50_000, batch=1000, seed=3)
    seen = set()
    batches = []
    while stream.made < stream.events:
        batches.append(stream.next_batch())
        seen.update(batches[-1].tolist())
    assert len(batches) == stream.steps == 200
    assert 0.9 * 50_000 < len(seen) < 1.05 * 50_000
    prefix = EventStream(200_000, 50_000, batch=1000, seed=3)
    got = [prefix.next_batch(until=4500) for _ in range(6)]
    assert [len(b) for b in got] == [1000, 1000, 1000, 1000, 500, 0]
    for mine, whole in zip(got, batches):
        assert (mine == whole[: len(mine)]).all(), "the first 4,500 events of the same stream"


@pytest.mark.unit
def test_a_stream_too_short_for_its_distinct_ids_is_refused_saying_what_to_change():
    with pytest.raises(ValueError, match="raise --events or lower --distinct"):
        EventStream(1000, 900)
    assert tail_range(2000, 1000) > 1000


@pytest.mark.slow
def test_the_stream_bench_holds_the_cap_the_frequent_ids_and_counts_every_row():
    """A stream of 30,000 events in steps of 256 under admit_after 2, expire_after
    30 and max_rows 600 (300 a shard), sampled after every step, and its first
    15,000 events without the cap."""
    from psfw.tools.stream_bench import run_stream

    figures = run_stream(
        events=30_000,
        distinct=5_000,
        max_rows=600,
        expire_after=30,
        admit_after=2,
        uncapped_events=15_000,
        sample_every=1,
        batch=256,
    )
    json.dumps(figures)  # what --json prints
    capped, uncapped = "stream_capped_", "stream_uncapped_"
    assert figures[capped + "steps"] == 118 and figures[uncapped + "steps"] == 59
    assert figures[capped + "shard_cap"] == 300
    for key in (capped, uncapped):
        steps = figures[key + "sample_steps"]
        assert steps == list(range(figures[key + "steps"] + 1)), "a sample after every step, and one before"
        assert all(len(r) == 2 and min(r) > 0 for r in figures[key + "rss_mb"])
        assert len(figures[key + "rss_mb"]) == len(steps) == len(figures[key + "rows_held"])
        # every row made was admitted and every row gone expired or was evicted: the rest are held
        for shard in range(2):
            gone = figures[key + "expired"][shard] + figures[key + "evicted"][shard]
            assert figures[key + "admitted"][shard] - gone == figures[key + "rows_held"][-1][shard]
        assert figures[key + "bytes_per_step"] > 0 and figures[key + "steps_per_s"] > 0
    held = figures[capped + "rows_held"]
    assert max(max(r) for r in held) == 300, "the cap binds, and is never passed after a step"
    assert max(max(w) for w in figures[capped + "ids_waiting"]) <= 300, "the ids waiting, no more than the cap"
    assert min(figures[capped + "evicted"]) > 0
    assert max(max(r) for r in figures[uncapped + "rows_held"]) > 300, "without the cap, more rows"
    assert min(figures[uncapped + "expired"]) > 0 and figures[uncapped + "evicted"] == [0, 0]
    assert figures[capped + "head_held_share"] >= 0.9, "the frequent ids hold the rows"
