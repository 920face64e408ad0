import numpy as np
import pytest

from psfw.compute.batching import BatchOrder, split_batch, split_sizes

pytestmark = pytest.mark.unit


def test_split_sizes_gives_the_remainder_to_the_last_worker():
    assert split_sizes(10, 3) == [3, 3, 4]
    assert split_sizes(256, 2) == [128, 128]
    assert sum(split_sizes(1001, 7)) == 1001


def test_split_sizes_rejects_a_batch_smaller_than_the_workers():
    with pytest.raises(ValueError, match="cannot feed 4 workers"):
        split_sizes(3, 4)


def test_split_batch_keeps_rows_in_order_and_splits_tuples_alike():
    x = np.arange(10)
    parts = split_batch((x, -x), 3)
    assert [len(p[0]) for p in parts] == [3, 3, 4]
    assert np.array_equal(np.concatenate([p[0] for p in parts]), x)
    assert np.array_equal(np.concatenate([p[1] for p in parts]), -x)


def test_batch_order_is_deterministic_and_covers_an_epoch_without_repeats():
    order = BatchOrder(rows=100, batch_size=10, seed=3)
    again = BatchOrder(rows=100, batch_size=10, seed=3)
    epoch = np.concatenate([order.indices(s) for s in range(order.steps_per_epoch)])
    assert sorted(epoch) == list(range(100))
    assert all(np.array_equal(order.indices(s), again.indices(s)) for s in range(25))
    assert not np.array_equal(order.indices(0), order.indices(10)), "each epoch reshuffles"


def test_worker_indices_are_the_split_of_the_group_batch():
    order = BatchOrder(rows=50, batch_size=11, seed=0)
    parts = [order.worker_indices(4, w, 3) for w in range(3)]
    assert np.array_equal(np.concatenate(parts), order.indices(4))
