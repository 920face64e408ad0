"""One parameter-server shard's state: slices, versions, optimizer state, each
group's completed steps and its step in progress, and the façade over the verbs.

The shard's parts: the round protocol of an Update (``rounds``) and the checks a
request passes (``request_checks``), the jitted update (``kernel``), the embedding
tables' rows (``tables``), snapshots and checkpoints (``persistence``). Every method
validates fully before it changes anything, so a rejected request leaves the shard
exactly as it was. All methods run on the server's event loop; the optimizer update
runs under a lock, in a thread (JAX releases the GIL) unless the shard is small
enough that the hop would cost more than the update.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import jax
import numpy as np

from psfw.protocol.layout import SliceKey
from psfw.protocol.messages import Gradients, RowBlock, TableIds, UpdateHeader
from psfw.protocol.wire import slice_name
from psfw.services.checkpoint import CheckpointFolder
from psfw.services.kernel import UPDATE_BATCH_BYTES, UpdateKernel
from psfw.services.persistence import ShardCheckpoints
from psfw.services.presence import GroupPresence
from psfw.services.request_checks import check_put, fingerprint_of, parse_spec, refusal, same_form
from psfw.services.rounds import GroupState, Reports, ShardRounds, UpdateResult
from psfw.services.tables import ShardTables

NONFINITE_POLICIES = ("reject", "skip")

__all__ = ["ShardStore", "UpdateResult"]


class ShardStore:
    """The slices one shard holds and the server-side optimizer that updates them.

    ``checkpoints``: a folder (path or CheckpointFolder) shared by the job's shards,
    None for none; ``keep``: how many complete checkpoints stay. ``make_kernel``:
    builds the update kernel from an optimizer spec (JSON); a test hands in its own.
    """

    def __init__(
        self,
        shard: int = 0,
        shards: int = 1,
        nonfinite: str = "reject",
        checkpoints: str | Path | CheckpointFolder | None = None,
        keep: int = 3,
        update_batch_bytes: int = UPDATE_BATCH_BYTES,
        make_kernel: Callable[[str, int], UpdateKernel] = UpdateKernel,
    ):
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite policy {nonfinite!r}: use 'reject' or 'skip'")
        self.shard, self.shards, self.nonfinite = shard, shards, nonfinite
        self.update_batch_bytes = update_batch_bytes
        self.make_kernel = make_kernel
        folder = CheckpointFolder(checkpoints) if isinstance(checkpoints, str | Path) else checkpoints
        self.checkpoints = ShardCheckpoints(self, folder, keep)
        self.epoch = 0  # restores so far; every Update must carry the same
        self.values: dict[SliceKey, jax.Array] = {}
        self.versions: dict[SliceKey, int] = {}
        self.specs: dict[SliceKey, tuple[np.dtype, tuple[int, ...]]] = {}
        self.opt_state: dict[SliceKey, Any] = {}
        self.tables = ShardTables(shard, shards)  # the rows of the job's embedding tables routed here
        self.groups: dict[int, GroupState] = {}
        self.reports = Reports()  # who sent Updates lately (Describe says it)
        self.presence = GroupPresence(self)  # which groups count now (the staleness bound, joins, leaves)
        self.stop_at = 0  # an early end of the job that an Update asked for (0: none)
        self.kernel: UpdateKernel | None = None  # fixed by the first Put
        self.job = ""  # the identity (JSON) of the job whose parameters the shard holds, from its first Put
        self.fingerprint = ""  # of that job
        self.skipped_nonfinite = 0
        self.updates_applied = 0
        self.started = time.monotonic()
        self.damage = ""  # why the state cannot be trusted any more (an update failed halfway)
        self.lock = asyncio.Lock()  # held while the values change (an update, a Put, a restore)
        self._progress = asyncio.Condition()
        self.rounds = ShardRounds(self)  # the Update verb's protocol over this state

    # -- reading -------------------------------------------------------------

    @property
    def optimizer_spec(self) -> str:
        return self.kernel.spec if self.kernel is not None else ""

    def check_intact(self) -> None:
        if self.damage:
            raise refusal(
                grpc.StatusCode.DATA_LOSS,
                f"shard {self.shard} cannot be trusted: {self.damage}; restart it (it loads its newest checkpoint)",
            )

    def expect(self, key: SliceKey) -> tuple[np.dtype, tuple[int, ...]]:
        """dtype and shape of a held slice; WireError(NOT_FOUND) for an unknown one."""
        spec = self.specs.get(key)
        if spec is None:
            raise refusal(
                grpc.StatusCode.NOT_FOUND,
                f"shard {self.shard} holds no slice {slice_name(key)}: it was never put here "
                "(check the parameter name and that its owner has put it)",
            )
        return spec

    def group_step(self, group: int) -> int:
        state = self.groups.get(group)
        return state.step if state else 0

    def slowest_step(self, worker_groups: int) -> int:
        """The completed steps of the slowest group that counts: of groups
        0..worker_groups-1 and those that joined, the ones not gone (see
        ``GroupPresence``)."""
        return self.presence.slowest_step(worker_groups)

    def half_applied(self) -> str | None:
        """Which pipelined step has some of its slices applied and not all (None:
        none): its values are neither the step before nor the step after."""
        for group, state in sorted(self.groups.items()):
            rnd = state.round
            if rnd is not None and rnd.progress is not None and rnd.progress.applied and not rnd.done.done():
                return f"group {group} step {rnd.step} is half applied"
        return None

    def nbytes(self) -> int:
        """Bytes of the slices (an Update's values, each way)."""
        return sum(math.prod(s) * d.itemsize for d, s in self.specs.values())

    def digest(self) -> str:
        """A hash of values, versions, group steps and optimizer state (for tests and
        operators: equal digests mean equal state). Call it between updates."""
        h = hashlib.sha256()
        for key in sorted(self.values):
            h.update(repr((key, self.versions[key])).encode())
            h.update(np.asarray(self.values[key]).tobytes())
            for leaf in jax.tree.leaves(self.opt_state.get(key)):
                h.update(np.asarray(leaf).tobytes())
        h.update(repr(sorted((g, s.step) for g, s in self.groups.items())).encode())
        self.tables.digest_into(h)
        return h.hexdigest()

    async def state_digest(self) -> str:
        """``digest()`` between updates (under the update lock), off the event loop."""
        async with self.lock:
            return await asyncio.to_thread(self.digest)

    async def notify(self) -> None:
        """Wake every wait to look again (slices put, steps done, a restore)."""
        async with self._progress:
            self._progress.notify_all()

    async def wait_until(self, ready: Callable[[], bool], wait_s: float) -> bool:
        """Wait (at most ``wait_s``) until ``ready()``; returns whether it became so."""
        if ready():
            return True
        try:
            async with self._progress:
                await asyncio.wait_for(self._progress.wait_for(ready), wait_s)
        except TimeoutError:
            return False
        return True

    # -- put -----------------------------------------------------------------

    async def put(
        self, arrays: dict[SliceKey, np.ndarray], optimizer: str, adopt: bool = False, job: str = "", tables: str = ""
    ) -> int:
        """Store the initial values of new slices (version 0).

        A retried Put of identical values is acknowledged; a different value for a
        held slice is ALREADY_EXISTS, a new slice once a step is open or done is
        FAILED_PRECONDITION. The first Put fixes the shard's optimizer. With
        ``adopt``, the arrays are the request's own buffers, which nobody writes again:
        the shard keeps them instead of a copy. ``job``: the job's identity (JSON, see
        psfw.base.identity); the first Put that names one fixes it, a Put of
        another job is FAILED_PRECONDITION. ``tables``: the job's embedding tables
        (JSON, see psfw.services.tables); the first declaration fixes them.
        """
        if not arrays and not tables:
            raise refusal(grpc.StatusCode.INVALID_ARGUMENT, "Put carries no slices and declares no tables")
        kernel = self.kernel
        if kernel is None:
            if not optimizer:
                raise refusal(grpc.StatusCode.INVALID_ARGUMENT, "the first Put must name the optimizer (JSON spec)")
            kernel = self._kernel(optimizer)
        elif optimizer and parse_spec(optimizer) != json.loads(kernel.spec):
            raise refusal(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"shard {self.shard} already trains with optimizer {kernel.spec}, the Put asks for another: "
                "every process of a job must use the same optimizer settings",
            )
        fingerprint = fingerprint_of(job)
        self.check_job(fingerprint)
        async with self.lock:  # not while an update replaces (or writes over) the values
            self.check_intact()
            self.check_job(fingerprint)  # again: another job's Put may have come first meanwhile
            new = check_put(self.shard, self.values, self.specs, arrays, self.groups)
            if tables:  # in a thread: making a materialized table's rows takes a while
                await asyncio.to_thread(self.tables.declare, tables)
            self.kernel = kernel
            if fingerprint and not self.job:
                self.job, self.fingerprint = job, fingerprint
            for key, value in new.items():
                # JAX adopts an aligned buffer as it is; a caller's buffer is copied
                array = jax.device_put(value) if adopt else jax.numpy.array(value)
                self.values[key], self.versions[key] = array, 0
                self.specs[key] = (value.dtype, value.shape)
                self.opt_state[key] = kernel.init(array)
        await self.notify()
        return len(arrays) + (len(self.tables.tables) if tables else 0)

    def _kernel(self, optimizer: str) -> UpdateKernel:
        parse_spec(optimizer)  # JSON, or INVALID_ARGUMENT
        try:
            return self.make_kernel(optimizer, self.update_batch_bytes)
        except (ValueError, TypeError, AttributeError) as err:
            raise refusal(grpc.StatusCode.INVALID_ARGUMENT, f"the Put's optimizer: {err}") from None

    async def change_optimizer(self, optimizer: str, job: str) -> None:
        """Go on with other optimizer settings (a resume that changes the learning
        rate, say), keeping the optimizer state: only a change that keeps the state's
        form (the same optimizer and schedule kind, other numbers) can continue it;
        another is FAILED_PRECONDITION. ``job``: the job's new identity."""
        kernel = self.make_kernel(optimizer, self.update_batch_bytes)
        async with self.lock:
            self.check_intact()
            for key, value in self.values.items():
                if not same_form(kernel.state_shapes(value), self.opt_state[key]):
                    raise refusal(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"shard {self.shard}: the new optimizer keeps its state in another form than "
                        f"{self.kernel.name}'s: it cannot continue that state",
                    )
            self.kernel = kernel
            if job:
                self.job, self.fingerprint = job, fingerprint_of(job)

    # -- get -----------------------------------------------------------------

    async def wait_for_put(self, keys: list[SliceKey], wait_s: float) -> None:
        """Wait until every slice of ``keys`` has been put (by owners elsewhere).

        Raises WireError(DEADLINE_EXCEEDED) naming the missing slices after ``wait_s``.
        """
        if not await self.wait_until(lambda: all(k in self.specs for k in keys), wait_s):
            missing = [slice_name(k) for k in keys if k not in self.specs]
            raise refusal(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"shard {self.shard}: waited {wait_s:.1f} s for {len(missing)} slices to be put "
                f"({', '.join(missing[:5])}): has their owner started?",
            )

    async def read(
        self,
        keys: list[SliceKey],
        group: int,
        step: int,
        wait_s: float,
        wait_for_put: bool = False,
        job: str = "",
        pull: TableIds | None = None,
    ) -> tuple[int, dict[SliceKey, jax.Array], dict[str, RowBlock]]:
        """The values of ``keys`` (all slices when empty and no rows are pulled) and
        the table rows of ``pull`` (made where missing) once ``group`` has completed
        ``step`` steps, waiting at most ``wait_s`` in all (see Get); ``job``: the
        reader's job fingerprint, refused when the shard holds another job's."""
        self.check_job(job)
        pull = pull or {}
        keys = keys or ([] if pull else sorted(self.values))
        started = time.monotonic()
        if wait_for_put:
            await self.wait_for_put(keys, wait_s)
            if pull and not await self.wait_until(lambda: bool(self.tables.declaration), wait_s):
                raise refusal(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"shard {self.shard}: waited {wait_s:.1f} s for the job's embedding tables to be declared: "
                    "has the process of worker 0 of group 0 started?",
                )
        for key in keys:
            self.expect(key)
        self.tables.check_pull(pull)
        await self.wait_for_step(group, step, max(0.0, wait_s - (time.monotonic() - started)))
        async with self.lock:  # not in the middle of an update, which replaces values batch by batch
            self.check_intact()
            values = self.values
            return self.group_step(group), {k: values[k] for k in keys}, self.tables.read(pull)

    async def wait_for_step(self, group: int, step: int, wait_s: float) -> int:
        """Wait until ``group`` has completed ``step`` steps; returns its step.

        Raises WireError(DEADLINE_EXCEEDED) naming the group and step after ``wait_s``.
        """
        if not await self.wait_until(lambda: self.group_step(group) >= step, wait_s):
            raise refusal(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"shard {self.shard}: waited {wait_s:.1f} s for group {group} to complete step {step}, "
                f"it has completed {self.group_step(group)}",
            )
        return self.group_step(group)

    # -- update --------------------------------------------------------------

    async def update(self, head: UpdateHeader, sums: Gradients) -> UpdateResult:
        """Add one process's gradient sum to its group's step and answer with the
        fresh values once the group's step is applied (see ``ShardRounds.update``)."""
        return await self.rounds.update(head, sums)

    def check_job(self, fingerprint: str) -> None:
        """A request of another job than the one whose parameters the shard holds is
        FAILED_PRECONDITION (not checked when either is unknown)."""
        if fingerprint and self.fingerprint and fingerprint != self.fingerprint:
            raise refusal(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"shard {self.shard} holds the parameters of job {json.loads(self.job).get('name')} "
                f"({self.fingerprint}), the request is of another job ({fingerprint}): start the shards fresh",
            )

    # -- checkpoints -----------------------------------------------------------

    @property
    def saved_step(self) -> int:
        return self.checkpoints.saved_step

    def checkpoint_steps(self) -> list[int]:
        return self.checkpoints.steps()

    async def load_newest(self) -> int | None:
        """Load the newest complete checkpoint, if any (see ShardCheckpoints)."""
        return await self.checkpoints.load_newest()

    async def restore(self, step: int, epoch: int) -> None:
        """Roll back to the complete checkpoint of ``step`` and take on ``epoch``."""
        await self.checkpoints.restore(step, epoch)

    async def flush_checkpoints(self, final: bool = False) -> None:
        await self.checkpoints.flush(final)
