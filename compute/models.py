"""Models as pure functions over pytrees of parameters.

A :class:`Model` is ``init(key) -> params`` and ``loss(params, x, y) -> (loss,
metrics)``; ``loss`` is the mean over the rows of ``x``. An optional ``predict(params,
x)`` gives what the trained model answers for each row. ``layers`` describes the net
structure for export: each layer names the parameters it uses, in data-flow order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from psfw.compute.tables import TableSpec
from psfw.compute.user_files import import_user_file

Params = Any  # arbitrary nests of arrays
Layer = dict[str, Any]  # {"name", "type", "params": [names], ...}


class Model(NamedTuple):
    """A model as pure functions: ``init(key) -> params`` and
    ``loss(params, x, y) -> (loss, metrics)``.

    A model with embedding tables also declares them (``tables``: name ->
    ``TableSpec``) and ``ids(x) -> {table: int ids}``, which names the rows each
    row of ``x`` uses (on the host, numpy: any shape per table). Its loss is then
    ``loss(params, x, y, embedded)``, where ``embedded[table]`` holds the looked-up
    rows, of shape ``ids.shape + (dim,)``; the tables are not in ``params``.

    Attributes:
        init: ``init(key) -> params``, a pytree of arrays (jitted by psfw).
        loss: ``loss(params, x, y) -> (loss, metrics)``: the mean loss of the rows
            and a dict of scalar metrics (jitted by psfw, differentiated in ``params``).
        layers: the layers as JSON-able dicts, for ``net.json`` and its picture.
        tables: the embedding tables by name (empty: none).
        ids: with tables, ``ids(x) -> {table: int ids}``.
        score: optional ``score(params, x, embedded)``: one score per row (the test
            set's AUC is reported for a binary label).
        predict: optional ``predict(params, x)`` (``predict(params, x, embedded)``
            with tables): class probabilities for a classifier, values for a
            regression, next-token distributions for a language model (``psfw
            predict``, ``psfw.load_model``).
    """

    init: Callable[[jax.Array], Params]
    loss: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
    layers: list[Layer]
    tables: Mapping[str, TableSpec] = {}
    ids: Callable[[Any], dict[str, Any]] | None = None
    score: Callable[..., jax.Array] | None = None
    predict: Callable[..., jax.Array] | None = None


Loss = Callable[[jax.Array, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
Output = Callable[[jax.Array], jax.Array]  # a head's outputs -> what the model predicts


def classification_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict]:
    """Mean softmax cross-entropy and accuracy of integer labels (of any shape: a
    sequence's labels are averaged over its positions too; a column of labels,
    ``(B, 1)``, is one label per row)."""
    labels = labels.reshape(logits.shape[:-1])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    accuracy = (jnp.argmax(logits, axis=-1) == labels).mean()
    return loss, {"accuracy": accuracy}


def regression_loss(outputs: jax.Array, targets: jax.Array) -> tuple[jax.Array, dict]:
    """Mean squared error over the rows and target values; no accuracy."""
    error = outputs.reshape(targets.shape) - targets.astype(outputs.dtype)
    return jnp.mean(error**2), {}


def class_probabilities(logits: jax.Array) -> jax.Array:
    """A classifier's prediction: the probability of each class (the last axis)."""
    return jax.nn.softmax(logits, axis=-1)


def head_for(classes: int | None, label_shape: tuple[int, ...]) -> tuple[int, Loss, str, Output]:
    """A classifier's or a regressor's last layer: its width, its loss, the loss's
    name (net.json) and its prediction: ``classes`` logits whose probabilities are
    predicted, or one output per target value, predicted in the labels' shape."""
    if classes is not None:
        return classes, classification_loss, "softmax_cross_entropy", class_probabilities
    shape = tuple(label_shape)
    return math.prod(label_shape), regression_loss, "mean_squared_error", lambda h: h.reshape(h.shape[0], *shape)


def _dense_init(key: jax.Array, fan_in: int, fan_out: int) -> dict[str, jax.Array]:
    scale = jnp.sqrt(2.0 / fan_in)
    return {
        "w": jax.random.normal(key, (fan_in, fan_out), jnp.float32) * scale,
        "b": jnp.zeros((fan_out,), jnp.float32),
    }


def mlp(
    sizes: Sequence[int],
    head: Loss = classification_loss,
    head_name: str = "softmax_cross_entropy",
    output: Output = class_probabilities,
) -> Model:
    """A ReLU multi-layer perceptron over flattened inputs.

    Args:
        sizes: ``[inputs, hidden..., outputs]``.
        head: ``head(outputs, labels) -> (loss, metrics)`` (default: softmax
            cross-entropy and accuracy of integer labels; see ``head_for``).
        head_name: the head's name in ``net.json``.
        output: what ``predict`` makes of the outputs (default: class probabilities).

    Returns:
        A ``Model`` with ``init``, ``loss`` and ``predict``; its parameters are
        ``{"dense0": {"w", "b"}, ...}``.

    Raises:
        ValueError: fewer than two sizes, or a size under 1.

    Example::

        model = psfw.mlp([64, 32, 10])
        params = model.init(jax.random.PRNGKey(0))
    """
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"mlp sizes must be at least [inputs, classes], got {sizes}")
    names = [f"dense{i}" for i in range(len(sizes) - 1)]

    def init(key: jax.Array) -> Params:
        keys = jax.random.split(key, len(names))
        return {n: _dense_init(k, a, b) for n, k, a, b in zip(names, keys, sizes, sizes[1:])}

    def apply(params: Params, x: jax.Array) -> jax.Array:
        h = x.reshape(x.shape[0], -1).astype(jnp.float32)
        for i, n in enumerate(names):
            h = h @ params[n]["w"] + params[n]["b"]
            if i < len(names) - 1:
                h = jax.nn.relu(h)
        return h

    def loss(params: Params, x: jax.Array, y: jax.Array) -> tuple[jax.Array, dict]:
        return head(apply(params, x), y)

    def predict(params: Params, x: jax.Array) -> jax.Array:
        return output(apply(params, x))

    layers: list[Layer] = [{"name": "input", "type": "input", "shape": [sizes[0]], "params": []}]
    for i, n in enumerate(names):
        layers.append({"name": n, "type": "dense", "units": sizes[i + 1], "params": [f"{n}/w", f"{n}/b"]})
        if i < len(names) - 1:
            layers.append({"name": f"relu{i}", "type": "relu", "params": []})
    layers.append({"name": "loss", "type": head_name, "params": []})
    return Model(init, loss, layers, predict=predict)


