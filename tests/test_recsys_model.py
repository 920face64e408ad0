"""The recommendation workload: the click log, its teacher, the AUC, and the
factorization machine, trained densely in plain JAX as the reference that the
sparse tables must match."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from psfw.compute.clicks import auc, click_log, teacher, teacher_auc
from psfw.compute.netgraph import check_layers
from psfw.compute.params import flatten_params
from psfw.compute.recsys import factorization_machine
from psfw.compute.tables import initial_rows

SMALL = {"users": 500, "items": 50, "train": 4000, "test": 1000}

# The reference training: Adagrad on every parameter, one pass over the default click
# log (1464 steps; the tables have no weight decay, so a second pass overfits the rare
# ids). The initial accumulator must be about 0: a row's mean-loss gradient is of the
# order 1/batch, so optax's default of 0.1 would damp every rare row to nothing.
LEARNING_RATE, BATCH = 0.2, 2048


def brute_force_auc(labels, scores):
    positives, negatives = scores[labels == 1], scores[labels == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(positives, negatives))
    return wins / (len(positives) * len(negatives))


@pytest.mark.unit
def test_auc_counts_the_pairs_a_positive_wins_ties_half():
    rng = np.random.default_rng(0)
    for size in (2, 3, 10, 57):
        labels = rng.integers(0, 2, size).astype(np.float32)
        labels[:2] = [0, 1]
        scores = rng.integers(0, 5, size).astype(np.float32)  # many ties
        assert auc(labels, scores) == pytest.approx(brute_force_auc(labels, scores))
        scores = rng.normal(size=size)
        assert auc(labels, scores) == pytest.approx(brute_force_auc(labels, scores))
    assert auc([0, 1, 1], [0.0, 1.0, 1.0]) == 1.0
    assert auc([1, 0], [0.0, 1.0]) == 0.0
    assert np.isnan(auc([1, 1], [0.0, 1.0]))


@pytest.mark.unit
def test_click_log_is_a_function_of_its_seed():
    data = click_log(**SMALL)
    again = click_log(**SMALL)
    other = click_log(**SMALL, seed=1)
    assert data.classes is None
    assert data.x_train.dtype == np.int64 and data.x_train.shape == (4000, 2) and data.x_test.shape == (1000, 2)
    assert data.y_train.dtype == np.float32 and data.y_train.shape == (4000,)
    assert set(np.unique(data.y_train)) == {0.0, 1.0}
    for a, b in zip(data, again):
        if a is not None:
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(data.x_train, other.x_train)
    # the test rows and the teacher do not depend on the training set's size
    np.testing.assert_array_equal(click_log(**{**SMALL, "train": 10}).x_test, data.x_test)
    assert teacher_auc(**SMALL) == teacher_auc(**{**SMALL, "train": 10})
    for x in (data.x_train, data.x_test):
        assert x[:, 0].min() >= 0 and x[:, 0].max() < 500
        assert x[:, 1].min() >= 0 and x[:, 1].max() < 50


@pytest.mark.unit
def test_hot_ids_are_spread_over_the_id_range():
    data = click_log(users=10_000, items=1_000, train=100_000, test=10)
    for column, size in ((0, 10_000), (1, 1_000)):
        counts = np.bincount(data.x_train[:, column], minlength=size)
        hottest = np.argsort(-counts)[:10]
        assert counts[hottest[0]] > 100 * np.median(counts)  # Zipf: a few ids take much of the log
        assert hottest.max() > size // 10  # renamed: the hot ids are not 0, 1, 2...


@pytest.mark.unit
def test_clicks_follow_the_teacher():
    data = click_log(**{**SMALL, "train": 20_000})
    logits = teacher(500, 50, 4, 0).logits(data.x_train)
    assert auc(data.y_train, logits) > 0.75
    assert teacher_auc() > 0.8
    assert teacher_auc(noise=3.0) < teacher_auc()  # noise no model can learn


@pytest.mark.unit
def test_factorization_machine_declares_its_tables_and_layers():
    model = factorization_machine(100, None, dim=8)
    assert model.tables["user"].rows == 100 and model.tables["item"].rows is None
    assert model.tables["user"].dim == model.tables["item"].dim == 9
    params = model.init(jax.random.key(0))
    flat, _ = flatten_params(params)
    assert list(flat) == ["bias/b"]
    assert check_layers(model.layers, list(flat)) == model.layers
    x = np.array([[3, 7], [5, 123456789]], np.int64)
    ids = model.ids(x)
    np.testing.assert_array_equal(ids["user"], [3, 5])
    np.testing.assert_array_equal(ids["item"], [7, 123456789])
    embedded = {"user": jnp.ones((2, 9)), "item": jnp.full((2, 9), 2.0)}
    np.testing.assert_allclose(model.score(params, x, embedded), [8 * 2 + 1 + 2] * 2)
    loss, metrics = model.loss(params, x, jnp.array([1.0, 0.0]), embedded)
    assert loss == pytest.approx((np.logaddexp(0, -19) + np.logaddexp(0, 19)) / 2)
    assert metrics["accuracy"] == 0.5


def test_dense_reference_training_comes_near_the_teacher():
    data, best = click_log(), teacher_auc()
    model = factorization_machine(10_000, 1_000)
    params = {
        "dense": model.init(jax.random.key(0)),
        "tables": {name: initial_rows(0, name, np.arange(spec.rows), spec) for name, spec in model.tables.items()},
    }

    def scores(params, x, ids):
        embedded = {name: jnp.take(params["tables"][name], rows, axis=0) for name, rows in ids.items()}
        return model.score(params["dense"], x, embedded), embedded

    def loss(params, x, ids, y):
        return model.loss(params["dense"], x, y, scores(params, x, ids)[1])[0]

    optimizer = optax.adagrad(LEARNING_RATE, initial_accumulator_value=0.0)
    state = optimizer.init(params)

    @jax.jit
    def step(params, state, x, ids, y):
        updates, state = optimizer.update(jax.grad(loss)(params, x, ids, y), state, params)
        return optax.apply_updates(params, updates), state

    for start in range(0, len(data.x_train) - BATCH + 1, BATCH):
        x, y = data.x_train[start : start + BATCH], data.y_train[start : start + BATCH]
        params, state = step(params, state, x, model.ids(x), y)
    reached = auc(data.y_test, np.asarray(jax.jit(scores)(params, data.x_test, model.ids(data.x_test))[0]))
    assert best - reached < 0.02, f"test AUC {reached:.4f}, the teacher's {best:.4f}"
