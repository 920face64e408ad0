"""bfloat16 gradients with error feedback on the network path (real shards on
127.0.0.1, real JAX training)."""

import grpc
import numpy as np
import pytest

from psfw.base.errors import WireError
from psfw.jobs.config import parse_config
from psfw.jobs.embedded import train_async
from psfw.protocol.chunks import ChunkedMessage, encode_chunks
from psfw.protocol.compression import BFLOAT16, ErrorFeedback
from psfw.protocol.messages import UpdateHeader
from psfw.protocol.wire import Assembler
from psfw.runtime.shard_client import ShardClient
from psfw.services.server import ShardServer

from helpers import SGD, reference


@pytest.mark.unit
def test_error_feedback_sends_the_sum_of_the_gradients_within_one_rounding():
    """Over many steps, what travelled adds up to the true gradients' sum, off by
    what one step's rounding leaves at most (plain rounding would drift)."""
    rng = np.random.default_rng(0)
    feedback = ErrorFeedback()
    sent_total, true_total, rounded_total = np.zeros(500), np.zeros(500), np.zeros(500)
    for _ in range(200):
        grad = (rng.normal(size=500) * 1e-4 + 1.002).astype(np.float32)  # bfloat16 rounds 1.002 to 1
        sent = feedback.compressed({("w", 0): grad})[("w", 0)]
        assert sent.dtype == BFLOAT16
        sent_total += sent.astype(np.float64)
        true_total += grad
        rounded_total += grad.astype(BFLOAT16).astype(np.float64)
    one_rounding = 2.0**-8 * 2  # bfloat16 keeps 8 bits: a value near 1-2 rounds by at most this
    assert np.abs(sent_total - true_total).max() <= one_rounding
    assert np.abs(rounded_total - true_total).max() > 10 * one_rounding, "without feedback the error grows"


@pytest.mark.unit
def test_a_slice_is_compressed_once_and_a_non_finite_one_leaves_no_residual():
    feedback = ErrorFeedback()
    grads = {("w", 0): np.full(8, 1 / 3, np.float32), ("b", 0): np.array([np.nan, 1.0], np.float32)}
    compressed = feedback.compressed(grads)
    assert compressed[("w", 0)] is compressed[("w", 0)], "a retried Update sends the same bytes"
    assert np.isnan(compressed[("b", 0)].astype(np.float32)[0])  # the shard's non-finite policy sees it
    after = feedback.compressed({("b", 0): np.array([0.5, 0.25], np.float32)})[("b", 0)]
    np.testing.assert_array_equal(after.astype(np.float32), [0.5, 0.25])
    ints = feedback.compressed({("n", 0): np.arange(3, dtype=np.float64)})[("n", 0)]
    assert ints.dtype == np.float64, "only float32 slices are narrowed"


def _chunks(key, array):
    return [ChunkedMessage(None, batch) for batch in encode_chunks([(key[0], key[1], array)])]


@pytest.mark.unit
def test_a_shard_widens_bfloat16_gradients_only_where_it_expects_float32():
    grad = np.linspace(-1, 1, 100, dtype=np.float32).astype(BFLOAT16)
    widening = Assembler(lambda key: (np.dtype("float32"), (100,)), widen=True)
    for frame in _chunks(("w", 0), grad):
        widening.add_message(frame)
    got = widening.finish()[("w", 0)]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, grad.astype(np.float32))
    half = Assembler(lambda key: (np.dtype("float16"), (100,)), widen=True)
    with pytest.raises(WireError, match="is float16, the request sent bfloat16"):
        half.add_message(_chunks(("w", 0), grad)[0])
    put = Assembler()  # a Put stores what it gets: a bfloat16 parameter stays bfloat16
    put.add_message(_chunks(("w", 0), grad)[0])
    assert put.finish()[("w", 0)].dtype == BFLOAT16
    with pytest.raises(WireError, match="dtype 'int32' is not supported") as err:
        Assembler().add_message(_chunks(("w", 0), np.zeros(4, np.int32))[0])
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.unit
@pytest.mark.asyncio
async def test_a_compressed_update_carries_half_the_bytes_and_applies_the_rounded_gradient():
    server = ShardServer(0, 1)
    await server.start("127.0.0.1:0")
    plain = ShardClient(server.address, 0, timeout_s=10, retries=0)
    narrow = ShardClient(server.address, 0, timeout_s=10, retries=0, compression="bf16")
    try:
        assert narrow.kind == "grpc (bf16)" and plain.kind == "grpc"
        start = np.linspace(0, 1, 4096, dtype=np.float32)
        await plain.put([("w", 0, start)], SGD)
        received = server.requests.metrics.bytes_in.labels("0")
        before = received._value.get()
        grad = np.full(4096, 1 / 3, np.float32)
        header = UpdateHeader(group=0, step=0, process=0, workers=1, rows=2, workers_per_group=1, wait_s=5)
        answer = await narrow.update(header, {("w", 0): grad}, lambda key: (np.dtype("float32"), (4096,)))
        assert received._value.get() - before == 4096 * 2, "bfloat16 on the wire: 2 bytes a value"
        rounded = grad.astype(BFLOAT16).astype(np.float32)
        np.testing.assert_allclose(answer.values[("w", 0)], start - 0.1 * rounded / 2, rtol=1e-6, atol=1e-9)
        assert not np.allclose(answer.values[("w", 0)], start - 0.1 * grad / 2, rtol=1e-7, atol=0)
    finally:
        await plain.close()
        await narrow.close()
        await server.stop(0)


@pytest.mark.asyncio
async def test_training_with_compressed_gradients_stays_close_to_single_process_training():
    config = parse_config(
        {
            "seed": 3,
            "model": {"name": "mlp", "hidden": [32]},
            "data": {"name": "digits"},
            "train": {"batch_size": 64, "steps": 6, "log_every": 1},
            "optimizer": {"name": "sgd", "learning_rate": 0.3},
            "cluster": {"workers_per_group": 2, "workers_per_process": 2, "transport": "grpc", "compression": "bf16"},
        }
    )
    result = await train_async(config, progress=False, outputs=False)
    expected, initial = reference(config, 6), reference(config, 0)
    for name, value in expected.items():
        moved = np.abs(value - initial[name]).max()
        off = np.abs(result.params[name] - value).max()
        assert off <= 0.02 * moved, f"{name}: {off} off after training moved it {moved}"
    assert any(not np.array_equal(result.params[n], expected[n]) for n in expected), "the gradients were rounded"
