"""Under load: 64 concurrent streams (32 groups x 2 shard processes) for a fixed time.
No errors, no lost or doubled update; the figures are printed, speed is not asserted."""

import json

import pytest

from psfw.tools.loadtest import load_test


@pytest.mark.slow
def test_64_streams_lose_nothing_and_double_nothing():
    figures = load_test(streams=32, seconds=4.0, mb_per_shard=0.25, max_updates=5000)
    print("\nload test:", json.dumps(figures))
    assert figures["streams"] == 64
    assert figures["errors"] == []
    assert figures["updates_sent"] > 0
    assert figures["lost"] == 0 and figures["doubled"] == 0
    assert figures["values_consistent"], figures
    assert figures["gets"] > 0