def cnn(
    input_shape: Sequence[int],
    classes: int,
    channels: Sequence[int] = (16, 32),
    head: Loss = classification_loss,
    head_name: str = "softmax_cross_entropy",
    output: Output = class_probabilities,
) -> Model:
    """A small convnet for NHWC images: 3x3 conv + ReLU (+ 2x2 average pool between
    convs), then a dense layer of ``classes`` outputs.

    Args:
        input_shape: ``(height, width, channels)`` of an image.
        classes: the outputs of the last layer.
        channels: the output channels of each conv.
        head: ``head(outputs, labels) -> (loss, metrics)`` (default: softmax
            cross-entropy and accuracy of integer labels).
        head_name: the head's name in ``net.json``.
        output: what ``predict`` makes of the outputs (default: class probabilities).

    Returns:
        A ``Model`` with ``init``, ``loss`` and ``predict``; its parameters are
        ``{"conv0": {"w", "b"}, ..., "head": {"w", "b"}}``.

    Example::

        model = psfw.cnn((8, 8, 1), classes=10)
    """
    height, width, in_ch = (int(d) for d in input_shape)
    chans = [in_ch, *map(int, channels)]
    conv_names = [f"conv{i}" for i in range(len(chans) - 1)]
    pools = len(conv_names) - 1
    flat = (height >> pools) * (width >> pools) * chans[-1]

    def init(key: jax.Array) -> Params:
        keys = jax.random.split(key, len(conv_names) + 1)
        params = {}
        for n, k, cin, cout in zip(conv_names, keys, chans, chans[1:]):
            w = jax.random.normal(k, (3, 3, cin, cout), jnp.float32) * jnp.sqrt(2.0 / (9 * cin))
            params[n] = {"w": w, "b": jnp.zeros((cout,), jnp.float32)}
        params["head"] = _dense_init(keys[-1], flat, classes)
        return params

    def apply(params: Params, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        for i, n in enumerate(conv_names):
            h = jax.lax.conv_general_dilated(
                h, params[n]["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
            h = jax.nn.relu(h + params[n]["b"])
            if i < pools:
                h = jax.lax.reduce_window(h, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4
        h = h.reshape(h.shape[0], -1)
        return h @ params["head"]["w"] + params["head"]["b"]

    def loss(params: Params, x: jax.Array, y: jax.Array) -> tuple[jax.Array, dict]:
        return head(apply(params, x), y)

    def predict(params: Params, x: jax.Array) -> jax.Array:
        return output(apply(params, x))

    layers: list[Layer] = [{"name": "input", "type": "input", "shape": [height, width, in_ch], "params": []}]
    for i, n in enumerate(conv_names):
        layers.append({"name": n, "type": "conv3x3_relu", "channels": chans[i + 1], "params": [f"{n}/w", f"{n}/b"]})
        if i < pools:
            layers.append({"name": f"pool{i}", "type": "avg_pool2x2", "params": []})
    layers.append({"name": "head", "type": "dense", "units": classes, "params": ["head/w", "head/b"]})
    layers.append({"name": "loss", "type": head_name, "params": []})
    return Model(init, loss, layers, predict=predict)


def load_user_model(path: str | Path, **options: Any) -> Model:
    """Load a user's model from a Python file that defines ``init(key)`` and
    ``loss(params, x, y)``.

    ``loss`` returns the mean loss, or ``(loss, metrics)`` with a dict of scalars
    (``accuracy`` is shown when present). An optional ``layers`` list describes the
    net structure: layer names (each uses the parameters under its name) or dicts
    with ``name``, ``type`` and ``params`` (see ``compute.netgraph.check_layers``);
    without it, one layer per top-level parameter group is assumed.
    If the file defines ``make(**options)``, it is called with the config's
    ``options`` and must return an object with ``init`` and ``loss``. A model with
    embedding tables also gives ``tables`` (name -> ``TableSpec``) and ``ids(x)``,
    and its loss takes the looked-up rows (see ``Model``). An optional
    ``predict(params, x[, embedded])`` is what ``psfw predict`` answers with.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model file {path} does not exist: give a path to a .py file")
    module = import_user_file(path, "model")
    made = hasattr(module, "make")
    if options and not made:
        raise ValueError(
            f"options are given, but {path} has no make(**options) to take them: define make, or drop them"
        )
    if made and hasattr(module, "layers"):
        raise ValueError(
            f"{path} defines make() and a module-level layers, which make's model would not use: return the layers "
            "from make, as psfw.Model(init, loss, layers)"
        )
    if made:
        try:
            source = module.make(**options)
        except Exception as err:
            raise ValueError(f"make(**{options}) of {path} failed: {type(err).__name__}: {err}") from None
    else:
        source = module
    for name in ("init", "loss"):
        if not callable(getattr(source, name, None)):
            if made:
                raise ValueError(
                    f"make() of {path} returned {type(source).__name__}, not a model with {name}: return "
                    "psfw.Model(init, loss, layers) (or any object with init and loss)"
                )
            raise ValueError(f"model file {path} must define a function {name}()")
    user_loss = source.loss

    def loss(params: Params, x: jax.Array, y: jax.Array, *embedded: Any) -> tuple[jax.Array, dict]:
        out = user_loss(params, x, y, *embedded)
        return out if isinstance(out, tuple) else (out, {})

    layers = getattr(source, "layers", None)  # checked against the parameters by the job (netgraph.check_layers)
    tables = dict(getattr(source, "tables", None) or {})
    return Model(
        source.init,
        loss,
        [] if layers is None else layers,
        tables,
        getattr(source, "ids", None),
        getattr(source, "score", None),
        getattr(source, "predict", None),
    )
