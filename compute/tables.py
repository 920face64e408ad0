"""Embedding tables: what a model declares, where each row lives, how a row starts.

A table is ``rows`` x ``dim`` (``rows`` None: any id >= 0, rows made on first use).
It is never whole in one place: each id belongs to one shard, picked by a 64-bit
mix of the table's name and the id (``route``), so that hot ids, small ids and ids
with a common stride spread over every shard. A row's first value depends only on
the job's seed, the table and the id (``initial_rows``): every shard, every shard
count and every restart makes the same row.

Everything here is numpy on the host: the ids of a batch are known before its step.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, NamedTuple

import numpy as np

from psfw.compute.optimizer_schema import SpecError, check_spec

INITS = ("normal", "uniform", "zeros")
TABLE_OPTIMIZERS = ("sgd", "adagrad", "adam")  # lazy: a row that is not touched does not move
BIAS_CORRECTIONS = ("per_row", "global")
MAX_ID = 2**63 - 1
MIN_BUCKET = 16

_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


class TableSpec(NamedTuple):
    """One embedding table of a model, as its ``Model.tables`` declares it. The
    table lives on the shards, spread over them by id; a step moves only the rows
    its batch uses.

    Attributes:
        rows: ids 0..rows-1 (None: any id from 0 to 2^63-1, rows made on first use).
        dim: the width of a row (1 to 65536).
        init: a row's initial value: "normal" (mean 0, deviation ``scale``),
            "uniform" (in [-scale, scale)) or "zeros"; it depends only on the seed,
            the table and the id.
        scale: see ``init``.
        optimizer: the spec of its row-wise optimizer, as the config's ``[tables]``
            writes one (None: the job's table optimizer).

    Example::

        tables = {"user": TableSpec(rows=10_000, dim=16), "item": TableSpec(None, 16)}
    """

    rows: int | None
    dim: int
    init: str = "normal"
    scale: float = 0.01
    optimizer: dict[str, Any] | None = None

    def describe(self) -> dict[str, Any]:
        """As JSON (net.json, partition.json, the shards' declaration)."""
        return {"rows": self.rows, "dim": self.dim, "init": self.init, "scale": self.scale}


def check_table(name: str, spec: TableSpec) -> None:
    """ValueError saying what is wrong with a table's declaration."""
    if not name or "/" in name or len(name) > 100:
        raise ValueError(f"table name {name!r}: use 1 to 100 characters without '/'")
    if spec.rows is not None and (not isinstance(spec.rows, int) or not 1 <= spec.rows <= MAX_ID):
        raise ValueError(f"table {name}: rows {spec.rows!r} must be a whole number from 1 to 2^63-1, or None")
    if not isinstance(spec.dim, int) or not 1 <= spec.dim <= 65536:
        raise ValueError(f"table {name}: dim {spec.dim!r} must be a whole number from 1 to 65536")
    if spec.init not in INITS:
        raise ValueError(f"table {name}: init {spec.init!r}: use one of {', '.join(INITS)}")
    if not (isinstance(spec.scale, int | float) and math.isfinite(spec.scale) and spec.scale >= 0):
        raise ValueError(f"table {name}: scale {spec.scale!r} must be a finite number >= 0")


def check_table_optimizer(spec: Any) -> dict[str, Any]:
    """A table optimizer's spec with every field filled in; SpecError naming the
    field otherwise. Only optimizers that leave untouched rows alone are offered
    (sgd, adagrad, lazy adam); no schedules and no weight decay, which would move
    every row each step."""
    if not isinstance(spec, dict):
        raise SpecError("", f'a table optimizer spec is a JSON object such as {{"name": "adagrad"}}, got {spec!r}')
    spec = dict(spec)
    correction = spec.pop("bias_correction", "per_row")
    if spec.get("name") not in TABLE_OPTIMIZERS:
        raise SpecError(
            "name",
            f"{spec.get('name')!r} cannot train a table: use {', '.join(TABLE_OPTIMIZERS)} (a table's optimizer "
            "must leave the rows a step does not touch alone)",
        )
    for field in ("schedule", "weight_decay", "momentum", "decay"):
        if field in spec:
            raise SpecError(field, "is not offered for tables: it would move rows that a step does not touch")
    checked = check_spec(spec)
    if correction not in BIAS_CORRECTIONS or (correction != "per_row" and checked.name != "adam"):
        raise SpecError("bias_correction", f"{correction!r}: adam takes per_row (the default) or global")
    out: dict[str, Any] = {"name": checked.name, "learning_rate": checked.fields["learning_rate"]}
    if checked.name == "adagrad":
        out.update(initial_accumulator_value=checked.fields["initial_accumulator_value"], eps=1e-7)
        if "eps" in spec:
            out["eps"] = checked.fields["eps"]
    if checked.name == "adam":
        out.update({k: checked.fields[k] for k in ("b1", "b2", "eps")}, bias_correction=correction)
    return out


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, element-wise on uint64 (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def name_key(name: str, purpose: str) -> np.uint64:
    """A 64-bit key of a table's name for one purpose (routing, initial values)."""
    return np.uint64(int.from_bytes(hashlib.blake2b(f"{purpose}:{name}".encode(), digest_size=8).digest(), "little"))


def route(name: str, ids: np.ndarray, shards: int) -> np.ndarray:
    """The shard of each id of table ``name`` (int64 ids >= 0), as intp."""
    with np.errstate(over="ignore"):
        mixed = _mix(np.asarray(ids, np.int64).astype(np.uint64) ^ name_key(name, "route"))
    return (mixed % np.uint64(shards)).astype(np.intp)


def initial_rows(seed: int, name: str, ids: np.ndarray, spec: TableSpec) -> np.ndarray:
    """The first value of each row of ``ids``: float32 ``[len(ids), dim]``, a pure
    function of (seed, table, id) and the table's init and scale."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    out = np.zeros((ids.size, spec.dim), np.float32)
    if spec.init == "zeros" or spec.scale == 0:
        return out
    key = name_key(name, "init") ^ _mix(np.asarray([seed], np.uint64))[0]
    step = max(1, (1 << 22) // spec.dim)  # rows at a time: the temporaries stay near 100 MB
    for start in range(0, ids.size, step):
        out[start : start + step] = _draws(ids[start : start + step], key, spec)
    return out


def _draws(ids: np.ndarray, key: np.uint64, spec: TableSpec) -> np.ndarray:
    """``dim`` draws per id: one 64-bit mix per value, its two halves the two
    uniforms of Box-Muller (or the high half alone for "uniform")."""
    with np.errstate(over="ignore"):
        base = _mix(ids.astype(np.uint64) ^ key)
        bits = _mix(base[:, None] + _GOLDEN * np.arange(1, spec.dim + 1, dtype=np.uint64)[None, :])
    high = (bits >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / 2**24)  # in [0, 1)
    if spec.init == "uniform":
        return (high * 2 - 1) * np.float32(spec.scale)
    low = ((bits & np.uint64(0xFFFFFF)) + np.uint64(1)).astype(np.float32) * np.float32(1.0 / 2**24)  # in (0, 1]
    return np.sqrt(-2 * np.log(low)) * np.cos(np.float32(2 * np.pi) * high) * np.float32(spec.scale)  # Box-Muller


def bucket(count: int) -> int:
    """The padded size of ``count`` unique rows: the next power of two (at least
    16), so that a worker's jitted step compiles once per bucket, not per batch."""
    return max(MIN_BUCKET, 1 << max(0, count - 1).bit_length())


def unique_ids(parts: list[np.ndarray]) -> np.ndarray:
    """The sorted unique int64 ids of every array of ``parts``."""
    flat = [np.asarray(p, np.int64).reshape(-1) for p in parts]
    return np.unique(np.concatenate(flat)) if flat else np.zeros(0, np.int64)


def check_ids(name: str, ids: np.ndarray, spec: TableSpec) -> np.ndarray:
    """``ids`` as int64; ValueError naming the table when one is out of its range."""
    array = np.asarray(ids)
    if array.dtype.kind not in "iu":
        raise ValueError(f"table {name}: ids must be integers, got {array.dtype}")
    if array.size:
        low, high = int(array.min()), int(array.max())
        limit = MAX_ID if spec.rows is None else spec.rows - 1
        if low < 0 or high > limit:
            bad = low if low < 0 else high
            raise ValueError(f"table {name}: id {bad} is outside 0..{limit}")
    return array.astype(np.int64, copy=False)


COUNTED_ROWS = 1 << 22  # a bounded table's ids routed one by one to count its rows per shard (about 0.3 s)


def rows_by_shard(name: str, rows: int, shards: int) -> list[int] | None:
    """How many of the ids 0..rows-1 of table ``name`` each of ``shards`` holds, by
    ``route``; None past ``COUNTED_ROWS`` rows (each shard then holds about
    rows/shards: the mix spreads ids evenly)."""
    if rows > COUNTED_ROWS:
        return None
    counts = np.zeros(shards, np.int64)
    for start in range(0, rows, 1 << 20):  # in pieces: a few MB at a time
        ids = np.arange(start, min(start + (1 << 20), rows), dtype=np.int64)
        counts += np.bincount(route(name, ids, shards), minlength=shards)
    return [int(n) for n in counts]
