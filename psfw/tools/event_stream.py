"""The events of ``psfw bench --sparse --stream``: ids as a job that runs for months
sees them, made step by step from a seeded numpy Generator (never stored).

Half of each step's events come from a Zipf head (exponent ``ALPHA`` over
``head_ids`` ids: the frequent users or items, the same all along), half from a
uniform tail (ids seen once or twice and never again: a stream's noise). The tail's
range is chosen so that the whole stream holds about ``distinct`` distinct ids: a
uniform draw of ``T`` events over ``N`` ids gives ``N (1 - exp(-T / N))`` of them.
"""

from __future__ import annotations

import math

import numpy as np

ALPHA = 1.1  # the head's Zipf exponent
HEAD_SHARE = 0.5  # of each step's events
HEAD_IDS = 100_000  # at most; and at most a tenth of the distinct ids
SCRAMBLE = 0x9E3779B1  # a prime: rank -> id is one to one over any range it does not divide


def tail_range(draws: int, distinct: int) -> int:
    """The N whose ``draws`` uniform draws over 0..N-1 give about ``distinct``
    distinct ids (ValueError when ``draws`` cannot: it takes more draws than ids)."""
    if distinct < 1:
        raise ValueError(f"{distinct} distinct tail ids: at least 1")
    if draws <= distinct:
        raise ValueError(f"{draws:,} uniform draws give fewer than {distinct:,} distinct ids")
    expected = lambda n: n * -math.expm1(-draws / n)  # noqa: E731  (grows with n, towards draws)
    low, high = distinct, distinct
    while expected(high) < distinct:
        high *= 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if expected(middle) < distinct else (low, middle)
    return high


class EventStream:
    """``events`` ids in steps of ``batch``, about ``distinct`` of them distinct."""

    def __init__(self, events: int, distinct: int, batch: int = 4096, seed: int = 0):
        if events < 1 or batch < 1:
            raise ValueError(f"--events {events}, a batch of {batch}: each at least 1")
        if distinct < 20:
            raise ValueError(f"--distinct {distinct}: at least 20 (a head of a tenth and a tail)")
        self.events, self.distinct, self.batch = events, distinct, batch
        self.head_ids = min(HEAD_IDS, distinct // 10)
        self.head_per_step = round(batch * HEAD_SHARE)
        full, last = divmod(events, batch)
        tail_draws = full * (batch - self.head_per_step) + last - min(self.head_per_step, last)
        try:
            self.range = tail_range(tail_draws, distinct - self.head_ids)
        except ValueError as err:
            raise ValueError(
                f"--events {events:,} for --distinct {distinct:,}: the uniform tail ({err}); "
                "raise --events or lower --distinct"
            ) from None
        if self.range % SCRAMBLE == 0:
            raise ValueError(f"an id range of {self.range} would map two head ids onto one")
        ranks = np.arange(1, self.head_ids + 1, dtype=np.float64)
        self._cdf = np.cumsum(ranks**-ALPHA)
        self._cdf /= self._cdf[-1]
        self._rng = np.random.default_rng(seed)
        self.made = 0  # events made so far

    @property
    def steps(self) -> int:
        return -(-self.events // self.batch)

    def head(self, ranks: np.ndarray) -> np.ndarray:
        """The ids of head ranks (0: the most frequent), spread over the id range."""
        return (np.asarray(ranks, np.int64) * SCRAMBLE + 12345) % self.range

    def top(self, k: int) -> np.ndarray:
        """The ids of the head's ``k`` most frequent ranks, sorted."""
        return np.sort(self.head(np.arange(min(k, self.head_ids))))

    def next_batch(self, until: int | None = None) -> np.ndarray:
        """The next step's events (the last step's may be fewer; none after the end,
        or after the ``until``-th event: a prefix of the stream ends there)."""
        n = min(self.batch, (self.events if until is None else min(until, self.events)) - self.made)
        heads = min(self.head_per_step, n)
        ranks = np.searchsorted(self._cdf, self._rng.random(heads), side="right").clip(max=self.head_ids - 1)
        tail = self._rng.integers(0, self.range, n - heads, dtype=np.int64)
        self.made += n
        return np.concatenate([self.head(ranks), tail])


__all__ = ["EventStream", "tail_range"]
