"""A shard over the network: the link where the shard offers one, else gRPC.

Put, Get and Update go over the shard's link (``psfw.runtime.link_client``: its Unix
socket on this host, TCP elsewhere, TLS where this client has credentials); every
other verb, and every call the link cannot take, goes over gRPC
(``psfw.runtime.grpc_channel``). That is the one fallback rule: a call goes over the
link when one is open and free, else over gRPC, which retries; the shard adds an
Update's contribution once, whichever way it came.

Where the shard runs on this host, an Update's tensors lie in the process's
shared-memory region (``psfw.runtime.step_region``): its messages carry where each
slice lies instead of the bytes. A shard that cannot map the region refuses with
``Reason.NO_SHARED_MEMORY``; from then on the tensors travel in the messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc
import numpy as np

from psfw.base.errors import Reason, ShardError, WireError
from psfw.base.security import NO_SECURITY, Security
from psfw.proto import ps_pb2 as pb
from psfw.protocol.calls import (
    DECODE,
    PUT_PIECES,
    UPDATE_PIECES,
    assemble,
    fresh_answer,
    get_request,
    pipelined_update,
    put_answer,
    put_messages,
    row_pieces_messages,
    shared_update_messages,
    update_messages,
)
from psfw.protocol.chunks import CHUNK_BYTES, ChunkedMessage
from psfw.protocol.compression import COMPRESSIONS, ErrorFeedback
from psfw.protocol.layout import SliceKey
from psfw.protocol.messages import Fresh, GetHeader, Gradients, UpdateHeader
from psfw.protocol.row_wire import RowCollector, row_messages
from psfw.protocol.shm import host_id
from psfw.protocol.wire import Assembler, Expect, update_request
from psfw.runtime.grpc_channel import GrpcChannel, Locate
from psfw.runtime.link_client import ShardLink
from psfw.runtime.lockstep import Credit, Lockstep
from psfw.runtime.step_region import StepRegion
from psfw.runtime.transport import Capabilities, Items

T = TypeVar("T")
RPC_MARGIN_S = 10.0  # the client's deadline exceeds the shard's own wait by this much
log = logging.getLogger(__name__)


PIPELINED_MESSAGE_BYTES = 128 << 10  # a pipelined Update's messages: at most a slice, and at most 128 KiB
CREDIT_MESSAGES = 4  # a pipelined Update's slices unanswered: at most this many messages (``Credit``)


class ShardClient:
    """A ``Transport`` (psfw.runtime.transport) that works wherever the shard runs.
    ``link``: use the shard's link where it offers one; ``compression="bf16"``: an
    Update's float32 gradients travel as bfloat16 with error feedback
    (``psfw.protocol.compression``); ``same_host`` False: never the shard's Unix
    socket, as if it ran on another host; ``locate``: where the shard listens now,
    asked while it cannot be reached (shards an engine may move)."""

    capabilities = Capabilities()

    def __init__(
        self,
        address: str,
        shard: int,
        *,
        timeout_s: float = 60.0,
        retries: int = 5,
        chunk_bytes: int = CHUNK_BYTES,
        security: Security = NO_SECURITY,
        compression: str = "none",
        link: bool = True,
        same_host: bool = True,
        locate: Locate | None = None,
    ):
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression {compression!r}: use one of {', '.join(COMPRESSIONS)}")
        self.address, self.shard = address, shard
        self.compression = compression
        self.timeout_s, self.retries, self.chunk_bytes = timeout_s, retries, chunk_bytes
        self.security = security
        self.grpc = GrpcChannel(address, shard, security, timeout_s, retries, locate, self._moved)
        self._link = ShardLink(shard, address, security, link, same_host)
        self._feedback = ErrorFeedback() if compression == "bf16" else None
        self._region: StepRegion | None = None  # where this shard's Updates find their tensors
        self._held: StepRegion | None = None  # released on close: the stub's values may be views of it
        self._slices: list[SliceKey] = []
        self._elsewhere = False  # the shard runs on another host, as its last Describe said

    def _moved(self, address: str) -> None:
        """The shard listens at ``address`` now (an engine restarted it elsewhere):
        its link is opened anew there when a Describe names it."""
        self.address = address
        self._link.address = address

    @property
    def kind(self) -> str:
        """For people: ``link (unix, shared memory)``, ``link (tcp, TLS)``, ``grpc``..."""
        link = self._link.up
        details = [link.place.kind] if link is not None else []
        if link is not None and self._link.tls is not None:
            details.append("TLS")
        if self._region is not None:
            details.append("shared memory")
        elif self.compression != "none":
            details.append(self.compression)
        return ("link" if link is not None else "grpc") + (f" ({', '.join(details)})" if details else "")

    @property
    def linked(self) -> str:
        """The socket the link uses (``unix``, ``tcp``), '' while calls go over gRPC."""
        link = self._link.up
        return link.place.kind if link is not None else ""

    @property
    def pipelines(self) -> bool:
        """Whether an Update may be answered slice by slice while it is being sent:
        to a shard on another host (where a link's two directions overlap; on this
        host the bytes are a memory copy, and the pipeline only costs CPU), its
        tensors in its messages, over a link that reads and writes at once (not
        TLS: one TLS connection is not for two threads)."""
        link = self._link.up
        return self._elsewhere and link is not None and link.duplex and self._region is None

    @property
    def shares_memory(self) -> bool:
        """Whether Updates find their tensors in the process's shared region."""
        return self._region is not None

    @property
    def step_buffers(self) -> StepRegion | None:
        """The region stays the stub's buffers after a refusal: the others use it."""
        return self._held

    async def close(self) -> None:
        await self._link.drop()
        if self._held is not None:
            self._held.release()
        self._region = self._held = None
        await self.grpc.close()

    async def open_link(self, reply: pb.DescribeReply | None = None) -> None:
        """Move tensors over the shard's link from now on: open the one its Describe
        answer ``reply`` names (None: ask the shard; one that is not up yet: the next
        Describe opens it)."""
        self._link.wanted = self._link.allowed
        if not self._link.wanted:
            return
        if reply is not None:
            await self._link.relink(reply)
            return
        with contextlib.suppress(ShardError):
            await self.describe()

    def share_memory(self, region: StepRegion, reply: pb.DescribeReply) -> bool:
        """Put this shard's Update tensors in ``region`` if the shard runs on this
        host (its Describe answer ``reply`` says); False if not or if /dev/shm
        cannot hold the region."""
        if not reply.host or reply.host != host_id():
            return False
        try:
            self._region = self._held = region.acquire()
        except OSError as err:
            log.warning("shard %d: no shared memory (%s); tensors go in the messages", self.shard, err)
            return False
        self._slices = [(s.key, s.index) for s in region.layout.shard_slices(self.shard)]
        return True

    async def _either(
        self,
        rpc: str,
        messages: Callable[[], Iterator[list]],
        answer: Callable,
        timeout: float,
        attempt: Callable,
        duplex: bool = False,
        lockstep: Lockstep | None = None,
        credit: Credit | None = None,
    ):
        """The call over the link, else over gRPC (``attempt``): the one fallback rule."""
        result = await self._link.call(rpc, messages, answer, timeout, self.retries, duplex, lockstep, credit)
        if result is not None:
            self.grpc.reached()
            return result
        return await self.grpc.call(rpc, attempt)

    async def put(self, items: Items, optimizer: str, job: str = "", tables: str = "") -> int:
        """Store initial values; the shard's optimizer and job (its identity, JSON)
        are fixed by its first Put, its embedding tables by the first that declares them."""
        items = list(items)

        def requests() -> Iterator[ChunkedMessage]:
            return put_messages(items, optimizer, job, tables, self.chunk_bytes)

        async def attempt():
            return (await self.grpc.put(requests(), timeout=self.timeout_s, metadata=self.grpc.metadata)).slices

        pieces = lambda: (PUT_PIECES(message) for message in requests())  # noqa: E731
        return await self._either("Put", pieces, put_answer, self.timeout_s, attempt)

    async def get(self, header: GetHeader, expect: Expect, into: dict[SliceKey, np.ndarray] | None = None) -> Fresh:
        """The values (and table rows) ``header`` asks for, written into ``into``
        where it has the slice (see ``Assembler``)."""
        request = get_request(header)
        timeout = header.wait_s + RPC_MARGIN_S

        def answer(replies: list[memoryview]) -> Fresh:
            return assemble([DECODE["Get"](reply) for reply in replies], expect, into)

        async def attempt():
            messages = [f async for f in self.grpc.get(request, timeout=timeout, metadata=self.grpc.metadata)]
            return await asyncio.to_thread(assemble, messages, expect, into)

        return await self._either("Get", lambda: [[request.SerializeToString()]], answer, timeout, attempt)

    async def update(
        self,
        header: UpdateHeader,
        grads: Gradients,
        expect: Expect,
        into: dict[SliceKey, np.ndarray] | None = None,
        lockstep: Lockstep | None = None,
    ) -> Fresh:
        """Send one process's gradient sums of a step (``grads``: by slice, every
        slice the shard holds); returns the fresh values (written into ``into`` where
        it has the slice). Through shared memory, ``grads`` and ``into`` should lie in
        the region (``step_buffers``): else the gradients are copied into it first,
        and the answer out of it. ``lockstep``: a pipelined Update's messages go in
        step with the step's Updates to the other shards (``Lockstep``)."""
        region = self._region
        if region is not None:
            slots, values, to_read = region.slots(self._slices, header.step, grads, into)
            try:
                reply = await self._update_shared(header, region.name, slots, expect)
            except ShardError as err:
                if err.reason != Reason.NO_SHARED_MEMORY:
                    raise
                log.warning("shard %d: %s; tensors go in the messages from now on", self.shard, err)
                self._region = None  # held until close: the others, and the caller's buffers, still use it
            else:
                for key, place in to_read.items():
                    target = (into or {}).get(key)
                    values[key] = place.copy() if target is None else _copied(target, place)
                return reply._replace(values=values)
        return await self._update_inline(header, grads, expect, into, lockstep)

    async def _update_shared(self, header: UpdateHeader, region: str, slots: list, expect: Expect) -> Fresh:
        """An Update whose tensors lie in ``region``: a message (more when table rows
        do not fit in it), and an answer without values (they are in the region too)."""
        rows = row_messages(header.push, header.pull)
        head = update_request(header, shm=region, rows=rows[0])
        head.shm_slots.extend(slots)
        messages = shared_update_messages(head, rows[1:])
        timeout = header.wait_s + RPC_MARGIN_S

        def answer(replies: list[memoryview]) -> Fresh:
            return assemble([DECODE["Update"](reply) for reply in replies], expect, None)

        async def attempt() -> Fresh:
            if len(messages) == 1:
                call = self.grpc.update_one(messages[0], timeout=timeout, metadata=self.grpc.metadata)
            else:
                call = self.grpc.update(iter(messages), timeout=timeout, metadata=self.grpc.metadata)
            return assemble([f async for f in call], expect, None)

        return await self._either("Update", lambda: [[m] for m in messages], answer, timeout, attempt)

    async def _update_inline(
        self,
        header: UpdateHeader,
        grads: Gradients,
        expect: Expect,
        into: dict[SliceKey, np.ndarray] | None,
        lockstep: Lockstep | None = None,
    ) -> Fresh:
        """An Update whose tensors travel in its messages; the answer's values are
        taken in as they arrive while the next one travels."""
        rows = row_messages(header.push, header.pull)
        head = update_request(header, rows=rows[0])
        if self._feedback is not None:
            grads = self._feedback.compressed(grads)  # once: a retry sends the same bytes
        timeout = header.wait_s + RPC_MARGIN_S

        chunk_bytes, credit = self.chunk_bytes, None
        if header.pipelined:
            chunk_bytes, credit = _pacing(grads, expect, self._feedback is not None, self.chunk_bytes)

        def messages() -> Iterator[list]:
            if header.pipelined:  # the table rows first: a shard checks them before it adds a slice
                yield UPDATE_PIECES(ChunkedMessage(head, []))
                yield from row_pieces_messages(rows[1:])
                for message in update_messages(grads, grads, None, chunk_bytes):
                    credit.send(sum(len(piece) for piece in message))
                    yield message
                return
            yield from update_messages(grads, grads, head, chunk_bytes)
            yield from row_pieces_messages(rows[1:])

        def answer(replies: list[memoryview]) -> Fresh:
            return assemble([DECODE["Update"](reply) for reply in replies], expect, into)

        async def attempt() -> Fresh:
            call = self.grpc.update(
                pipelined_update(grads, expect, head, self.chunk_bytes, rows[1:]),
                timeout=timeout,
                metadata=self.grpc.metadata,
            )
            assembler, pulled = Assembler(expect, into=into), RowCollector()
            reply = None
            async for message in call:
                reply = assembler.add_message(message)
                pulled.add(reply.table_rows)
            if reply is None:
                raise WireError(grpc.StatusCode.INTERNAL, "the shard answered with no message")
            return fresh_answer(reply, assembler.finish(), pulled.rows())

        return await self._either("Update", messages, answer, timeout, attempt, header.pipelined, lockstep, credit)

    async def restore(self, step: int, epoch: int) -> None:
        """Roll the shard back to its complete checkpoint of ``step``, at ``epoch``."""
        request = pb.RestoreRequest(step=step, epoch=epoch)
        await self.grpc.call(
            "Restore", lambda: self.grpc.restore(request, timeout=self.timeout_s, metadata=self.grpc.metadata)
        )

    async def describe(self) -> pb.DescribeReply:
        """The shard's Describe answer; a link it names anew (a restarted shard) is
        opened."""
        reply = await self.grpc.call(
            "Describe",
            lambda: self.grpc.describe(pb.DescribeRequest(), timeout=self.timeout_s, metadata=self.grpc.metadata),
        )
        await self._link.relink(reply)
        self._elsewhere = reply.host != host_id()  # another network namespace counts as another host
        return reply


def _pacing(grads: Gradients, expect: Expect, compressed: bool, chunk_bytes: int) -> tuple[int, Credit]:
    """A pipelined Update's message size and its ``Credit``: a message holds at most
    the largest slice (a slice is answered once whole, and travels whole the sooner
    the smaller its message), and at most ``PIPELINED_MESSAGE_BYTES``; the window
    holds ``CREDIT_MESSAGES`` messages, and two of the largest slices at least."""
    sent = answered = largest = 0
    for key in grads:
        dtype, shape = expect(key)
        size = math.prod(shape)
        wire = 2 if compressed and dtype == np.float32 else dtype.itemsize  # bfloat16 as it travels
        sent, answered, largest = sent + size * wire, answered + size * dtype.itemsize, max(largest, size * wire)
    message = max(1, min(chunk_bytes, PIPELINED_MESSAGE_BYTES, largest))
    window = max(CREDIT_MESSAGES * message, 2 * largest)
    ratio = sent / answered if answered else 1.0
    return message, Credit((window + window // 16 + 4096) / ratio, ratio)  # a margin for the messages' framing


def _copied(target: np.ndarray, place: np.ndarray) -> np.ndarray:
    np.copyto(target, place.reshape(target.shape))
    return target
