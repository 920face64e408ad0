"""A user's own model for psfw: plain functions over a pytree of parameters.

psfw needs ``init(key) -> params`` and ``loss(params, x, y)`` returning the mean loss
over the rows (or ``(loss, metrics)``). ``predict(params, x)`` is optional: what the
trained model answers for each row (``psfw predict``, ``psfw.load_model``); here the
probability of each class. ``layers`` is optional: the layers in
data-flow order for net.json and net.png, each a dict as below or just a name (the
layer then uses the parameters under that name). Named from a config as
``[model] name = "custom"  path = "my_model.py"``.
"""

import jax
import jax.numpy as jnp
import optax

HIDDEN = 64

layers = [
    {"name": "input", "type": "input", "params": []},
    {"name": "hidden", "type": "dense_tanh", "params": ["hidden/w", "hidden/b"]},
    {"name": "out", "type": "dense", "params": ["out/w", "out/b"]},
    {"name": "loss", "type": "softmax_cross_entropy", "params": []},
]


def init(key):
    k1, k2 = jax.random.split(key)
    return {
        "hidden": {"w": jax.random.normal(k1, (64, HIDDEN)) / 8.0, "b": jnp.zeros(HIDDEN)},
        "out": {"w": jax.random.normal(k2, (HIDDEN, 10)) / 8.0, "b": jnp.zeros(10)},
    }


def forward(params, x):
    h = jnp.tanh(x @ params["hidden"]["w"] + params["hidden"]["b"])
    return h @ params["out"]["w"] + params["out"]["b"]


def predict(params, x):
    return jax.nn.softmax(forward(params, x))


def loss(params, x, y):
    logits = forward(params, x)
    value = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return value, {"accuracy": (logits.argmax(-1) == y).mean()}
