"""Matrix factorization with every parameter in embedding tables, for the tests.

A click's logit is the dot product of a user row and an item row plus both ids'
biases (the last value of each row); ``init`` returns ``{}``: the model has no dense
parameter at all, the natural form of such a model.
"""

import jax.numpy as jnp
import numpy as np
import optax

from psfw import TableSpec

DIM = 8

tables = {
    "user": TableSpec(rows=300, dim=DIM + 1, scale=0.1),
    "item": TableSpec(rows=40, dim=DIM + 1, scale=0.1),
}


def init(key):
    return {}


def ids(x):
    x = np.asarray(x)
    return {"user": x[:, 0], "item": x[:, 1]}


def score(params, x, embedded):
    user, item = embedded["user"], embedded["item"]
    return jnp.sum(user[:, :DIM] * item[:, :DIM], axis=-1) + user[:, DIM] + item[:, DIM]


def loss(params, x, y, embedded):
    logits = score(params, x, embedded)
    labels = y.reshape(logits.shape).astype(logits.dtype)
    value = optax.sigmoid_binary_cross_entropy(logits, labels).mean()
    return value, {"accuracy": ((logits > 0) == (labels > 0.5)).mean()}
