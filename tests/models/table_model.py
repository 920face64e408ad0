"""A small model with two embedding tables, for the tests: a user row and the sum of
two item rows, multiplied element-wise and scored by a dense weight vector.

``make(dim, users, items, table_optimizer)`` returns a psfw.Model; ``dense_loss``
is the same model with the tables as dense parameters (looked up by jnp.take), the
reference that sparse training must equal.
"""

import jax
import jax.numpy as jnp

import psfw
from psfw.compute.tables import TableSpec


def _loss(params, x, y, embedded):
    user, items = embedded["user"], embedded["item"].sum(axis=1)
    pred = (user * items) @ params["out"]["w"] + params["out"]["b"][0]
    return jnp.mean((pred - y) ** 2), {}


def ids(x):
    return {"user": x[:, 0], "item": x[:, 1:3]}


def make(dim=4, users=40, items=25, table_optimizer=None, unbounded=False):
    tables = {
        "user": TableSpec(None if unbounded else users, dim, "normal", 0.5, table_optimizer),
        "item": TableSpec(items, dim, "uniform", 0.5, table_optimizer),
    }

    def init(key):
        return {"out": {"w": jax.random.normal(key, (dim,)) * 0.5, "b": jnp.zeros((1,))}}

    layers = [
        {"name": "user", "type": "embedding", "params": []},
        {"name": "item", "type": "embedding", "params": []},
        {"name": "out", "type": "dense", "params": ["out/w", "out/b"]},
    ]
    return psfw.Model(init, _loss, layers, tables, ids)


def dense_loss(params, tables, x, y):
    """The same loss with the tables as dense arrays."""
    embedded = {name: jnp.take(tables[name], i, axis=0) for name, i in ids(x).items()}
    return _loss(params, x, y, embedded)
