"""Resuming onto another number of shards: the newest checkpoint re-cut for the job's.

A shard alone does not know the layout; the jobs layer does. Before the shards of a
resumed run start, ``reshard_newest`` looks at the newest checkpoint; when it was
made on another number of shards, it reads it whole (``psfw.jobs.checkpoint_state``),
checks that it holds the job's model, cuts the dense parameters anew by the layout
rule for the new count (``plan_layout`` with the job's ``slice_bytes``) with their
optimizer state, routes every table's rows to their new shards (``route``) with
their state, last uses and the ids that wait for admission, and writes the set for
the new count beside the old one, in the same step folder: every file, then the
manifest (``psfw.services.checkpoint.save_resharded``). It reads that set back and
compares its digest with the old one's before the shards load it as their own.
Nothing is written when the checkpoint cannot be re-cut.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from psfw.base.errors import PsfwError, UsageError
from psfw.compute.tables import route
from psfw.jobs.checkpoint_state import WAITING, CheckpointState, WholeTable, read_state, state_digest
from psfw.protocol.layout import plan_layout
from psfw.services.checkpoint import (
    CheckpointSet,
    checkpoint_sets,
    resharded_file,
    resharded_manifest,
    save_resharded,
)

log = logging.getLogger("psfw")


class ModelForm(NamedTuple):
    """What of a job a re-cut needs: its parameters' shapes and dtypes, the slice
    size of its layout, its tables' widths."""

    params: dict[str, tuple[tuple[int, ...], str]]
    slice_bytes: int
    tables: dict[str, int]

    @classmethod
    def of(cls, job: Any) -> ModelForm:
        """The form of a ``psfw.jobs.job.Job``."""
        return cls(
            {n: (tuple(p.shape), str(np.dtype(p.dtype))) for n, p in job.layout.params.items()},
            job.config.cluster.slice_bytes,
            {n: spec.dim for n, spec in job.model.tables.items()},
        )


class Resharded(NamedTuple):
    """A checkpoint re-cut: its step, the shards it was made on, the shards it is for."""

    step: int
    made_on: int
    shards: int

    def line(self) -> str:
        return f"restored the checkpoint of step {self.step} made on {self.made_on} shards onto {self.shards}"


def to_reshard(root: Path, shards: int) -> CheckpointSet | None:
    """The set to re-cut for ``shards`` shards: the newest step's, when that step has
    none of ``shards`` shards (None: nothing to re-cut; the shards load their own as
    ever). UsageError, naming what is missing, when no set of that step is whole."""
    sets = checkpoint_sets(root)
    if not sets:
        return None
    newest = max(s.step for s in sets)
    there = [s for s in sets if s.step == newest]
    if any(s.shards == shards for s in there):
        return None
    whole = [s for s in there if not s.missing()]
    if whole:
        return whole[0]
    missing = there[0].missing()
    raise UsageError(
        f"cannot re-cut the checkpoint of step {newest} made on {there[0].shards} shards in {root} for {shards}: "
        f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing or cut short; nothing was written"
    )


def reshard_newest(root: str | Path, form: ModelForm, shards: int) -> Resharded | None:
    """Re-cut the newest checkpoint in ``root`` for ``shards`` shards when it was
    made on another number (see the module docstring); None when there was nothing
    to re-cut. Raises UsageError, in one line, when it cannot be re-cut (another
    model, a shard's file missing, shards that disagree); nothing is written then."""
    root = Path(root)
    source = to_reshard(root, shards)
    if source is None:
        return None
    what = f"cannot re-cut the checkpoint of step {source.step} made on {source.shards} shards in {root} for {shards}"
    try:
        state = read_state(root, source.step, source.shards, what)
        problem = form_problem(state, form)
        if problem:
            raise UsageError(f"{what}: {problem}; resume with the config that trained it")
    except UsageError as err:
        raise UsageError(f"{err}; nothing was written") from None
    states = cut(state, form, shards)
    try:
        save_resharded(root, state.step, states, state.made_on)
    except OSError as err:
        _remove(root, state.step, shards)
        raise UsageError(f"{what}: {err.filename or ''} cannot be written: {err.strerror or err}") from None
    if state_digest(read_state(root, state.step, shards)) != state_digest(state):  # never load a set that is not it
        _remove(root, state.step, shards)
        raise PsfwError(f"{what}: the set written does not read back as the same state; it was removed")
    done = Resharded(state.step, state.made_on, shards)
    log.info("re-cut the checkpoint of step %d made on %d shards for %d in %s", done.step, done.made_on, shards, root)
    return done


def _remove(root: Path, step: int, shards: int) -> None:
    """The set re-cut for ``shards`` at ``step``: its manifest first."""
    resharded_manifest(root, step, shards).unlink(missing_ok=True)
    for shard in range(shards):
        resharded_file(root, step, shard, shards).unlink(missing_ok=True)


