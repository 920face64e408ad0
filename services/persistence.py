"""A shard's state on disk: snapshots, their checkpoints, and rolling back to one.

A snapshot is taken under the store's update lock (never halfway through an update)
and written in the background, one write at a time in step order. A restore (or a
restarted shard's load) waits for the write in flight, replaces the whole state
under the update lock, and drops the later checkpoints: they are of a history
that was abandoned, and so is any write queued behind the restore.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, NamedTuple

import grpc
import jax
import numpy as np

from psfw.base.errors import WireError
from psfw.protocol.layout import SliceKey
from psfw.services.checkpoint import CheckpointFolder
from psfw.services.kernel import UpdateKernel
from psfw.services.request_checks import fingerprint_of, refusal
from psfw.services.rounds import GroupState
from psfw.services.tables import ShardTables

if TYPE_CHECKING:
    from psfw.services.store import ShardStore

log = logging.getLogger("psfw.server")


class Loaded(NamedTuple):
    """A snapshot read back: what ``install`` puts in."""

    values: dict[SliceKey, jax.Array]
    versions: dict[SliceKey, int]
    states: dict[SliceKey, Any]
    kernel: UpdateKernel | None
    meta: dict[str, Any]
    tables: ShardTables


def snapshot(store: ShardStore) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The state as tensors and JSON metadata: values, optimizer state, versions,
    each group's step (its data position) and last contributors, the epoch."""
    tensors: dict[str, np.ndarray] = {}
    slices = []
    for index, key in enumerate(sorted(store.values)):
        tensors[f"value/{index}"] = np.asarray(store.values[key])
        for leaf_index, leaf in enumerate(jax.tree.leaves(store.opt_state[key])):
            tensors[f"opt/{index}/{leaf_index}"] = np.asarray(leaf)
        slices.append({"key": key[0], "slice": key[1], "version": store.versions[key]})
    meta = {
        "shard": store.shard,
        "shards": store.shards,
        "epoch": store.epoch,
        "optimizer": store.optimizer_spec,
        "job": store.job,
        "slices": slices,
        "groups": {str(g): {"step": st.step, "last": st.last} for g, st in store.groups.items()},
        "updates_applied": store.updates_applied,
    }
    if store.tables.declaration:
        table_tensors, meta["tables"] = store.tables.snapshot()
        tensors.update(table_tensors)
    return tensors, meta


def load_snapshot(
    tensors: dict[str, np.ndarray], meta: dict[str, Any], shard: int, shards: int, update_batch_bytes: int
) -> Loaded:
    """The arrays and kernel of a snapshot (see ``snapshot``), built without touching
    any state: off the event loop, in a thread."""
    if meta["shard"] != shard or meta["shards"] != shards:
        raise ValueError(
            f"checkpoint of shard {meta['shard']} of {meta['shards']} cannot load into shard {shard} of {shards}"
        )
    values, versions, states = {}, {}, {}
    kernel = UpdateKernel(meta["optimizer"], update_batch_bytes) if meta["optimizer"] else None
    for index, entry in enumerate(meta["slices"]):
        key = (entry["key"], int(entry["slice"]))
        value = jax.numpy.array(tensors[f"value/{index}"])
        shapes = kernel.state_shapes(value)
        # in the form opt.init gives (a scalar may come back from the file as shape (1,))
        leaves = [
            jax.numpy.array(tensors[f"opt/{index}/{i}"]).reshape(leaf.shape)
            for i, leaf in enumerate(jax.tree.leaves(shapes))
        ]
        values[key], versions[key] = value, int(entry["version"])
        states[key] = jax.tree.unflatten(jax.tree.structure(shapes), leaves)
    tables = ShardTables.load(shard, shards, tensors, meta.get("tables", {}))
    return Loaded(values, versions, states, kernel, meta, tables)


