"""The correctness anchor: with one group, N steps of psfw equal N steps of plain
single-process JAX + optax on the full batch, up to float rounding."""

import jax
import numpy as np
import pytest

import psfw.protocol.calls
import psfw.services.answers
from psfw.jobs.config import parse_config
from psfw.jobs.embedded import train_async
from psfw.jobs.job import build_job

from helpers import reference

STEPS = 6


def make_config(
    optimizer: dict, workers: int, per_process: int, batch: int, servers: int = 2, slice_bytes=1 << 20, transport="auto"
):
    return parse_config(
        {
            "seed": 3,
            "model": {"name": "mlp", "hidden": [32]},
            "data": {"name": "digits"},
            "train": {"batch_size": batch, "steps": STEPS, "log_every": 1},
            "optimizer": optimizer,
            "cluster": {
                "workers_per_group": workers,
                "workers_per_process": per_process,
                "servers": servers,
                "slice_bytes": slice_bytes,
                "transport": transport,
            },
        }
    )


OPTIMIZERS = {
    "sgd": {"name": "sgd", "learning_rate": 0.3},
    "adam": {"name": "adam", "learning_rate": 0.01},
}


@pytest.mark.asyncio
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize(
    ("workers", "per_process", "batch", "slice_bytes", "transport"),
    [
        (2, 2, 64, 1 << 20, "auto"),  # 2 workers in one process, 2 shards, called in-process
        (2, 2, 64, 1 << 20, "grpc"),  # the same over gRPC on 127.0.0.1
        (3, 3, 50, 1 << 20, "auto"),  # 3 workers on 16 + 16 + 18 rows
        (3, 1, 50, 2048, "grpc"),  # 3 stubs (one per worker), parameters sliced over both shards
    ],
)
async def test_psfw_equals_single_process_training(optimizer, workers, per_process, batch, slice_bytes, transport):
    """Row-weighted sums make uneven sub-batches add up to the full-batch gradient."""
    config = make_config(
        OPTIMIZERS[optimizer], workers, per_process, batch, slice_bytes=slice_bytes, transport=transport
    )
    result = await train_async(config, progress=False, outputs=False)
    expected = reference(config, STEPS)
    assert set(result.params) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(result.params[name], value, rtol=2e-5, atol=2e-6, err_msg=name)
    moved = max(np.abs(expected[n] - reference(config, 0)[n]).max() for n in expected)
    assert moved > 1e-3, "training must change the parameters for the comparison to mean anything"


@pytest.mark.asyncio
@pytest.mark.parametrize(("per_process", "link"), [(2, False), (1, False), (2, True), (1, True)])
async def test_the_network_path_in_pipelined_batches_equals_single_process_training(monkeypatch, per_process, link):
    """Requests summed and encoded, and answers encoded, a few slices at a time
    while earlier ones travel (one stub, and 2 stubs sharing their group's answer),
    over gRPC and over the shards' links."""
    monkeypatch.setattr(psfw.protocol.calls, "PIPELINE_BYTES", 4096)
    monkeypatch.setattr(psfw.services.answers, "ANSWER_BATCH_BYTES", 4096)
    config = make_config(OPTIMIZERS["adam"], 2, per_process, 64, slice_bytes=2048, transport="grpc")
    config = config.model_copy(update={"cluster": config.cluster.model_copy(update={"link": link})})
    result = await train_async(config, progress=False, outputs=False)
    expected = reference(config, STEPS)
    for name, value in expected.items():
        np.testing.assert_allclose(result.params[name], value, rtol=2e-5, atol=2e-6, err_msg=name)


@pytest.mark.asyncio
@pytest.mark.parametrize("transport", ["auto", "grpc"])
async def test_a_shard_that_holds_no_slice_takes_part_without_harm(transport):
    """Two parameters on three shards: one shard holds nothing, and every Update to
    it is still answered (in-process and over gRPC)."""
    config = make_config(OPTIMIZERS["sgd"], 2, 2, 64, servers=3, transport=transport)
    config = config.model_copy(update={"model": config.model.model_copy(update={"hidden": []})})
    assert [len(build_job(config).layout.shard_slices(i)) for i in range(3)].count(0) == 1
    result = await train_async(config, progress=False, outputs=False)
    expected = reference(config, STEPS)
    for name, value in expected.items():
        np.testing.assert_allclose(result.params[name], value, rtol=2e-5, atol=2e-6, err_msg=name)


@pytest.mark.unit
@pytest.mark.asyncio
async def test_a_plain_mean_of_uneven_sub_batches_would_differ():
    """Guard on the test itself: with 16/16/18 rows, averaging the workers' mean
    gradients is measurably different from the full-batch gradient."""
    config = make_config(OPTIMIZERS["sgd"], 3, 3, 50)
    job = build_job(config)
    params = job.model.init(jax.random.PRNGKey(config.seed))
    rows = job.order(0).indices(0)
    x, y = job.data.x_train[rows], job.data.y_train[rows]
    grad = jax.grad(lambda p, x, y: job.model.loss(p, x, y)[0])
    full = grad(params, x, y)
    parts = [grad(params, x[a:b], y[a:b]) for a, b in [(0, 16), (16, 32), (32, 50)]]
    plain = jax.tree.map(lambda *g: sum(g) / 3, *parts)
    gap = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), full, plain)))
    assert gap > 1e-4
