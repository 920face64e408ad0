"""The shared-memory transport: a shard on this host, tensors through a region.

The process's shards on this host share one region (``StepRegion``): the stub adds
its workers' gradients up in it, and the shard reads its slices' sums there and
writes its answer into the whole parameters the stub publishes; the Update carries
only the headers, the region's name and where each slice lies in it. A shard that
cannot map the region (another host after all, a full /dev/shm) refuses with
``Reason.NO_SHARED_MEMORY``: from then on the tensors go over the network. Gets
(the start, a re-sync) go over the network: they are rare, and a Get's values
must never land in an area whose values a worker may still read.

Updates travel over the shard's same-host link (``psfw.protocol.local_link``) where
it has one, else over gRPC, as every other verb does. A link that fails is dropped
(that Update goes over gRPC; one that got no answer in time ends as gRPC's deadline
would, when the client retries nothing) and opened again when a Describe names a
socket anew (a shard that restarted: the stub's re-sync describes it).
"""

from __future__ import annotations

import logging

import grpc
import numpy as np

from psfw.base.errors import Reason, ShardError, WireError, said
from psfw.proto import ps_pb2 as pb
from psfw.protocol.calls import assemble, shared_update_messages
from psfw.protocol.layout import SliceKey, SliceSpec
from psfw.protocol.local_link import LinkTimeout
from psfw.protocol.messages import Fresh, Gradients, TableIds, UpdateHeader
from psfw.protocol.row_wire import row_messages
from psfw.protocol.shm import host_id
from psfw.protocol.wire import Expect, update_request
from psfw.runtime.grpc_transport import RPC_MARGIN_S, ShardClient
from psfw.runtime.local_client import LocalLink
from psfw.runtime.step_region import StepRegion
from psfw.runtime.transport import Capabilities, Items

log = logging.getLogger(__name__)


class SharedMemoryClient:
    """A ``Transport`` to a shard of this host; the verbs' headers travel over
    ``net`` (its gRPC client), which also carries everything once the shard refuses
    the region."""

    capabilities = Capabilities()

    def __init__(self, net: ShardClient, region: StepRegion, slices: list[SliceSpec]):
        self.net, self.shard, self.address = net, net.shard, net.address
        self._region: StepRegion | None = region.acquire()
        self._held = region  # released on close: the stub's published values may be views of it
        self._slices = [(s.key, s.index) for s in slices]
        self._link: LocalLink | None = None  # the shard's same-host link, while it works
        self._link_name = ""  # the socket the link was (or failed to be) opened to

    @property
    def kind(self) -> str:
        return "shared-memory" if self._region is not None else self.net.kind

    @property
    def linked(self) -> bool:
        """Whether Updates go over the shard's same-host link (else over gRPC)."""
        return self._link is not None

    @property
    def step_buffers(self) -> StepRegion:
        """The region stays the stub's buffers after a refusal: the others use it."""
        return self._held

    @classmethod
    async def attach(cls, net: ShardClient, region: StepRegion, reply=None) -> SharedMemoryClient | None:
        """A client through ``region`` if the shard runs on this host (None if not, or
        if the shard is not up yet: the network path works once it is). ``reply``:
        the shard's Describe answer, if the caller has it (``connect`` waits for it)."""
        if reply is None:
            try:
                reply = await net.describe()
            except ShardError:
                return None
        if not reply.host or reply.host != host_id():
            return None
        try:
            client = cls(net, region, region.layout.shard_slices(net.shard))
        except OSError as err:
            log.warning("shard %d: no shared memory (%s); tensors go over the network", net.shard, err)
            return None
        try:
            await client._relink(reply.local_socket)
        except BaseException:  # stopped meanwhile (a signal): no region outlives it
            await client._unlink()
            region.release()
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

    def _refused(self, err: ShardError) -> bool:
        """The shard cannot map the region: go on over the network."""
        if self._region is None or err.reason != Reason.NO_SHARED_MEMORY:
            return False
        log.warning("shard %d: %s; tensors go over the network from now on", self.shard, err)
        self._region = None  # held until close: the others, and the caller's buffers, still use it
        return True

    def _slots(self, region: StepRegion, step: int, grads: Gradients, into) -> tuple[list, dict, dict]:
        """Where each slice's gradient sum lies and where its answer goes: the stub's
        own buffers where they are in the region (nothing is copied), else places of
        the region, filled here (the gradients) and read back by the caller (the
        values: the places to copy them from)."""
        slots, values, to_read = [], {}, {}
        for key in self._slices:
            grad = grads[key]
            at = region.offset_of(grad)
            if at is None:  # not added up in the region: placed there now
                place = region.gradient_slot(key)
                np.copyto(place, np.asarray(grad).reshape(place.shape))
                at = region.offset_of(place)
            target = (into or {}).get(key)
            answer_at = None if target is None else region.offset_of(target)
            if answer_at is None:
                place = region.values_slot(step, key)
                answer_at, to_read[key] = region.offset_of(place), place
            else:
                values[key] = target
            slots.append(pb.ShmSlot(key=key[0], slice=key[1], grads=at, values=answer_at))
        return slots, values, to_read

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
        return await self.net.get(group, step, keys, expect, wait_s, into, wait_for_put, job, pull)

    async def update(
        self,
        header: UpdateHeader,
        grads: Gradients,
        expect: Expect,
        into: dict[SliceKey, np.ndarray] | None = None,
    ) -> Fresh:
        """``grads`` and ``into`` should lie in the region (``step_buffers``): else
        the gradients are copied into it first, and the answer out of it."""
        region = self._region
        if region is not None:
            slots, values, to_read = self._slots(region, header.step, grads, into)
            try:
                rows = row_messages(header.push, header.pull)  # table rows travel in the messages
                head = update_request(header, shm=region.name, rows=rows[0])
                head.shm_slots.extend(slots)
                reply = await self._update_shared(head, expect, rows[1:])
            except ShardError as err:
                if not self._refused(err):
                    raise
            else:
                for key, place in to_read.items():
                    target = (into or {}).get(key)
                    values[key] = place.copy() if target is None else _copied(target, place)
                return reply._replace(values=values)
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
        if self._held is not None:
            self._held.release()
        self._region = self._held = None
        await self.net.close()


def _copied(target: np.ndarray, place: np.ndarray) -> np.ndarray:
    np.copyto(target, place.reshape(target.shape))
    return target
