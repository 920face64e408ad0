"""The worker's jitted region: loss, metrics and gradients in one XLA call."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from psfw.compute.models import Params


def make_grad_step(loss: Callable) -> Callable:
    """``step(params, x, y) -> (loss, metrics, summed_grads)``, jitted.

    ``summed_grads`` is the gradient of the *summed* loss over the rows of ``x``
    (the mean-loss gradient times the row count), so that gradients of sub-batches
    of different sizes add up to the full batch's summed gradient. Dividing by the
    group's rows on the server gives the full-batch mean-loss gradient exactly.
    """

    def step(params: Params, x: jax.Array, y: jax.Array):
        (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params, x, y)
        rows = jnp.asarray(x.shape[0], jnp.float32)
        return value, metrics, jax.tree.map(lambda g: g * rows.astype(g.dtype), grads)

    return jax.jit(step)


def make_sparse_step(loss: Callable) -> Callable:
    """``step(params, rows, inverse, x, y) -> (loss, metrics, summed_grads,
    summed_row_grads)``, jitted, for a model with embedding tables.

    ``rows[table]`` is a ``[U, dim]`` block of the table's rows (padded to a
    bucket size, see ``psfw.compute.tables.bucket``); ``inverse[table]`` gives, for
    each id of the batch, its row in the block. The lookup is a gather inside the
    jitted region, so the gradient of a block row is the sum over every occurrence
    of its id (duplicates add up, padding rows get zero). Both gradients are of the
    summed loss, as ``make_grad_step``'s.
    """

    def total(params: Params, rows: dict, inverse: dict, x: jax.Array, y: jax.Array):
        embedded = {name: jnp.take(block, inverse[name], axis=0) for name, block in rows.items()}
        return loss(params, x, y, embedded)

    def step(params: Params, rows: dict, inverse: dict, x: jax.Array, y: jax.Array):
        (value, metrics), (grads, row_grads) = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(
            params, rows, inverse, x, y
        )
        count = jnp.asarray(x.shape[0], jnp.float32)
        scale = functools.partial(jax.tree.map, lambda g: g * count.astype(g.dtype))
        return value, metrics, scale(grads), scale(row_grads)

    return jax.jit(step)


def make_eval_fn(loss: Callable) -> Callable:
    """``evaluate(params, x, y) -> (loss, metrics)``, jitted."""
    return jax.jit(loss)


def make_sparse_eval_fn(loss: Callable) -> Callable:
    """``evaluate(params, rows, inverse, x, y) -> (loss, metrics)``, jitted, for a
    model with embedding tables (``rows`` and ``inverse`` as ``make_sparse_step``'s)."""

    def evaluate(params: Params, rows: dict, inverse: dict, x: jax.Array, y: jax.Array):
        embedded = {name: jnp.take(block, inverse[name], axis=0) for name, block in rows.items()}
        return loss(params, x, y, embedded)

    return jax.jit(evaluate)


def evaluate_in_batches(evaluate: Callable, params: Params, x, y, batch_size: int) -> tuple[float, dict[str, float]]:
    """The loss and metrics of ``params`` over all rows of ``x`` and ``y``, computed
    ``batch_size`` rows at a time (a memory-mapped split is read a batch at a time)
    and averaged by rows, so the result is the mean over the rows whatever the batch
    size. ``evaluate`` is ``make_eval_fn``'s function."""
    rows = len(x)
    total_loss, totals = 0.0, {}
    for start in range(0, rows, batch_size):
        xb, yb = np.asarray(x[start : start + batch_size]), np.asarray(y[start : start + batch_size])
        loss, metrics = evaluate(params, xb, yb)
        n = len(xb)
        total_loss += float(loss) * n
        for name, value in metrics.items():
            totals[name] = totals.get(name, 0.0) + float(value) * n
    return total_loss / rows, {name: value / rows for name, value in totals.items()}
