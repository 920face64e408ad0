"""The pipelined Update: a shard answers each slice as soon as every process of the
group has sent it, while the rest of the request is still on its way, and adds each
process's part of a slice once, also when the Update is sent again."""

import asyncio
import contextlib
import threading
import time

import numpy as np
import pytest
import pytest_asyncio
from test_equivalence import OPTIMIZERS, STEPS, make_config

from psfw.jobs.embedded import train_async
from psfw.proto import ps_pb2 as pb
from psfw.protocol.calls import update_messages
from psfw.protocol.chunks import ChunkedMessage, chunked_deserializer
from psfw.protocol.messages import UpdateHeader
from psfw.protocol.wire import update_request
from psfw.runtime.lockstep import Credit
from psfw.runtime.shard_client import CREDIT_MESSAGES, PIPELINED_MESSAGE_BYTES, ShardClient, _pacing
from psfw.services.requests import DECODERS
from psfw.services.server import ShardServer

from helpers import SGD, reference

LR = 0.1  # helpers.SGD's
REPLY = chunked_deserializer(pb.UpdateReply)
START = {("w", 0): np.zeros(4, np.float32), ("w", 1): np.ones(4, np.float32)}


@pytest_asyncio.fixture
async def two_slices():
    """A shard holding w[0] and w[1] (SGD), and the request core that serves it."""
    server = ShardServer(0, 1)
    await server.start("127.0.0.1:0")
    client = ShardClient(server.address, 0, timeout_s=10, retries=0)
    await client.put([(k, i, v) for (k, i), v in START.items()], SGD)
    yield server
    await client.close()
    await server.stop(0)


def messages(process: int, processes: int, grads: dict) -> list[ChunkedMessage]:
    """A pipelined Update of step 0 as the shard decodes it: one message per slice."""
    head = UpdateHeader(
        group=0,
        step=0,
        process=process,
        workers=1,
        rows=1,
        workers_per_group=processes,
        group_processes=processes,
        wait_s=5.0,
        pipelined=True,
    )
    encoded = update_messages(grads, list(grads), update_request(head), chunk_bytes=16)
    return [DECODERS["Update"](b"".join(pieces)) for pieces in encoded]


def _reply(data: bytes) -> ChunkedMessage:
    return REPLY(data)


class Feed:
    """A request's messages handed over one at a time, as a link would."""

    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue()

    async def rest(self):
        while (message := await self.queue.get()) is not None:
            yield message


@pytest.mark.unit
@pytest.mark.asyncio
async def test_a_slice_is_answered_while_the_rest_of_the_update_is_still_on_its_way(two_slices):
    grads = {("w", 0): np.full(4, 2.0, np.float32), ("w", 1): np.full(4, 3.0, np.float32)}
    first, second = messages(0, 1, grads)
    feed = Feed()
    answers = two_slices.requests.update_stream(first, feed.rest())
    (early,) = [_reply(b"".join(p)) for p in (await asyncio.wait_for(anext(answers), 5))()]  # w[1] not sent yet
    assert [(c.key, c.slice) for c in early.chunks] == [("w", 0)]
    np.testing.assert_allclose(np.frombuffer(early.chunks[0].data, np.float32), -LR * 2.0)
    assert two_slices.store.groups[0].step == 0, "the step counts once every slice is applied"
    feed.queue.put_nowait(second)
    feed.queue.put_nowait(None)
    rest = [_reply(b"".join(p)) async for make in answers for p in make()]
    assert [(c.key, c.slice) for c in rest[0].chunks] == [("w", 1)]
    np.testing.assert_allclose(np.frombuffer(rest[0].chunks[0].data, np.float32), 1.0 - LR * 3.0)
    assert rest[-1].header.step == 1 and not rest[-1].chunks
    assert two_slices.store.groups[0].step == 1