class ShardCheckpoints:
    """When a shard's state reaches ``folder`` (None: never) and how it comes back;
    the newest ``keep`` complete checkpoints are kept."""

    def __init__(self, store: ShardStore, folder: CheckpointFolder | None, keep: int = 3):
        self.store, self.folder, self.keep = store, folder, keep
        self.saved_step = -1  # group 0's step of the newest checkpoint this shard wrote or loaded
        self.generation = 0  # loads so far: a snapshot taken before the last one is of an abandoned history
        # the step of the checkpoint loaded last, and the shard count it was made on when it was re-cut (else 0)
        self.restored: tuple[int, int] | None = None
        self._saving = asyncio.Lock()
        self._saves: set[asyncio.Task] = set()

    def steps(self) -> list[int]:
        return self.folder.steps(self.store.shards) if self.folder is not None else []

    def save_now(self) -> None:
        """Snapshot the state (the caller holds the update lock: the snapshot is never
        halfway through an update) and write it in the background."""
        if self.folder is None or self.store.damage:
            return
        step = self.store.group_step(0)
        tensors, meta = snapshot(self.store)  # numpy views: the update never writes over them
        task = asyncio.get_running_loop().create_task(self._write(step, tensors, meta, self.generation))
        self._saves.add(task)
        task.add_done_callback(self._saves.discard)

    async def _write(self, step: int, tensors: dict[str, np.ndarray], meta: dict[str, Any], generation: int) -> None:
        async with self._saving:  # one write at a time, in step order
            if step <= self.saved_step or generation != self.generation:
                return  # saved already, or taken before a restore: of the history it abandoned
            shard, shards = self.store.shard, self.store.shards
            try:
                await asyncio.to_thread(self.folder.save, step, shard, shards, tensors, meta)
                await asyncio.to_thread(self.folder.prune, self.keep, shards)
                self.saved_step = step
            except OSError:
                log.exception("shard %d: checkpoint of step %d failed", shard, step)

    async def flush(self, final: bool = False) -> None:
        """Wait for pending writes; with ``final``, also save the current state (a
        graceful shutdown) unless that step is saved already."""
        store = self.store
        held = store.values or store.tables.tables
        if final and self.folder is not None and held and store.group_step(0) > self.saved_step:
            half = store.half_applied()
            if half is not None:  # its applied slices would be saved as the step before them
                log.warning("shard %d: no checkpoint at the stop: %s (the last one stands)", store.shard, half)
                return await self.flush()
            async with store.lock:
                self.save_now()
        while self._saves:
            await asyncio.gather(*self._saves, return_exceptions=True)

    async def load_newest(self) -> int | None:
        """Load the newest complete checkpoint, if any (a restarted shard); its epoch
        goes up by one so that every stub re-syncs. Returns group 0's step.

        Raises ValueError when the newest checkpoint was made on another number of
        shards: a shard alone does not know the layout to re-cut it by, and an older
        one of its own count would quietly roll the job back."""
        async with self._saving:
            steps = await asyncio.to_thread(self.steps)
            await asyncio.to_thread(self._check_newest, steps[-1] if steps else -1)
            if steps:
                await self._roll_back(steps[-1], None)
        return steps[-1] if steps else None

    def _check_newest(self, own: int) -> None:
        if self.folder is None:
            return
        newest = self.folder.steps(None)
        if not newest or newest[-1] <= own:
            return
        step, shards = newest[-1], self.store.shards
        made_on = " or ".join(map(str, self.folder.counts(step)))
        root = self.folder.root
        raise ValueError(
            f"shard {self.store.shard} of {shards}: the newest checkpoint in {root} is of step {step}, made on "
            f"{made_on} shards, not {shards}: re-cut it for {shards} with `psfw reshard CONFIG --checkpoint-dir "
            f"{root} --shards {shards}` (psfw train and psfw launch --resume do it themselves), or start {made_on} shards"
        )

    async def restore(self, step: int, epoch: int) -> None:
        """Roll back to the complete checkpoint of ``step`` and take on ``epoch``.

        Under the save lock: a checkpoint write in flight finishes first, so that the
        steps after ``step`` (an abandoned history) are dropped with whatever it
        wrote, and writes queued behind the restore are skipped (see ``_write``).
        """
        async with self._saving:
            steps = await asyncio.to_thread(self.steps)
            if step not in steps:
                raise refusal(
                    grpc.StatusCode.NOT_FOUND,
                    f"shard {self.store.shard} has no complete checkpoint of step {step} (it has {steps}): "
                    "restore to one of those",
                )
            await self._roll_back(step, epoch)

    async def _roll_back(self, step: int, epoch: int | None) -> None:
        """Load the checkpoint of ``step`` and drop the later ones; ``epoch`` None: the
        checkpoint's plus one. The caller holds the save lock; the state is replaced
        under the update lock, then waiters look again."""
        store = self.store
        tensors, meta = await asyncio.to_thread(self.folder.load, step, store.shard, store.shards)
        loaded = await asyncio.to_thread(
            load_snapshot, tensors, meta, store.shard, store.shards, store.update_batch_bytes
        )
        async with store.lock:
            self.generation += 1
            install(store, loaded, int(meta["epoch"]) + 1 if epoch is None else epoch)
            self.saved_step = step
            self.restored = (step, int(meta.get("resharded_from", 0)))
        await asyncio.to_thread(self.folder.drop_after, step)
        await store.notify()


def install(store: ShardStore, loaded: Loaded, epoch: int) -> None:
    """Replace the whole state of ``store`` with a loaded snapshot (the caller holds
    its lock); steps in progress are failed: their stubs re-sync."""
    for state in store.groups.values():
        if state.round is not None:
            state.round.fail(
                WireError(
                    grpc.StatusCode.FAILED_PRECONDITION, f"shard {store.shard} was restored from a checkpoint: re-sync"
                )
            )
        state.round = None
    store.values, store.versions, store.opt_state = loaded.values, loaded.versions, loaded.states
    store.damage = ""  # a checkpoint is a state to trust again
    store.specs = {k: (np.dtype(np.asarray(v).dtype), tuple(v.shape)) for k, v in loaded.values.items()}
    store.kernel = loaded.kernel
    store.tables = loaded.tables
    store.job = loaded.meta.get("job", "")
    store.fingerprint = fingerprint_of(store.job)
    store.groups = {
        int(g): GroupState(step=int(st["step"]), last=list(st["last"])) for g, st in loaded.meta["groups"].items()
    }
    store.updates_applied = int(loaded.meta.get("updates_applied", 0))
    store.epoch = epoch
