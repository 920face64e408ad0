"""A checkpoint's state by names and ids, whatever the shards it was cut into.

The shards of a job each save their slices and their rows (``psfw.services.
persistence``); read back together, a checkpoint is one state: every parameter
whole with its optimizer state, every table's rows in id order with theirs, and what
every shard holds alike (each group's step and last contributors, the optimizer,
the job, the tables' update counts). ``read_state`` puts it together and checks that
the shards agree; ``state_digest`` hashes it, so a checkpoint and its re-cut for
another number of shards (``psfw.jobs.reshard``) have one digest.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from psfw.base.errors import UsageError
from psfw.services.checkpoint import load_shard, saved_file

WAITING = ("ids", "counts", "seen")  # the arrays of the ids that wait for admission (psfw.services.table_lifetime)


@dataclass
class WholeParam:
    """A parameter's slices put back together, flat, with their optimizer state:
    ``leaves`` in the state's order, a slice-shaped leaf whole and flat, a scalar
    one (a step count) as one slice saved it."""

    value: np.ndarray
    version: int
    leaves: list[np.ndarray]
    per_element: list[bool]  # each leaf: shaped like the parameter (re-cut with it) or not (the same everywhere)


@dataclass
class WholeTable:
    """A table's rows from every shard, in id order, with their state; the last
    uses and the ids that wait for admission when the table's rows have a lifetime."""

    updates: int
    ids: np.ndarray
    values: np.ndarray
    state: dict[str, np.ndarray]
    last_used: np.ndarray | None
    waiting: dict[str, np.ndarray] | None  # WAITING -> arrays, in id order
    counts: dict[str, int]  # rows admitted, expired and evicted, over all shards


@dataclass
class CheckpointState:
    """A whole checkpoint (see the module docstring)."""

    step: int
    made_on: int  # the shards it was cut into
    optimizer: str
    job: str
    groups: dict[str, Any]  # group -> {"step", "last"}, as every shard saved it
    epoch: int
    updates_applied: int
    params: dict[str, WholeParam] = field(default_factory=dict)
    declaration: str = ""  # the tables' declaration (JSON), '' for none
    tables: dict[str, WholeTable] = field(default_factory=dict)


def read_state(root: Path, step: int, shards: int, what: str = "") -> CheckpointState:
    """The checkpoint of ``step`` in ``root`` of ``shards`` shards, as one state.

    Raises UsageError, in one line that begins with ``what`` (default: which
    checkpoint), when a shard's file is missing or the shards do not agree: another
    number of shards or another optimizer, job or tables in one file, a group at
    another step, a table at another update count, slices missing, a step count of
    the optimizer that differs across a parameter's slices."""
    what = what or f"the checkpoint of step {step} made on {shards} shards in {root}"
    saved = []
    for shard in range(shards):
        path = saved_file(root, step, shard, shards)
        try:
            saved.append(load_shard(root, step, shard, shards))
        except Exception as err:  # noqa: BLE001 (safetensors raises its own kind for a torn file)
            reason = "is missing" if not path.exists() else f"cannot be read ({err})"
            raise UsageError(f"{what}: shard {shard}'s file {path.name} {reason}") from None
    metas = [meta for _, meta in saved]
    for shard, meta in enumerate(metas):
        if (meta.get("shard"), meta.get("shards")) != (shard, shards):
            raise UsageError(
                f"{what}: the file of shard {shard} holds shard {meta.get('shard')} of {meta.get('shards')}"
            )
    _check_same(what, metas, "groups", "each group's step and last contributors")
    _check_same(what, [m.get("tables", {}).get("declaration", "") for m in metas], None, "embedding tables")
    _check_same(what, [m.get("job", "") for m in metas if m.get("job")], None, "job")
    specs = {m["optimizer"] for m in metas if m.get("optimizer")}
    if len(specs) > 1:
        raise UsageError(f"{what}: the shards train with different optimizers")
    state = CheckpointState(
        step=step,
        made_on=shards,
        optimizer=next(iter(specs), ""),
        job=next((m["job"] for m in metas if m.get("job")), ""),
        groups=metas[0]["groups"],
        epoch=max(int(m.get("epoch", 0)) for m in metas),
        updates_applied=max(int(m.get("updates_applied", 0)) for m in metas),
        declaration=metas[0].get("tables", {}).get("declaration", ""),
    )
    state.params = _whole_params(what, saved, state.optimizer)
    if state.declaration:
        state.tables = _whole_tables(what, saved, json.loads(state.declaration))
    return state