@pytest.mark.unit
@pytest.mark.asyncio
async def test_a_slice_waits_for_every_process_of_the_group_and_a_resent_update_adds_it_once(two_slices):
    first_try = {("w", 0): np.full(4, 1.0, np.float32), ("w", 1): np.full(4, 1.0, np.float32)}
    again = {("w", 0): np.full(4, 5.0, np.float32), ("w", 1): np.full(4, 2.0, np.float32)}
    other = {("w", 0): np.full(4, 3.0, np.float32), ("w", 1): np.full(4, 4.0, np.float32)}
    # process 0 sends w[0] and its connection breaks before w[1]
    head, _ = messages(0, 2, first_try)
    feed = Feed()
    cut = two_slices.requests.update_stream(head, feed.rest())
    waiting = asyncio.ensure_future(anext(cut))
    await asyncio.sleep(0.2)
    assert not waiting.done(), "w[0] waits for process 1"
    waiting.cancel()  # as a link's call ends when its connection breaks
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    await cut.aclose()
    # process 1's whole Update, and process 0's again (another gradient: the first one counts)
    replies = {}

    async def send(process, grads):
        head, *more = messages(process, 2, grads)
        sent = Feed()
        for message in more:
            sent.queue.put_nowait(message)
        sent.queue.put_nowait(None)
        answers = two_slices.requests.update_stream(head, sent.rest())
        replies[process] = [_reply(b"".join(p)) async for make in answers for p in make()]

    await asyncio.wait_for(asyncio.gather(send(1, other), send(0, again)), 10)
    values = {(c.key, c.slice): np.frombuffer(c.data, np.float32) for c in replies[0][0].chunks + replies[0][1].chunks}
    np.testing.assert_allclose(values[("w", 0)], -LR * (1.0 + 3.0) / 2)  # process 0's first w[0], once
    np.testing.assert_allclose(values[("w", 1)], 1.0 - LR * (2.0 + 4.0) / 2)  # its w[1] came with the retry
    assert two_slices.store.groups[0].step == 1
    assert replies[1][-1].header.step == replies[0][-1].header.step == 1


@pytest.mark.unit
@pytest.mark.asyncio
async def test_a_shard_stopped_with_a_step_half_applied_writes_no_checkpoint_of_it(tmp_path, caplog):
    """Its applied slices would be saved as the step before them, and applied again
    on resume: the stop keeps the last checkpoint instead, and says why."""
    server = ShardServer(0, 1, checkpoint_dir=tmp_path)
    await server.start("127.0.0.1:0")
    client = ShardClient(server.address, 0, timeout_s=10, retries=0)
    try:
        await client.put([(k, i, v) for (k, i), v in START.items()], SGD)
        grads = {("w", 0): np.full(4, 1.0, np.float32), ("w", 1): np.full(4, 1.0, np.float32)}
        streams = []
        for process in range(2):  # both send w[0] (in their first message); neither sends w[1]
            head, _ = messages(process, 2, grads)
            streams.append(server.requests.update_stream(head, Feed().rest()))
        early = await asyncio.wait_for(asyncio.gather(*(anext(s) for s in streams)), 5)
        assert len(early) == 2, "w[0] is applied and answered"
        assert server.store.half_applied() == "group 0 step 0 is half applied"
        await server.store.checkpoints.flush(final=True)
        assert server.store.checkpoint_steps() == []
        assert "no checkpoint at the stop: group 0 step 0 is half applied" in caplog.text
        for stream in streams:
            await stream.aclose()
    finally:
        await client.close()
        await server.stop(0)


