"""Checks of a job before anything starts: the model's contract on its shapes, the
memory its parameters need, and its data. Each mistake is one ConfigError naming
the config, the field and what to change, never a traceback after the shards start."""

from __future__ import annotations

import json
import math
import os
import resource
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from psfw.compute.params import flatten_params
from psfw.compute.tables import MAX_ID, check_ids
from psfw.jobs.config import Config
from psfw.protocol.wire import DTYPES

GB = 1e9


def model_field(config: Config) -> str:
    """``model.path: my_model.py`` or ``model.name: mlp``: the field a model's errors name."""
    m = config.model
    return f"model.path: {m.path}" if m.name == "custom" else f"model.name: {m.name}"


def _kind(value: Any) -> str:
    """``float32[32, 10]``, or the type of a value that is no array."""
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        return f"{value.dtype}{list(value.shape)}"
    return type(value).__name__


def check_loss_output(config: Config, field: str, out: Any, seen: str) -> tuple[Any, dict]:
    """The loss's ``(value, metrics)`` (as ``jax.eval_shape`` gives them); ConfigError
    unless value is a float scalar and metrics a dict of scalars."""
    if not (isinstance(out, tuple) and len(out) == 2):
        got = f"{len(out)} values" if isinstance(out, tuple) else _kind(out)
        raise config.error(field, f"loss must return the mean loss or (loss, metrics), not {got} ({seen})")
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
        if np.dtype(dtype).kind in "iub":
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


def available_memory() -> int:
    """Bytes this OS process may still take: the kernel's MemAvailable, or the free room
    under the cgroup's limit where that is lower (a container), or the physical memory."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _bytes(tree: Any) -> int:
    return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))


def check_memory(config: Config, field: str, params: Mapping[str, Any], shards_here: bool) -> None:
    """ConfigError when this machine cannot hold the parameters (``params``: shapes):
    every worker process keeps all of them; with ``shards_here`` (``psfw train``) the
    shards keep them again, with their optimizer's state. Known before anything is
    allocated, which is better than XLA aborting the OS process."""
    size = _bytes(params)
    need, held = size, f"the parameters need {size / GB:.1f} GB"
    if shards_here:
        from psfw.compute.optimizers import build_optimizer

        try:
            optimizer = build_optimizer(json.loads(config.optimizer.spec_json()))
            state = _bytes(jax.eval_shape(optimizer.init, dict(params)))
        except ValueError:  # a spec the shards refuse, with a line of their own
            state = 0
        need = 2 * size + state
        held += f" twice (the workers' copy and the shards'), and the shards' optimizer state {state / GB:.1f} GB more"
    room = available_memory()
    if need > room:
        raise config.error(field, f"{held}, this machine has {room / GB:.1f} GB available: make the model smaller")


# open files an embedded shard takes, by cluster.transport: 2 for its gRPC listener
# and poller, 2 more for its link's sockets; the network path adds a connection (both
# ends) of each kind. Measured: 190 shards start under ulimit -n 1024 with auto, not network
FILES_PER_SHARD = {"auto": 4, "network": 8, "grpc": 8}
FILES_BESIDE = 256  # the process's own: libraries, the data's files, the run folder


def check_shards_here(config: Config, params: Mapping[str, Any]) -> None:
    """What ``psfw train`` starts in this OS process, checked before it starts: memory
    for the parameters, the shards' copy and their optimizer state, and an open file
    for each socket the shards need (``cannot listen`` is what running out looks like)."""
    check_memory(config, model_field(config), params, shards_here=True)
    servers = config.cluster.servers
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    need = servers * FILES_PER_SHARD[config.cluster.transport] + FILES_BESIDE
    if limit != resource.RLIM_INFINITY and need > limit:
        raise config.error(
            "cluster.servers",
            f"{servers} shards in this process need about {need} open files, and it may open {limit} "
            f"(ulimit -n): lower cluster.servers, or raise the limit",
        )


ID_ROWS = 65536  # rows whose ids are checked at a time


def check_table_ids(config: Config, model: Any, data: Any) -> None:
    """ConfigError naming the split, the first row and the table where ``ids(x)``
    of any training or test row falls outside a table's rows, a chunk of rows at a
    time (the shards would refuse it when a batch reached it, mid-run)."""
    if not model.tables:
        return
    for split in ("x_train", "x_test"):
        x = getattr(data, split)
        for start in range(0, len(x), ID_ROWS):
            chunk = np.asarray(x[start : start + ID_ROWS])
            try:
                used = model.ids(chunk)
                found = {name: used[name] for name in model.tables}
            except Exception as err:  # the first batch passed: a later row breaks ids(x)
                text = str(err).strip().splitlines()
                problem = f"ids(x) failed on {split} rows from {start}: {type(err).__name__}: {text[0] if text else ''}"
                raise config.error(model_field(config), problem) from None
            for name, spec in model.tables.items():
                try:
                    check_ids(name, found[name], spec)
                except ValueError as err:
                    row = start + _first_bad_row(np.asarray(found[name]), spec, len(chunk))
                    raise config.error(model_field(config), f"{err} ({split} row {row})") from None


def _first_bad_row(ids: np.ndarray, spec: Any, rows: int) -> int:
    """The first row (of ``rows``) whose ids are out of the table's range, where ids
    come one block per row; else 0 (the chunk's first)."""
    limit = MAX_ID if spec.rows is None else spec.rows - 1
    if ids.ndim == 0 or len(ids) != rows:
        return 0
    bad = ((ids < 0) | (ids > limit)).reshape(rows, -1).any(axis=1)
    return int(np.argmax(bad))