def _check_same(what: str, values: list, key: str | None, named: str) -> None:
    """UsageError naming the first two shards whose ``values`` (or their ``key``) differ."""
    picked = [v.get(key) for v in values] if key is not None else values
    for shard, value in enumerate(picked[1:], 1):
        if value != picked[0]:
            if key == "groups":
                raise UsageError(f"{what}: {_groups_differ(picked[0], value, shard)}")
            raise UsageError(f"{what}: shard 0 and shard {shard} hold different {named}")


def _groups_differ(first: dict, other: dict, shard: int) -> str:
    for group in sorted(set(first) | set(other), key=int):
        a, b = first.get(group, {}), other.get(group, {})
        if a.get("step") != b.get("step"):
            return (
                f"group {group} is at step {a.get('step', 0)} on shard 0 and {b.get('step', 0)} on shard {shard} "
                "(its update was on its way when the checkpoint was taken): resume on the shards it was made on "
                "until the next checkpoint, and re-cut that one"
            )
    return f"the last contributors of a step differ between shard 0 and shard {shard}"


@functools.cache
def _per_element(spec: str, dtype: str) -> tuple[bool, ...]:
    """Which leaves of the optimizer state of ``spec`` are shaped like the parameter
    (a scalar leaf, a step count, may come back from a file as shape (1,), so the
    file's shapes cannot tell)."""
    import jax

    from psfw.compute.optimizers import build_optimizer

    shapes = jax.eval_shape(build_optimizer(json.loads(spec)).init, jax.ShapeDtypeStruct((2,), dtype))
    return tuple(leaf.shape == (2,) for leaf in jax.tree.leaves(shapes))


def _whole_params(what: str, saved: list, spec: str) -> dict[str, WholeParam]:
    """Every parameter's slices in index order, put together (see WholeParam)."""
    parts: dict[str, dict[int, tuple[np.ndarray, int, list[np.ndarray]]]] = {}
    for tensors, meta in saved:
        for index, entry in enumerate(meta.get("slices", [])):
            leaves = []
            while f"opt/{index}/{len(leaves)}" in tensors:
                leaves.append(tensors[f"opt/{index}/{len(leaves)}"])
            parts.setdefault(entry["key"], {})[int(entry["slice"])] = (
                tensors[f"value/{index}"],
                int(entry["version"]),
                leaves,
            )
    params = {}
    for name, slices in sorted(parts.items()):
        missing = sorted(set(range(len(slices))) - set(slices))
        if missing or max(slices) != len(slices) - 1:
            raise UsageError(f"{what}: slice {missing[0] if missing else len(slices)} of {name} is missing")
        ordered = [slices[i] for i in range(len(slices))]
        versions = {version for _, version, _ in ordered}
        if len(versions) > 1:
            raise UsageError(f"{what}: the slices of {name} are at different versions {sorted(versions)}")
        value = np.concatenate([v.reshape(-1) for v, _, _ in ordered])
        per_element = list(_per_element(spec, str(value.dtype))) if spec else []
        counts = {len(leaves) for _, _, leaves in ordered}
        if counts != {len(per_element)}:
            raise UsageError(f"{what}: the optimizer state of {name} is not of the shards' optimizer")
        leaves = []
        for j, shaped in enumerate(per_element):
            if shaped:
                leaves.append(np.concatenate([each[j].reshape(-1) for _, _, each in ordered]))
                continue
            first = ordered[0][2][j]
            if any(not np.array_equal(each[j].reshape(-1), first.reshape(-1)) for _, _, each in ordered[1:]):
                shown = sorted({each[j].reshape(-1).tolist()[0] for _, _, each in ordered})
                raise UsageError(
                    f"{what}: the optimizer's step count of {name} differs across its slices ({shown}): "
                    "the shards were not at one step"
                )
            leaves.append(first)
        params[name] = WholeParam(value, versions.pop(), leaves, per_element)
    return params