@pytest.mark.asyncio
@pytest.mark.parametrize("per_process", [1, 2])
async def test_training_with_pipelined_updates_equals_single_process_training(monkeypatch, per_process):
    """The whole path through the link: stubs that take the shards for another
    host's mark their Updates pipelined, send them in lockstep and read the answers
    while they send; the job equals single-process training."""

    import psfw.services.requests

    monkeypatch.setattr(psfw.runtime.shard_client, "host_id", lambda: "another host")
    streamed = []
    stream = psfw.services.requests.ShardRequests.update_stream

    def counted(self, first, rest):
        streamed.append(first.header.process)
        return stream(self, first, rest)

    monkeypatch.setattr(psfw.services.requests.ShardRequests, "update_stream", counted)
    config = make_config(OPTIMIZERS["adam"], 2, per_process, 64, slice_bytes=2048, transport="grpc")
    result = await train_async(config, progress=False, outputs=False)
    assert len(streamed) == STEPS * 2 * (2 // per_process), "every Update to each of the 2 shards went pipelined"
    expected = reference(config, STEPS)
    for name, value in expected.items():
        np.testing.assert_allclose(result.params[name], value, rtol=2e-5, atol=2e-6, err_msg=name)


def _sending(credit: Credit, sizes: list[int]) -> tuple[threading.Thread, list[int]]:
    """A sender thread that sends messages of ``sizes`` through ``credit``; the
    list of those it has sent."""
    sent: list[int] = []

    def run():
        for size in sizes:
            credit.send(size)
            sent.append(size)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, sent


def _settled(sent: list[int], count: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(sent) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # and no further meanwhile
    assert len(sent) == count


@pytest.mark.unit
def test_credit_holds_the_slices_sent_within_its_window_of_those_answered():
    credit = Credit(window=300, ratio=0.5)  # the request's bytes are half the answer's: bf16 against float32
    credit.SPAN_S = 1e-9  # the window alone, not the answer's pace
    credit.begin(time.monotonic() + 30)
    thread, sent = _sending(credit, [100] * 4)  # each 200 bytes of answer
    _settled(sent, 1)  # 200 within 300; a second would make 400
    credit.answer(100)
    _settled(sent, 2)  # 400 - 100: 300
    credit.answer(300)
    _settled(sent, 3)
    credit.answer(10_000)
    thread.join(10)
    assert sent == [100] * 4


@pytest.mark.unit
def test_credit_widens_its_window_to_what_the_answer_brings_in_its_span_at_its_pace():
    credit = Credit(window=300)
    credit.begin(time.monotonic() + 30)
    assert credit._room() == 300  # no answer yet
    credit.answer(10_000_000)
    credit.first = time.monotonic() - 1.0  # 10 MB in the last second
    assert 0.9 * 10_000_000 * Credit.SPAN_S <= credit._room() <= 10_000_000 * Credit.SPAN_S


@pytest.mark.unit
def test_credit_stops_waiting_for_a_shard_that_answers_nothing_or_whose_answer_comes_after_the_request():
    credit = Credit(window=100)
    credit.STALL_S = 0.2
    credit.begin(time.monotonic() + 30)
    started = time.monotonic()
    thread, sent = _sending(credit, [100] * 5)
    thread.join(10)
    assert len(sent) == 5 and 0.2 <= time.monotonic() - started < 5, "one stall, then no more waits"
    credit.begin(time.monotonic() + 30, waits=False)  # TLS: the answer is read after the request
    thread, sent = _sending(credit, [100] * 5)
    thread.join(10)
    assert len(sent) == 5


@pytest.mark.unit
def test_a_pipelined_update_travels_a_slice_a_message_with_room_for_two_of_its_largest_slices():
    shapes = {("w", 0): 4096, ("w", 1): 4096, ("b", 0): 10}
    expect = lambda key: (np.dtype(np.float32), (shapes[key],))  # noqa: E731
    message, credit = _pacing(dict.fromkeys(shapes), expect, compressed=False, chunk_bytes=1 << 20)
    assert message == 4 * 4096 and credit.ratio == 1.0
    assert credit.window >= CREDIT_MESSAGES * message
    message, credit = _pacing(dict.fromkeys(shapes), expect, compressed=True, chunk_bytes=1 << 20)
    assert message == 2 * 4096 and credit.ratio == 0.5, "bfloat16 on the wire, float32 in the answer"
    big = {("w", 0): PIPELINED_MESSAGE_BYTES}  # elements: 4 times the message size in bytes
    expect = lambda key: (np.dtype(np.float32), (big[key],))  # noqa: E731
    message, credit = _pacing(dict.fromkeys(big), expect, compressed=False, chunk_bytes=1 << 20)
    assert message == PIPELINED_MESSAGE_BYTES and credit.window >= 2 * 4 * PIPELINED_MESSAGE_BYTES
