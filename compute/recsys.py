"""Recommendation models over embedding tables.

The input of each row is ``(user id, item id)`` (``psfw.compute.clicks``' click
log); the label a click, 0 or 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from psfw.compute.models import Layer, Model, Params
from psfw.compute.tables import TableSpec


def factorization_machine(users: int | None, items: int | None, dim: int = 16, scale: float = 0.01) -> Model:
    """A two-way factorization machine of a user and an item (matrix factorization
    with biases): the click logit is ``u . v + b_u + b_i + b``.

    Tables "user" (``users`` rows) and "item" (``items`` rows; None: any id, rows
    made on first use), each row ``dim + 1`` wide: ``dim`` latent values, then the
    id's bias. Rows start normal with deviation ``scale``. The dense parameters are
    the global bias only (``bias/b``). ``score`` is the logit of each row; the loss
    is the mean sigmoid cross-entropy, with the accuracy of ``logit > 0``."""
    tables = {
        "user": TableSpec(rows=users, dim=dim + 1, scale=scale),
        "item": TableSpec(rows=items, dim=dim + 1, scale=scale),
    }

    def init(key: jax.Array) -> Params:
        return {"bias": {"b": jnp.zeros((1,), jnp.float32)}}

    def ids(x) -> dict[str, np.ndarray]:
        x = np.asarray(x)
        return {"user": x[:, 0], "item": x[:, 1]}

    def score(params: Params, x: jax.Array, embedded: dict[str, jax.Array]) -> jax.Array:
        user, item = embedded["user"], embedded["item"]
        dot = jnp.sum(user[:, :dim] * item[:, :dim], axis=-1)
        return dot + user[:, dim] + item[:, dim] + params["bias"]["b"][0]

    def loss(params: Params, x: jax.Array, y: jax.Array, embedded: dict[str, jax.Array]) -> tuple[jax.Array, dict]:
        logits = score(params, x, embedded)
        labels = y.reshape(logits.shape).astype(logits.dtype)
        value = optax.sigmoid_binary_cross_entropy(logits, labels).mean()
        return value, {"accuracy": ((logits > 0) == (labels > 0.5)).mean()}

    def predict(params: Params, x: jax.Array, embedded: dict[str, jax.Array]) -> jax.Array:
        return jax.nn.sigmoid(score(params, x, embedded))

    layers: list[Layer] = [
        {"name": "input", "type": "input", "shape": [2], "params": []},
        {"name": "user", "type": "embedding", "table": "user", "dim": dim + 1, "params": []},
        {"name": "item", "type": "embedding", "table": "item", "dim": dim + 1, "params": []},
        {"name": "interaction", "type": "factorization_machine", "units": 1, "params": ["bias/b"]},
        {"name": "loss", "type": "sigmoid_cross_entropy", "params": []},
    ]
    return Model(init, loss, layers, tables=tables, ids=ids, score=score, predict=predict)


def embedding_bag(rows: int | None, dim: int, dense: bool = False, scale: float = 0.01) -> Model:
    """A regression over a bag of ids per row (``x``: int ``[B, k]``): the sum of their
    rows of table "ids", scored by a dense weight vector. With ``dense``, the same
    model keeps the table as a dense parameter ``ids/table`` (looked up by
    ``jnp.take``): what a parameter server without tables must move every step."""
    spec = TableSpec(rows=rows, dim=dim, scale=scale)

    def init(key: jax.Array) -> Params:
        params = {"out": {"w": jnp.full((dim,), 1.0 / dim, jnp.float32), "b": jnp.zeros((1,), jnp.float32)}}
        if dense:
            params["ids"] = {"table": jax.random.normal(key, (rows, dim), jnp.float32) * scale}
        return params

    def predict(params: Params, bags: jax.Array) -> jax.Array:
        return bags.sum(axis=1) @ params["out"]["w"] + params["out"]["b"][0]

    def error(params: Params, bags: jax.Array, y: jax.Array) -> tuple[jax.Array, dict]:
        return jnp.mean((predict(params, bags) - y.astype(jnp.float32)) ** 2), {}

    out_layer = {"name": "out", "type": "dense", "units": 1, "params": ["out/w", "out/b"]}
    if dense:
        layers = [{"name": "ids", "type": "embedding", "params": ["ids/table"]}, out_layer]
        return Model(init, lambda params, x, y: error(params, jnp.take(params["ids"]["table"], x, axis=0), y), layers)

    def ids(x) -> dict[str, np.ndarray]:
        return {"ids": np.asarray(x)}

    layers = [{"name": "ids", "type": "embedding", "table": "ids", "dim": dim, "params": []}, out_layer]
    return Model(init, lambda params, x, y, embedded: error(params, embedded["ids"], y), layers, {"ids": spec}, ids)
