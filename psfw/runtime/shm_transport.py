"""The shared-memory transport: a shard on this host, tensors through a region.

The client makes one shared-memory region with a slot per slice the shard holds;
an Update's gradients are added up straight into it (``gradient_buffers``) and the
shard writes its answer back into the same slots, so the messages carry only headers
and the region's name. A shard that cannot map the region (another host after all, a
full /dev/shm) refuses with ``Reason.NO_SHARED_MEMORY``: from then on the tensors go
over the network.

Updates travel over the shard's same-host link (``psfw.protocol.local_link``) where
it has one, else over gRPC, as every other verb does. A link that fails is dropped
(that Update goes over gRPC; one that got no answer in time ends as gRPC's deadline
would, when the client retries nothing) and opened again when a Describe names a
socket anew (a shard that restarted: the stub's re-sync describes it).
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import numpy as np

from psfw.protocol.calls import assemble, get_request, shared_update_messages
from psfw.protocol.errors import Reason, ShardError, WireError, said
from psfw.protocol.layout import SliceKey
from psfw.protocol.local_link import LinkTimeout
from psfw.protocol.messages import Fresh, Gradients, TableIds, UpdateHeader
from psfw.protocol.row_wire import row_messages
from psfw.protocol.shm import Region, host_id, slot_layout
from psfw.protocol.wire import Expect, update_request
from psfw.runtime.grpc_transport import RPC_MARGIN_S, ShardClient
from psfw.runtime.local_client import LocalLink
from psfw.runtime.transport import Capabilities, Items, SliceSpecs

log = logging.getLogger(__name__)


class SharedMemoryClient:
    """A ``Transport`` to a shard of this host; the verbs' headers travel over
    ``net`` (its gRPC client), which also carries everything once the shard refuses
    the region."""

    capabilities = Capabilities()

    def __init__(self, net: ShardClient, region: Region, offsets: dict[SliceKey, int]):
        self.net, self.shard, self.address = net, net.shard, net.address
        self._region: Region | None = region
        self._offsets = offsets
        self._retired: list[Region] = []  # refused regions: their views may still be read until close
        self._link: LocalLink | None = None  # the shard's same-host link, while it works
        self._link_name = ""  # the socket the link was (or failed to be) opened to

    @property
    def kind(self) -> str:
        return "shared-memory" if self._region is not None else self.net.kind

    @property
    def linked(self) -> bool:
        """Whether Updates go over the shard's same-host link (else over gRPC)."""
        return self._link is not None

    @classmethod
    async def attach(cls, net: ShardClient, slices: SliceSpecs) -> SharedMemoryClient | None:
        """A client through shared memory if the shard runs on this host (None if not,
        or if the shard is not up yet: the network path works once it is)."""
        try:
            reply = await net.describe()
        except ShardError:
            return None
        if not reply.host or reply.host != host_id():
            return None
        offsets, area = slot_layout(slices)
        try:
            region = Region.create(area)
        except OSError as err:
            log.warning("shard %d: no shared memory (%s); tensors go over the network", net.shard, err)
            return None
        client = cls(net, region, offsets)
        try:
            await client._relink(reply.local_socket)
        except BaseException:  # stopped meanwhile (a signal): no region outlives it
            await client._unlink()
            region.close()
            raise
        return client

    async def _relink(self, name: str) -> None:
        """Open the link to the socket ``name`` (a Describe answer's), unless this
        one was tried already; a failure leaves Updates on gRPC."""
        if not name or name == self._link_name or self._region is None:
            return
        await self._unlink()
        self._link_name = name
        try:
            self._link = await LocalLink.open(name, self.net.security.token)
        except (OSError, ValueError, TimeoutError, WireError) as err:
            log.warning("shard %d: no same-host link (%s); Updates go over gRPC", self.shard, said(err))

    async def _unlink(self) -> None:
        if self._link is not None:
            link, self._link = self._link, None
            await link.close()

    def gradient_buffers(self, slices: SliceSpecs) -> dict[SliceKey, np.ndarray] | None:
        if self._region is None:
            return None
        return {key: self._region.view(False, self._offsets[key], dtype, shape) for key, dtype, shape in slices}

    def _refused(self, err: ShardError) -> bool:
        """The shard cannot map the region: go on over the network."""
        if self._region is None or err.reason != Reason.NO_SHARED_MEMORY:
            return False
        log.warning("shard %d: %s; tensors go over the network from now on", self.shard, err)
        self._retired.append(self._region)  # the caller's gradients may be views of it
        self._region = None
        return True

    def _fill(self, region: Region, grads: Gradients) -> None:
        """The gradients into the region's slots (sums that ``gradient_buffers``
        placed there are added up in place when read, here, off the event loop)."""
        for key, value in grads.items():
            slot = region.view(False, self._offsets[key], value.dtype, value.shape)
            if slot.ctypes.data != value.ctypes.data:  # not the slot gradient_buffers gave
                np.copyto(slot, value)

    def _read(self, region: Region, keys: list[SliceKey], expect: Expect, into) -> dict[SliceKey, np.ndarray]:
        out = {}
        for key in keys:
            dtype, shape = expect(key)
            view = region.view(True, self._offsets[key], dtype, shape)
            target = (into or {}).get(key)
            if target is None:
                out[key] = view.copy()
            else:
                np.copyto(target, view.reshape(target.shape))
                out[key] = target
        return out

    async def put(self, items: Items, optimizer: str, job: str = "", tables: str = "") -> int:
        return await self.net.put(items, optimizer, job, tables)

    async def get(
        self,
        group: int,
        step: int,
        keys: list[SliceKey],
        expect: Expect,
        wait_s: float,
        into: dict[SliceKey, np.ndarray] | None = None,
        wait_for_put: bool = False,
        job: str = "",
        pull: TableIds | None = None,
    ) -> Fresh:
        region = self._region
        if region is not None:
            request = get_request(group, step, keys, wait_s, wait_for_put, job, pull)
            request.shm = region.name
            try:
                head = await self.net.get_shared(request, expect)  # table rows travel in the messages
                return head._replace(values=await asyncio.to_thread(self._read, region, keys, expect, into))
            except ShardError as err:
                if not self._refused(err):
                    raise
        return await self.net.get(group, step, keys, expect, wait_s, into, wait_for_put, job, pull)

    async def update(
        self,
        header: UpdateHeader,
        grads: Gradients,
        expect: Expect,
        into: dict[SliceKey, np.ndarray] | None = None,
    ) -> Fresh:
        """``grads`` should be the views ``gradient_buffers`` gave (else they are
        copied into the region first)."""
        region = self._region
        if region is not None:
            await asyncio.to_thread(self._fill, region, grads)
            try:
                rows = row_messages(header.push, header.pull)  # table rows travel in the messages
                head = update_request(header, shm=region.name, rows=rows[0])
                reply = await self._update_shared(head, expect, rows[1:])
                values = await asyncio.to_thread(self._read, region, list(grads), expect, into)
                return reply._replace(values=values)
            except ShardError as err:
                if not self._refused(err):
                    raise
        return await self.net.update(header, grads, expect, into)

    async def _update_shared(self, head, expect: Expect, more_rows: list) -> Fresh:
        """The Update over the link where there is one (gRPC while the shard loads:
        it retries), else over gRPC."""
        link = self._link
        if link is not None:
            try:
                frames = await link.call(shared_update_messages(head, more_rows), head.wait_s + RPC_MARGIN_S)
            except WireError as err:
                if err.code != grpc.StatusCode.UNAVAILABLE:
                    raise ShardError(
                        f"shard {self.shard} ({self.address}) Update: {err.code.name}: {err.message}",
                        err.code,
                        err.reason,
                    ) from None
            except (OSError, ValueError) as err:  # LinkBroken is a ConnectionError
                await self._unlink()
                if isinstance(err, LinkTimeout) and not self.net.retries:  # as gRPC's deadline would end it
                    raise ShardError(
                        f"shard {self.shard} ({self.address}) Update: DEADLINE_EXCEEDED: {err}",
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                    ) from None
                log.warning("shard %d: the same-host link failed (%s); Updates go over gRPC", self.shard, said(err))
            else:
                try:
                    return assemble(frames, expect, None)
                except WireError as err:
                    raise ShardError(f"shard {self.shard} ({self.address}) Update: bad reply: {err.message}") from None
        return await self.net.update_shared(head, expect, more_rows)

    async def describe(self):
        reply = await self.net.describe()
        await self._relink(reply.local_socket)
        return reply

    async def restore(self, step: int, epoch: int) -> None:
        await self.net.restore(step, epoch)

    async def close(self) -> None:
        await self._unlink()
        for region in [self._region, *self._retired]:
            if region is not None:
                region.close()
        self._region, self._retired = None, []
        await self.net.close()
