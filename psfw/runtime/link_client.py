"""When a shard client opens, uses and drops its link to the shard (``ShardLink``);
one open link is a ``psfw.runtime.link_connection.LinkConnection``."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

import grpc

from psfw.base.errors import ShardError, WireError, said
from psfw.base.security import Security
from psfw.protocol.link import LinkTimeout
from psfw.runtime.link_connection import LinkConnection, Place, link_place
from psfw.runtime.lockstep import Credit, Lockstep

log = logging.getLogger(__name__)
REOPEN_S, MAX_REOPEN_S = 1.0, 60.0  # a link that failed is opened again after this back-off


class ShardLink:
    """A shard client's link to its shard: opened when a Describe answer names one
    (once ``wanted``: a client for status or health opens none), used while it
    works. One that fails is dropped (its calls go over gRPC) and opened again after
    a back-off (``REOPEN_S``, doubling to ``MAX_REOPEN_S``); one that cannot be
    opened is tried again only when a Describe names it anew; a Describe that names
    another link (a restarted shard) opens that one at once."""

    def __init__(self, shard: int, address: str, security: Security, allowed: bool, same_host: bool = True):
        self.shard, self.address, self.same_host = shard, address, same_host
        self.token = security.token
        self.tls = security.link_client_context() if allowed else None
        self.allowed = allowed
        self.wanted = False
        self._link: LinkConnection | None = None
        self._named: Place | None = None  # where the last Describe said the link is
        self._retry_at, self._backoff = 0.0, REOPEN_S
        self._opening = asyncio.Lock()

    @property
    def up(self) -> LinkConnection | None:
        """The open link, if any (one a cancelled call closed is not: the next call
        drops it and goes over gRPC)."""
        link = self._link
        return link if link is not None and not link.closed else None

    async def relink(self, reply) -> None:
        """Open the link a Describe answer names, unless it is the one open already."""
        if not self.wanted:
            return
        named = link_place(reply, self.address, self.same_host)
        if named is None or (named == self._named and self._link is not None):
            return
        if named != self._named:
            self._named, self._retry_at, self._backoff = named, 0.0, REOPEN_S
        await self._open()

    async def _open(self) -> None:
        async with self._opening:  # one at a time: two Describes never leave two links
            if self._link is not None and not self._link.closed and self._link.place == self._named:
                return
            await self.drop()
            if self._named is None or time.monotonic() < self._retry_at:
                return
            try:
                self._link = await LinkConnection.open(self._named, self.token, self.tls)
            except (OSError, ValueError, WireError) as err:
                # not again until a Describe names a link: a port that a firewall drops
                # would cost every attempt the whole connect timeout
                self._retry_at = math.inf
                log.warning(
                    "shard %d: no link at %s (%s); tensors go over gRPC",
                    self.shard,
                    self._named.socket or f"port {self._named.port}",
                    said(err),
                )

    def _failed(self) -> None:
        """An open link failed: open it again after the back-off."""
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(2 * self._backoff, MAX_REOPEN_S)

    async def drop(self) -> None:
        if self._link is not None:
            link, self._link = self._link, None
            await link.close()

    async def _lost(self, link: LinkConnection) -> None:
        """``link`` failed: drop it and back off, unless a Describe has opened
        another one meanwhile (which stays)."""
        await link.close()
        if self._link is link:
            self._link = None
            self._failed()

    async def call(
        self,
        rpc: str,
        messages,
        answer: Callable,
        timeout: float,
        retries: int,
        duplex: bool = False,
        lockstep: Lockstep | None = None,
        credit: Credit | None = None,
    ):
        """The call over the link: ``answer``'s result, or None when there is no link,
        it is busy (the call goes beside it, as gRPC's calls do) or it failed (then the
        caller goes over gRPC: a shard adds an Update's contribution once). The shard's
        refusal is a ShardError, as over gRPC."""
        if self._link is None and self.wanted and self._named is not None and time.monotonic() >= self._retry_at:
            await self._open()  # after a failure's back-off
        link = self._link
        if link is None or link.busy:
            return None
        try:
            result = await link.call(rpc, messages, answer, timeout, duplex, lockstep, credit)
        except WireError as err:  # the answer did not parse
            await self._lost(link)
            raise ShardError(f"shard {self.shard} ({self.address}) {rpc}: bad reply: {err.message}") from None
        except (OSError, ValueError) as err:  # LinkBroken and LinkTimeout are ConnectionErrors
            await self._lost(link)
            if isinstance(err, LinkTimeout) and not retries:  # as gRPC's deadline would end it
                raise ShardError(
                    f"shard {self.shard} ({self.address}) {rpc}: DEADLINE_EXCEEDED: {err}",
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ) from None
            log.warning("shard %d: the link failed (%s); tensors go over gRPC", self.shard, said(err))
            return None
        self._backoff = REOPEN_S
        if isinstance(result, WireError):
            if result.code == grpc.StatusCode.UNAVAILABLE:
                return None  # a shard that loads its checkpoint: gRPC retries
            raise ShardError(
                f"shard {self.shard} ({self.address}) {rpc}: {result.code.name}: {result.message}",
                result.code,
                result.reason,
            )
        return result