def _whole_tables(what: str, saved: list, declared: dict[str, Any]) -> dict[str, WholeTable]:
    """Every table's rows from every shard, in id order (see WholeTable)."""
    tables = {}
    for name in sorted(declared):
        updates = {int(meta["tables"]["updates"][name]) for _, meta in saved}
        if len(updates) > 1:
            raise UsageError(f"{what}: table {name} is at different update counts {sorted(updates)} across the shards")
        prefix = f"table/{name}/"
        ids = np.concatenate([np.asarray(t[prefix + "ids"], np.int64) for t, _ in saved])
        order = np.argsort(ids, kind="stable")

        keys = sorted(k[len(prefix + "state/") :] for k in saved[0][0] if k.startswith(prefix + "state/"))
        lived = all(prefix + "last_used" in t for t, _ in saved)
        waiting = None
        if all(prefix + "waiting/ids" in t for t, _ in saved):
            arrays = {k: np.concatenate([t[f"{prefix}waiting/{k}"] for t, _ in saved]) for k in WAITING}
            by_id = np.argsort(arrays["ids"], kind="stable")
            waiting = {k: v[by_id] for k, v in arrays.items()}
        counts = {
            k: sum(int(meta["tables"].get("lifetime", {}).get(name, {}).get(k, 0)) for _, meta in saved)
            for k in ("admitted", "expired", "evicted")
        }
        tables[name] = WholeTable(
            updates=updates.pop(),
            ids=ids[order],
            values=_gathered(saved, prefix + "values", order),
            state={k: _gathered(saved, f"{prefix}state/{k}", order) for k in keys},
            last_used=_gathered(saved, prefix + "last_used", order) if lived else None,
            waiting=waiting,
            counts=counts,
        )
    return tables


def _gathered(saved: list, name: str, order: np.ndarray) -> np.ndarray:
    """Tensor ``name`` of every shard, one after the other, in ``order``."""
    return np.concatenate([tensors[name] for tensors, _ in saved])[order]


def state_digest(state: CheckpointState) -> str:
    """A hash of the state by names and ids: equal for a checkpoint and its re-cut
    for any number of shards (parameters whole, rows in id order; the epoch, a count
    of restores, and the per-shard counts of rows admitted and gone are not state)."""
    h = hashlib.sha256()
    h.update(repr((state.step, state.optimizer, state.job, sorted(state.groups.items()))).encode())
    for name, param in state.params.items():
        h.update(repr((name, str(param.value.dtype), param.value.size, param.version)).encode())
        h.update(np.ascontiguousarray(param.value).tobytes())
        for leaf in param.leaves:
            h.update(repr((str(leaf.dtype), leaf.size)).encode())
            h.update(np.ascontiguousarray(leaf).tobytes())
    h.update(state.declaration.encode())
    for name, table in state.tables.items():
        h.update(repr((name, table.updates, len(table.ids))).encode())
        for array in (table.ids, table.values, *(table.state[k] for k in sorted(table.state))):
            h.update(np.ascontiguousarray(array).tobytes())
        if table.last_used is not None:
            h.update(np.ascontiguousarray(table.last_used).tobytes())
        for key in WAITING if table.waiting is not None else ():
            h.update(np.ascontiguousarray(table.waiting[key]).tobytes())
    return h.hexdigest()


def checkpoint_digest(root: str | Path, step: int, shards: int) -> str:
    """The digest of the checkpoint of ``step`` of ``shards`` shards in ``root``
    (see ``state_digest``); UsageError when it cannot be read whole."""
    return state_digest(read_state(Path(root), step, shards))
