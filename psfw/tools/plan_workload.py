"""What ``psfw plan`` reads from a config: the bytes a step moves and the compute
of a sub-batch, for a given number of worker hosts (``plan_model.Workload``).

The dense bytes are the layout's (``build_job``: the parameters' shapes from
``jax.eval_shape`` of the model's init, nothing trained). A table counts the rows a
step moves, not its size: the unique ids of a worker's sub-batch (over the first
batches of the data), each row's values and its id. The compute is the benchmark
MLP's calibrated one for the benchmark, else the config's own jitted gradient step
timed here on one sub-batch.
"""

from __future__ import annotations

import math
import statistics
import time

import numpy as np

from psfw.tools.plan_model import Constants, Workload

ID_BYTES = 8  # an int64 id travels with each row
SAMPLED_BATCHES = 4  # batches whose sub-batches' unique ids are counted


def dense_bytes(job) -> int:
    """M: every dense parameter's bytes."""
    return sum(math.prod(p.shape) * np.dtype(p.dtype).itemsize for p in job.layout.params.values())


def table_bytes(job, workers: int) -> float:
    """Bytes of the table rows one worker's sub-batch uses, each way, averaged over
    the first batches (0 without tables)."""
    from psfw.compute.batching import BatchOrder, split_batch

    model = job.model
    if not model.tables:
        return 0.0
    order = BatchOrder(len(job.data.x_train), job.config.train.batch_size, job.config.seed)
    counted = []
    for step in range(min(SAMPLED_BATCHES, order.steps_per_epoch)):
        for x in split_batch(job.data.x_train[order.indices(step)], workers):
            ids = model.ids(np.asarray(x))
            counted.append(
                sum(len(np.unique(np.asarray(ids[n]))) * (spec.dim * 4 + ID_BYTES) for n, spec in model.tables.items())
            )
    return statistics.fmean(counted)


def table_total_bytes(job) -> int | None:
    """Every row of every table (None: a table without a bound)."""
    tables = job.model.tables.values()
    if any(spec.rows is None for spec in tables):
        return None
    return sum(spec.rows * spec.dim * 4 for spec in tables)


def measure_compute(job, rows: int, repeats: int = 5) -> float:
    """Median seconds of the config's jitted gradient step on a sub-batch of ``rows``."""
    import jax

    from psfw.compute.step import make_grad_step, make_sparse_step
    from psfw.compute.tables import bucket

    model = job.model
    params = model.init(jax.random.PRNGKey(job.config.seed))
    x, y = job.data.x_train[:rows], job.data.y_train[:rows]
    if model.tables:
        step = make_sparse_step(model.loss)
        blocks, inverse = {}, {}
        ids = model.ids(np.asarray(x))
        for name, spec in model.tables.items():
            unique, inverse[name] = np.unique(np.asarray(ids[name]), return_inverse=True)
            inverse[name] = inverse[name].reshape(np.shape(ids[name]))
            blocks[name] = np.zeros((bucket(len(unique)), spec.dim), np.float32)
        args = (params, blocks, inverse, x, y)
    else:
        step = make_grad_step(model.loss)
        args = (params, x, y)
    times = []
    for _ in range(repeats + 1):  # the first compiles
        started = time.perf_counter()
        jax.block_until_ready(step(*args))
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def sub_batch(batch: int, workers: int) -> int:
    """The largest sub-batch of ``batch`` over ``workers`` (the last takes the rest)."""
    from psfw.compute.batching import split_sizes

    return split_sizes(batch, workers)[-1]


def workload(job, name: str, workers: int, costs: Constants, bench: bool, compute_s: float | None) -> Workload:
    """``job`` (a built job) on ``workers`` worker hosts. ``compute_s`` given: the
    compute of a sub-batch, as the user knows it (their accelerator's)."""
    config = job.config
    rows = sub_batch(config.train.batch_size, workers)
    if compute_s is None:
        compute_s = costs.bench_compute(rows) if bench else measure_compute(job, rows)
    return Workload(
        name=name,
        batch=config.train.batch_size,
        dense_bytes=dense_bytes(job),
        table_bytes=table_bytes(job, workers),
        table_total_bytes=table_total_bytes(job),
        push_share=0.5 if config.cluster.compression == "bf16" else 1.0,
        optimizer=config.optimizer.name,
        slice_bytes=config.cluster.slice_bytes,
        compute_s=compute_s,
    )


__all__ = ["dense_bytes", "measure_compute", "sub_batch", "table_bytes", "table_total_bytes", "workload"]
