"""The bulk codec writes exactly the messages of ps.proto and reads them back."""

import grpc
import numpy as np
import pytest

from psfw.base.errors import WireError
from psfw.proto import ps_pb2 as pb
from psfw.protocol.chunks import ChunkedMessage, chunked_deserializer, chunked_serializer, encode_chunks
from psfw.protocol.wire import Assembler

pytestmark = pytest.mark.unit


def _items():
    rng = np.random.default_rng(0)
    return [("a/w", 0, rng.normal(size=(300,)).astype(np.float32)), ("b", 1, np.arange(5, dtype=np.float64))]


def test_encoded_frames_parse_with_the_generated_protobuf_classes():
    items = _items()
    [chunks] = list(encode_chunks(items, chunk_bytes=1 << 20))
    header = pb.UpdateRequest(group=1, step=7, process=2, workers=3, rows=40, workers_per_group=4, wait_s=1.5)
    data = chunked_serializer(pb.UpdateRequest)(ChunkedMessage(header, chunks))
    message = pb.UpdateRequest.FromString(data)
    assert (message.group, message.step, message.rows, message.wait_s) == (1, 7, 40, 1.5)
    assert [c.key for c in message.chunks] == ["a/w", "b"]
    assert message.chunks[0].data == items[0][2].tobytes()
    assert list(message.chunks[1].shape) == [5] and message.chunks[1].dtype == "float64"


def test_protobuf_bytes_parse_into_frames_without_losing_anything():
    items = _items()
    message = pb.UpdateReply(step=3)
    for key, index, array in items:
        message.chunks.add(key=key, slice=index, dtype=array.dtype.name, shape=array.shape, data=array.tobytes())
    frame = chunked_deserializer(pb.UpdateReply)(message.SerializeToString())
    assert not frame.error and frame.header.step == 3
    assembler = Assembler()
    assembler.add_message(frame)
    out = assembler.finish()
    for key, index, array in items:
        assert np.array_equal(out[(key, index)], array)


def test_large_slices_span_several_chunks_and_reassemble():
    array = np.arange(10_000, dtype=np.float32)
    messages = list(encode_chunks([("w", 0, array)], chunk_bytes=4096))
    assert len(messages) == 10 and all(sum(len(c.data) for c in m) <= 4096 for m in messages)
    serialize, parse = chunked_serializer(pb.GetReply), chunked_deserializer(pb.GetReply)
    assembler = Assembler()
    for chunks in messages:
        assembler.add_message(parse(serialize(ChunkedMessage(pb.GetReply(step=0), chunks))))
    assert np.array_equal(assembler.finish()[("w", 0)], array)


def test_truncated_and_out_of_order_chunks_are_rejected():
    array = np.arange(100, dtype=np.float32)
    first, second = list(encode_chunks([("w", 0, array)], chunk_bytes=200))[:2]
    assembler = Assembler()
    assembler.add_message(ChunkedMessage(pb.GetReply(), first))
    with pytest.raises(WireError, match="truncated: 200 of 400 bytes") as err:
        assembler.finish()
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(WireError, match="send each slice's chunks in order"):
        Assembler().add_message(ChunkedMessage(pb.GetReply(), second))


def test_garbage_bytes_give_a_frame_error_not_an_exception():
    frame = chunked_deserializer(pb.UpdateRequest)(b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff")
    assert frame.error.startswith("malformed UpdateRequest")
    with pytest.raises(WireError) as err:
        Assembler().add_message(frame)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_every_chunk_of_a_message_read_into_an_aligned_buffer_is_aligned():
    """The pad field puts each chunk's data 64 bytes times n into its message, also
    where the pad itself lengthens the chunk's length prefix (a slice of about 16 KB:
    the prefix grows from two bytes to three), for keys and headers of any length."""
    serialize, parse = chunked_serializer(pb.UpdateRequest), chunked_deserializer(pb.UpdateRequest)
    rng = np.random.default_rng(5)
    cases = [("k" * 42, n) for n in range(4060, 4090)] + [("k" * 42, n) for n in range(0, 40)]
    cases += [("p" * int(rng.integers(1, 80)), int(rng.integers(1, 300_000))) for _ in range(60)]
    for key, size in cases:
        items = [(key, 0, np.arange(size, dtype=np.float32)), ("b", 1, np.ones(3, np.float32))]
        head = pb.UpdateRequest(step=int(rng.integers(0, 1 << 40)), job="j" * int(rng.integers(0, 100)))
        for index, chunks in enumerate(encode_chunks(items, 1 << 16)):
            message = serialize(ChunkedMessage(head if index == 0 else pb.UpdateRequest(), chunks))
            raw = np.empty(len(message) + 64, np.uint8)
            buffer = raw[-raw.ctypes.data % 64 :][: len(message)]
            buffer[:] = np.frombuffer(message, np.uint8)
            frame = parse(memoryview(buffer))
            assert not frame.error and len(frame.chunks) == len(chunks)
            for got, sent in zip(frame.chunks, chunks, strict=True):
                assert bytes(got.data) == bytes(sent.data)
                if len(got.data):
                    assert np.frombuffer(got.data, np.uint8).ctypes.data % 64 == 0, (key, size)


def test_a_bfloat16_parameter_travels_as_itself_beside_compressed_float32_gradients():
    """bfloat16 on the wire is a parameter's own dtype, or a float32 gradient
    compressed (widened back on receipt): the receiver's slice says which."""
    from psfw.protocol.compression import BFLOAT16

    weight = np.linspace(-1, 1, 64).astype(BFLOAT16)
    compressed = np.arange(8, dtype=np.float32).astype(BFLOAT16)
    held = {("w", 0): (BFLOAT16, (64,)), ("b", 0): (np.dtype(np.float32), (8,))}
    assembler = Assembler(expect=held.__getitem__, widen=True)
    for chunks in encode_chunks([("w", 0, weight), ("b", 0, compressed)], chunk_bytes=1 << 20):
        assembler.add_message(ChunkedMessage(pb.UpdateRequest(), chunks))
    out = assembler.finish()
    assert out[("w", 0)].dtype == BFLOAT16 and np.array_equal(out[("w", 0)], weight)
    assert out[("b", 0)].dtype == np.float32 and np.array_equal(out[("b", 0)], np.arange(8, dtype=np.float32))
