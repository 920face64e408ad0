"""A shard's log of refused requests: one line per refusal, a count for repeats.

A client that sends bad requests in a loop must not fill the shard's disk, nor block
its event loop on a log pipe that is read slowly. So within an interval the first
refusal of each kind (the peer's host, the method, the status code) is logged in one
line, and the repeats are only counted; when the interval ends, each kind's count is
logged in one line. Only ``max_kinds`` kinds are logged per interval; refusals of
further kinds are counted together. A log line never carries more than
``max_reason`` characters of a reason, which may echo what the client sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable

log = logging.getLogger("psfw.server")

Kind = tuple[str, str, str]  # (peer host, method, status code name)


def peer_host(peer: str) -> str:
    """The host of a gRPC peer string (``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000``):
    a client's port changes with every connection, its host does not."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rpartition(":")[0].strip("[]") or rest
    return peer or "unknown peer"


class RefusalLog:
    """Logs the refusals of one shard (see the module's docstring); call
    ``refused`` on the event loop, ``flush`` when the shard stops."""

    def __init__(
        self,
        shard: int,
        interval_s: float = 10.0,
        max_kinds: int = 16,
        max_reason: int = 300,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger = log,
    ):
        self.shard = shard
        self.interval_s = interval_s
        self.max_kinds = max_kinds
        self.max_reason = max_reason
        self._clock = clock
        self._log = logger
        self._started = clock()
        self._logged: set[Kind] = set()  # kinds logged in this interval
        self._repeats: Counter[Kind] = Counter()  # refusals counted, not logged, in this interval
        self._other = 0  # refusals of kinds past max_kinds in this interval
        self._timer: asyncio.TimerHandle | None = None
        self.total = 0

    def refused(self, peer: str, method: str, code: str, reason: str) -> None:
        self.total += 1
        if self._clock() - self._started >= self.interval_s:
            self.flush()
        kind = (peer_host(peer), method, code)
        if kind in self._logged:
            self._repeats[kind] += 1
        elif len(self._logged) < self.max_kinds:
            self._logged.add(kind)
            if len(reason) > self.max_reason:
                reason = reason[: self.max_reason] + f"... ({len(reason)} characters)"
            self._log.warning("shard %d refused %s from %s: %s: %s", self.shard, method, kind[0], code, reason)
        else:
            self._other += 1
        if (self._repeats or self._other) and self._timer is None:
            self._schedule()

    def _schedule(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on an event loop: the next refusal or flush() reports the counts
            return
        remaining = max(0.0, self.interval_s - (self._clock() - self._started))
        self._timer = loop.call_later(remaining, self.flush)

    def flush(self) -> None:
        """Log the counts of this interval's repeats, then start a new interval."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        seconds = self._clock() - self._started
        for (host, method, code), count in sorted(self._repeats.items()):
            self._log.warning(
                "shard %d refused %d more %s from %s (%s) in %.0f s", self.shard, count, method, host, code, seconds
            )
        if self._other:
            self._log.warning(
                "shard %d refused %d more requests of other kinds in %.0f s", self.shard, self._other, seconds
            )
        self._logged.clear()
        self._repeats.clear()
        self._other = 0
        self._started = self._clock()