def form_problem(state: CheckpointState, form: ModelForm) -> str:
    """What makes the checkpoint's model not the job's ('' when it is the job's):
    parameter names, shapes or dtypes, embedding tables or their widths."""
    held = {}
    identity = json.loads(state.job) if state.job else {}
    for name, param in state.params.items():
        dtype, shape = identity.get("params", {}).get(name, (str(param.value.dtype), None))
        held[name] = (tuple(shape) if shape is not None else None, dtype, param.value.size)
    wrong = []
    for name in sorted(set(held) | set(form.params)):
        have, want = held.get(name), form.params.get(name)
        if have is None or want is None:
            wrong.append(
                f"{name}: {'absent' if have is None else _shown(have)} in the checkpoint, "
                f"{'absent' if want is None else _shown((*want, math.prod(want[0])))} in the job"
            )
        elif have[1] != want[1] or have[2] != math.prod(want[0]) or have[0] not in (None, want[0]):
            wrong.append(f"{name}: {_shown(have)} in the checkpoint, {_shown((*want, math.prod(want[0])))} in the job")
    declared = json.loads(state.declaration) if state.declaration else {}
    for name in sorted(set(declared) | set(form.tables)):
        have, want = declared.get(name, {}).get("dim"), form.tables.get(name)
        if have != want:
            wrong.append(
                f"table {name}: {'absent' if have is None else f'rows of {have}'} in the checkpoint, "
                f"{'absent' if want is None else f'rows of {want}'} in the job"
            )
    if not wrong:
        return ""
    shown = "; ".join(wrong[:3]) + (f"; {len(wrong) - 3} more" if len(wrong) > 3 else "")
    return f"it holds another model ({shown})"


def _shown(form: tuple) -> str:
    shape, dtype, size = form
    return f"{dtype}{list(shape)}" if shape is not None else f"{dtype}, {size} values"


def cut(state: CheckpointState, form: ModelForm, shards: int) -> list[tuple[dict[str, np.ndarray], dict]]:
    """Each new shard's tensors and metadata, as its own snapshot would hold them
    (``psfw.services.persistence.snapshot``), plus the count it was made on."""
    layout = plan_layout(form.params, shards, 1, form.slice_bytes)  # owners aside, as the job plans it
    held: list[list[tuple[tuple[str, int], np.ndarray, list[np.ndarray], int]]] = [[] for _ in range(shards)]
    for name, spec in layout.params.items():
        whole = state.params[name]
        for s in spec.slices:
            leaves = [
                leaf[s.start : s.stop].copy() if shaped else leaf.copy()
                for leaf, shaped in zip(whole.leaves, whole.per_element, strict=True)
            ]
            held[s.shard].append(((name, s.index), whole.value[s.start : s.stop].copy(), leaves, whole.version))
    out = []
    for shard in range(shards):
        tensors: dict[str, np.ndarray] = {}
        slices = []
        for index, (key, value, leaves, version) in enumerate(sorted(held[shard], key=lambda h: h[0])):
            tensors[f"value/{index}"] = value
            for j, leaf in enumerate(leaves):
                tensors[f"opt/{index}/{j}"] = leaf
            slices.append({"key": key[0], "slice": key[1], "version": version})
        meta: dict[str, Any] = {
            "shard": shard,
            "shards": shards,
            "epoch": state.epoch,
            "optimizer": state.optimizer,
            "job": state.job,
            "slices": slices,
            "groups": state.groups,
            "updates_applied": state.updates_applied,
            "resharded_from": state.made_on,
        }
        if state.declaration:
            table_tensors, meta["tables"] = _tables_of(state, shard, shards)
            tensors.update(table_tensors)
        out.append((tensors, meta))
    return out


def _tables_of(state: CheckpointState, shard: int, shards: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The rows of every table that ``route`` gives shard ``shard`` of ``shards``, in
    id order, as ``ShardTables.snapshot`` holds them."""
    tensors: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"declaration": state.declaration, "updates": {}, "lifetime": {}}
    for name, table in state.tables.items():
        mine = route(name, table.ids, shards) == shard
        prefix = f"table/{name}"
        tensors[f"{prefix}/ids"] = table.ids[mine]
        tensors[f"{prefix}/values"] = table.values[mine]
        for key, array in table.state.items():
            tensors[f"{prefix}/state/{key}"] = array[mine]
        meta["updates"][name] = table.updates
        if table.last_used is not None:  # rows with a lifetime: when each was last used, and who waits
            tensors[f"{prefix}/last_used"] = table.last_used[mine]
            meta["lifetime"][name] = _lifetime_counts(table, int(mine.sum()), shard)
        if table.waiting is not None:
            waits = route(name, table.waiting["ids"], shards) == shard
            tensors.update({f"{prefix}/waiting/{k}": table.waiting[k][waits] for k in WAITING})
    return tensors, meta


def _lifetime_counts(table: WholeTable, rows: int, shard: int) -> dict[str, int]:
    """Rows admitted, expired and evicted on a new shard: the job's totals of rows
    gone on shard 0, and on every shard as many admitted as it holds plus what went
    from it, so that each shard's counts add up to its rows as a shard's always do."""
    expired, evicted = (table.counts[k] if shard == 0 else 0 for k in ("expired", "evicted"))
    return {"admitted": rows + expired + evicted, "expired": expired, "evicted": evicted}


def reshard_for_job(root: Path, job: Any) -> Resharded | None:
    """``reshard_newest`` for the job's own number of shards (``cluster.servers``)."""
    return reshard_newest(root, ModelForm.of(job), job.config.cluster.servers)


def reshard_for_config(root: Path, config: Any, shards: int | None = None) -> Resharded | None:
    """``reshard_newest`` for ``shards`` (default: the config's ``cluster.servers``),
    the job built (JAX imported, the data read) only when there is something to re-cut."""
    shards = shards or config.cluster.servers
    if to_reshard(root, shards) is None:
        return None
    from psfw.jobs.job import build_job

    # the job as it runs on the new count (its checks of a layout are of that one)
    config = config.model_copy(update={"cluster": config.cluster.model_copy(update={"servers": shards})})
    return reshard_newest(root, ModelForm.of(build_job(config)), shards)
