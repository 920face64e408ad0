"""Checks of a job before anything starts: the model's contract on its shapes, the
memory its parameters need, and its data. Each mistake is one ConfigError naming
the config, the field and what to change, never a traceback after the shards start."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from psfw.compute.params import flatten_params
from psfw.jobs.config import Config
from psfw.protocol.wire import DTYPES

GB = 1e9


def _kind(value: Any) -> str:
    """``float32[32, 10]``, or the type of a value that is no array."""
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        return f"{value.dtype}{list(value.shape)}"
    return type(value).__name__


def check_loss_output(config: Config, field: str, out: Any, seen: str) -> tuple[Any, dict]:
    """The loss's ``(value, metrics)`` (as ``jax.eval_shape`` gives them); ConfigError
    unless value is a float scalar and metrics a dict of scalars."""
    if not (isinstance(out, tuple) and len(out) == 2):
        raise config.error(field, f"loss must return the mean loss or (loss, metrics), not {len(out)} values ({seen})")
    value, metrics = out
    if getattr(value, "shape", None) != ():
        raise config.error(field, f"loss must return the mean loss over the rows (a scalar), not {value} ({seen})")
    if not jax.numpy.issubdtype(value.dtype, jax.numpy.floating):
        raise config.error(
            field, f"loss returns the mean loss as {value.dtype}: it must be a float, as only a float has a gradient"
        )
    if not isinstance(metrics, Mapping):
        raise config.error(
            field,
            f"loss returns (loss, {_kind(metrics)}): the second value must be a dict of scalar metrics, "
            "e.g. {'accuracy': ...}, or return the loss alone",
        )
    wrong = sorted(k for k, v in metrics.items() if getattr(v, "shape", None) != ())
    if wrong:
        raise config.error(field, f"the metrics {wrong} the loss returns must be scalars ({seen})")
    return value, dict(metrics)


def check_parameters(config: Config, field: str, shapes: Any) -> tuple[dict[str, Any], Any]:
    """The flat parameters of ``init``'s shapes and their treedef; ConfigError when
    two names collide or a leaf has a dtype the shards do not hold."""
    try:
        flat, treedef = flatten_params(shapes)
    except ValueError as err:
        raise config.error(field, f"init(key): {err} (names are the keys' path joined by /)") from None
    for name, leaf in flat.items():
        dtype = str(getattr(leaf, "dtype", type(leaf).__name__))
        if dtype in DTYPES:
            continue
        accepted = f"{', '.join(DTYPES[:-1])} or {DTYPES[-1]}"
        if dtype == "bfloat16":
            why = (
                "keep it float32 and cast it in the loss (a bfloat16 weight drops every update under 1/256 of its size)"
            )
        elif np.dtype(dtype).kind in "iub":
            why = "an integer takes no gradient: keep it out of init's parameters (a constant in the loss, or a table's ids)"
        else:
            why = "store it as one of these"
        raise config.error(field, f"parameter {name} is {dtype}: the shards hold {accepted} parameters: {why}")
    return flat, treedef


def check_gradient(config: Config, field: str, loss: Callable[..., Any], inputs: tuple, tables: bool) -> None:
    """ConfigError when the loss's gradient is not defined for the parameters (and
    the looked-up table rows), found on the shapes alone (``eval_shape`` of ``grad``)."""
    wrt = (0, len(inputs) - 1) if tables else 0
    try:
        jax.eval_shape(jax.grad(lambda *a: loss(*a)[0], argnums=wrt), *inputs)
    except Exception as err:
        text = str(err).strip().splitlines()
        raise config.error(
            field, f"the loss has no gradient: {type(err).__name__}: {text[0] if text else ''}"
        ) from None
