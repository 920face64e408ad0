"""A synthetic click log for recommendation workloads, labelled by a hidden teacher.

Each row is one impression, ``(user id, item id)``, and its label whether it was
clicked. Ids are Zipf-distributed as FBGEMM's embedding benchmark draws them
(``rng.zipf(alpha)``, then ``(k - 1) % E``), then renamed by a fixed random
permutation, so that the hot ids are spread over the id range rather than being the
smallest ids. The teacher is a factorization machine: each user and item has a
latent vector and a bias, and a click's probability is the sigmoid of
``u . v + b_u + b_i + global bias`` (plus Gaussian ``noise`` on the logit, drawn per
impression). Training and test rows are independent draws of the same log.

Everything is numpy and a pure function of the options: the teacher, the training
rows and the test rows each have their own random stream of ``seed``, so the test
rows and the teacher do not depend on the training set's size.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from psfw.compute.datasets import Dataset

# The teacher's scales. Most of a user's clicks come from the Zipf tail, whose ids are
# seen a few times each: no model learns those, so the user's own bias is kept small,
# the items' (fewer, each seen often) large, and the interaction strong enough that a
# model of the biases alone falls well short of the teacher (about 0.05 AUC).
GLOBAL_BIAS = -1.0  # a click rate of about 0.3
USER_BIAS = 0.3  # deviation of a user's bias
ITEM_BIAS = 1.5  # deviation of an item's bias
LATENT = 1.0  # deviation of u . v over random pairs


class Teacher(NamedTuple):
    """The hidden click model: per-id latent vectors and biases, and the renaming
    of Zipf ranks to ids."""

    user_vectors: np.ndarray  # [users, dim]
    item_vectors: np.ndarray  # [items, dim]
    user_bias: np.ndarray  # [users]
    item_bias: np.ndarray  # [items]
    user_ids: np.ndarray  # Zipf rank -> user id
    item_ids: np.ndarray  # Zipf rank -> item id

    def logits(self, x: np.ndarray) -> np.ndarray:
        """The noiseless click logit of each ``(user, item)`` row, float64."""
        users, items = x[:, 0], x[:, 1]
        dot = np.einsum("nd,nd->n", self.user_vectors[users], self.item_vectors[items])
        return dot + self.user_bias[users] + self.item_bias[items] + GLOBAL_BIAS


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def teacher(users: int, items: int, dim: int, seed: int) -> Teacher:
    """The teacher of ``click_log`` with these options."""
    if min(users, items, dim) < 1:
        raise ValueError(f"users, items and dim must be at least 1, got {users}, {items}, {dim}")
    rng = _rng(seed, 0)
    # each coordinate of deviation (LATENT^2 / dim)^(1/4): the dot product of dim of them has deviation LATENT
    deviation = (LATENT**2 / dim) ** 0.25
    return Teacher(
        user_vectors=rng.normal(0, deviation, (users, dim)),
        item_vectors=rng.normal(0, deviation, (items, dim)),
        user_bias=rng.normal(0, USER_BIAS, users),
        item_bias=rng.normal(0, ITEM_BIAS, items),
        user_ids=rng.permutation(users),
        item_ids=rng.permutation(items),
    )


def zipf_ids(rng: np.random.Generator, alpha: float, count: int, size: int) -> np.ndarray:
    """``count`` Zipf ranks of ``size`` ids as FBGEMM's benchmark draws them: 0 is the
    hottest, and draws past ``size`` wrap around (int64)."""
    return (rng.zipf(alpha, count) - 1) % size


def _draw(model: Teacher, count: int, alpha: float, noise: float, rng: np.random.Generator):
    """``count`` impressions: int64 ``[count, 2]`` rows, float32 labels and the
    noiseless logits."""
    users = model.user_ids[zipf_ids(rng, alpha, count, len(model.user_ids))]
    items = model.item_ids[zipf_ids(rng, alpha, count, len(model.item_ids))]
    x = np.stack([users, items], axis=1).astype(np.int64)
    logits = model.logits(x)
    noisy = logits + rng.normal(0, noise, count) if noise > 0 else logits
    clicks = rng.random(count) < 1 / (1 + np.exp(-noisy))
    return x, clicks.astype(np.float32), logits


def _check(train: int, test: int, alpha: float, noise: float) -> None:
    if train < 1 or test < 1:
        raise ValueError(f"train and test must be at least 1 row, got {train} and {test}")
    if not alpha > 1:
        raise ValueError(f"alpha must be above 1 (a Zipf distribution's exponent), got {alpha}")
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise}")


def click_log(
    users: int = 10_000,
    items: int = 1_000,
    train: int = 3_000_000,
    test: int = 50_000,
    alpha: float = 1.2,
    dim: int = 4,
    noise: float = 0.0,
    seed: int = 0,
) -> Dataset:
    """A click log of ``users`` x ``items`` (see the module): ``x`` int64 ``[N, 2]``
    rows of (user id, item id), ``y`` float32 clicks in {0, 1}, ``classes`` None.
    ``alpha``: the Zipf exponent of both ids (above 1; nearer 1 is flatter);
    ``dim``: the teacher's latent width; ``noise``: the deviation of the per-click
    logit noise, which no model can learn.

    The defaults are one pass of about 1500 steps of 2048 rows: tables have no
    weight decay, so a second pass over the same clicks overfits the rare ids. A
    factorization machine trained so (Adagrad, learning rate 0.2, initial
    accumulator 0) comes within 0.01 of ``teacher_auc``."""
    _check(train, test, alpha, noise)
    model = teacher(users, items, dim, seed)
    x_train, y_train, _ = _draw(model, train, alpha, noise, _rng(seed, 1))
    x_test, y_test, _ = _draw(model, test, alpha, noise, _rng(seed, 2))
    return Dataset(x_train, y_train, x_test, y_test, classes=None)


def teacher_auc(
    users: int = 10_000,
    items: int = 1_000,
    train: int = 3_000_000,
    test: int = 50_000,
    alpha: float = 1.2,
    dim: int = 4,
    noise: float = 0.0,
    seed: int = 0,
) -> float:
    """The test AUC of the teacher's own click probabilities for ``click_log`` with
    the same options: what a perfectly trained model reaches (the noise aside, no
    ranking does better on average). Draws only the test rows."""
    _check(train, test, alpha, noise)
    _, labels, logits = _draw(teacher(users, items, dim, seed), test, alpha, noise, _rng(seed, 2))
    return auc(labels, logits)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """The ROC AUC of ``scores`` for binary ``labels`` (positive: > 0.5): the chance
    that a random positive scores above a random negative, a tie counting half.
    NaN when the labels are all of one class."""
    labels = np.asarray(labels).reshape(-1) > 0.5
    scores = np.asarray(scores, np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"{labels.size} labels and {scores.size} scores: give one score per label")
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    # rank from 1 by score; tied scores share the average of their ranks
    _, group, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    average = ends - (counts - 1) / 2
    rank_sum = float(average[group.reshape(-1)][labels].sum())
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)
