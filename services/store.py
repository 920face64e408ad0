"""One parameter-server shard's state: slices, versions, optimizer state, and the
contributions of each group's step in progress.

Every method validates fully before it changes anything, so a rejected request
leaves the shard exactly as it was. All methods run on the server's event loop; the
optimizer update runs under a lock, in a thread (JAX releases the GIL) unless the
shard is small enough that the hop would cost more than the update.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jax
import numpy as np
import optax

from psfw.compute.optimizers import build_optimizer
from psfw.protocol.errors import Reason, mark_retrieved
from psfw.protocol.layout import SliceKey
from psfw.protocol.messages import Gradients, UpdateHeader
from psfw.protocol.wire import WireError, batched, slice_name
from psfw.services import checkpoint

NONFINITE_POLICIES = ("reject", "skip")
UPDATE_BATCH_BYTES = 64 << 20
INLINE_UPDATE_BYTES = 8 << 20  # a shard this small updates on the event loop
log = logging.getLogger("psfw.server")


@dataclass
class Round:
    """The contributions to one group step that is not complete yet."""

    step: int
    workers_per_group: int
    contributions: dict[int, tuple[int, int]] = field(default_factory=dict)  # process -> (workers, rows)
    parts: dict[int, dict[SliceKey, tuple[np.ndarray, ...]]] = field(default_factory=dict)  # process -> sums
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)  # process -> its metrics x rows
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    @property
    def workers(self) -> int:
        return sum(w for w, _ in self.contributions.values())

    @property
    def rows(self) -> int:
        return sum(r for _, r in self.contributions.values())


@dataclass
class GroupState:
    step: int = 0  # completed steps
    round: Round | None = None
    last: list[int] = field(default_factory=list)  # processes of the last applied step (the dedup state)
    last_metrics: tuple[dict[str, float], int] = ({}, 0)  # the last applied step's metric sums and rows


@dataclass(frozen=True)
class UpdateResult:
    step: int  # the group's completed steps after the update
    values: dict[SliceKey, jax.Array]  # a snapshot right after the update
    shared: bool  # True: every process of the group gets this answer (False: an acknowledged retry)
    slowest_step: int = 0  # the slowest group's completed steps when the answer left
    metrics: dict[str, float] = field(default_factory=dict)  # the group's metrics of the step, x rows
    rows: int = 0  # the group's rows of the step
    # the encoded answer, built once for all the group's processes; the result holds
    # no reference to its round, so that old values are freed without the cycle collector
    cache: dict = field(default_factory=dict)


MAX_ROWS = 2**53
MAX_METRICS = 64


def _abort(code: grpc.StatusCode, message: str) -> WireError:
    # the shard's own waits that ran out are answers, not lost connections: a client does not retry them
    return WireError(code, message, Reason.SHARD_WAIT if code == grpc.StatusCode.DEADLINE_EXCEEDED else Reason.NONE)


class ShardStore:
    """The slices one shard holds and the server-side optimizer that updates them."""

    def __init__(
        self,
        shard: int = 0,
        shards: int = 1,
        nonfinite: str = "reject",
        checkpoint_dir: str | Path | None = None,
        keep: int = 3,
        update_batch_bytes: int = UPDATE_BATCH_BYTES,
    ):
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite policy {nonfinite!r}: use 'reject' or 'skip'")
        self.shard, self.shards, self.nonfinite = shard, shards, nonfinite
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.keep = keep
        self.update_batch_bytes = update_batch_bytes
        self.epoch = 0  # restores so far; every Update must carry the same
        self.saved_step = -1  # group 0's step of the newest checkpoint this shard wrote or loaded
        self._generation = 0  # loads so far: a snapshot taken before the last one is of an abandoned history
        self.values: dict[SliceKey, jax.Array] = {}
        self.versions: dict[SliceKey, int] = {}
        self.specs: dict[SliceKey, tuple[np.dtype, tuple[int, ...]]] = {}
        self.groups: dict[int, GroupState] = {}
        self.optimizer_spec = ""
        self.job = ""  # the identity (JSON) of the job whose parameters the shard holds, from its first Put
        self.fingerprint = ""  # of that job
        self.skipped_nonfinite = 0
        self.updates_applied = 0
        self.started = time.monotonic()
        self._opt: optax.GradientTransformation | None = None
        self._opt_state: dict[SliceKey, Any] = {}
        self._update_fn = self._update_in_place = None
        self._compiled: set[bool] = set()  # the variants (in place or not) that have run: a first call compiles
        self.damage = ""  # why the state cannot be trusted any more (an update failed halfway)
        self._lock = asyncio.Lock()
        self._progress = asyncio.Condition()
        self._saving = asyncio.Lock()
        self._saves: set[asyncio.Task] = set()

    # -- reading -------------------------------------------------------------

    def _check_intact(self) -> None:
        if self.damage:
            raise _abort(
                grpc.StatusCode.DATA_LOSS,
                f"shard {self.shard} cannot be trusted: {self.damage}; restart it (it loads its newest checkpoint)",
            )

    def expect(self, key: SliceKey) -> tuple[np.dtype, tuple[int, ...]]:
        """dtype and shape of a held slice; WireError(NOT_FOUND) for an unknown one."""
        spec = self.specs.get(key)
        if spec is None:
            raise _abort(
                grpc.StatusCode.NOT_FOUND,
                f"shard {self.shard} holds no slice {slice_name(key)}: it was never put here "
                "(check the parameter name and that its owner has put it)",
            )
        return spec

    def group_step(self, group: int) -> int:
        state = self.groups.get(group)
        return state.step if state else 0

    def nbytes(self) -> int:
        return sum(math.prod(s) * d.itemsize for d, s in self.specs.values())

    def digest(self) -> str:
        """A hash of values, versions, group steps and optimizer state (for tests and
        operators: equal digests mean equal state). Call it between updates."""
        import hashlib

        h = hashlib.sha256()
        for key in sorted(self.values):
            h.update(repr((key, self.versions[key])).encode())
            h.update(np.asarray(self.values[key]).tobytes())
            for leaf in jax.tree.leaves(self._opt_state.get(key)):
                h.update(np.asarray(leaf).tobytes())
        h.update(repr(sorted((g, s.step) for g, s in self.groups.items())).encode())
        return h.hexdigest()

    async def state_digest(self) -> str:
        """``digest()`` between updates (under the update lock), off the event loop."""
        async with self._lock:
            return await asyncio.to_thread(self.digest)

    # -- put ---------------------------------------------------------------

    async def put(self, arrays: dict[SliceKey, np.ndarray], optimizer: str, adopt: bool = False, job: str = "") -> int:
        """Store the initial values of new slices (version 0).

        A retried Put of identical values is acknowledged; a different value for a
        held slice is ALREADY_EXISTS, a new slice once a step is open or done is
        FAILED_PRECONDITION. The first Put fixes the shard's optimizer. With
        ``adopt``, the arrays are the request's own buffers, which nobody writes again:
        the shard keeps them instead of a copy. ``job``: the job's identity (JSON, see
        psfw.protocol.identity); the first Put that names one fixes it, a Put of another job is
        FAILED_PRECONDITION.
        """
        if not arrays:
            raise _abort(grpc.StatusCode.INVALID_ARGUMENT, "Put carries no slices")
        opt = self._opt
        if not self.optimizer_spec:
            if not optimizer:
                raise _abort(grpc.StatusCode.INVALID_ARGUMENT, "the first Put must name the optimizer (JSON spec)")
            try:
                opt = build_optimizer(_spec(optimizer))
            except (ValueError, TypeError, AttributeError) as err:
                raise _abort(grpc.StatusCode.INVALID_ARGUMENT, f"the Put's optimizer: {err}") from None
        elif optimizer and _spec(optimizer) != json.loads(self.optimizer_spec):
            raise _abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"shard {self.shard} already trains with optimizer {self.optimizer_spec}, the Put asks for another: "
                "every process of a job must use the same optimizer settings",
            )
        fingerprint = _fingerprint(job)
        self.check_job(fingerprint)
        async with self._lock:  # not while an update replaces (or writes over) the values
            self._check_intact()
            self.check_job(fingerprint)  # again: another job's Put may have come first meanwhile
            new = {}
            for key, value in arrays.items():
                if key in self.values:
                    same = self.specs[key] == (value.dtype, value.shape) and np.array_equal(
                        np.asarray(self.values[key]), value
                    )
                    if not same:
                        raise _abort(
                            grpc.StatusCode.ALREADY_EXISTS,
                            f"shard {self.shard} already holds {slice_name(key)} with other values: "
                            "a parameter is put once, by its owner",
                        )
                    continue
                if not np.isfinite(value).all():
                    raise _abort(grpc.StatusCode.INVALID_ARGUMENT, f"initial value of {slice_name(key)} is not finite")
                new[key] = value
            training = self._training() if new else ""
            if training:
                raise _abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"shard {self.shard} is already training ({training}): slices can only be put before the "
                    f"first update, and {slice_name(next(iter(new)))} is new; every owner puts its parameters "
                    "before any worker updates (restart the job to add parameters)",
                )
            if not self.optimizer_spec:
                self.optimizer_spec, self._opt = optimizer, opt
                self._set_update(opt)
            if fingerprint and not self.job:
                self.job, self.fingerprint = job, fingerprint
            self._store_new(new, adopt)
        async with self._progress:
            self._progress.notify_all()
        return len(arrays)

    def _training(self) -> str:
        """Why new slices can no longer be put ('' while they can): every Update carries
        every slice the shard holds, so a slice added once a step is open or done
        could never be added up with the others."""
        for group, state in sorted(self.groups.items()):
            if state.round is not None:
                return f"group {group} has step {state.round.step} open"
            if state.step:
                return f"group {group} has completed {state.step} steps"
        return ""

    async def change_optimizer(self, optimizer: str, job: str) -> None:
        """Go on with other optimizer settings (a resume that changes the learning
        rate, say), keeping the optimizer state: only a change that keeps the state's
        form (the same optimizer and schedule kind, other numbers) can continue it;
        another is FAILED_PRECONDITION. ``job``: the job's new identity."""
        opt = build_optimizer(_spec(optimizer))
        async with self._lock:
            self._check_intact()
            for key, value in self.values.items():
                new, old = jax.eval_shape(opt.init, value), self._opt_state[key]
                if jax.tree.structure(new) != jax.tree.structure(old) or _forms(new) != _forms(old):
                    raise _abort(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"shard {self.shard}: the new optimizer keeps its state in another form than "
                        f"{json.loads(self.optimizer_spec).get('name')}'s: it cannot continue that state",
                    )
            self.optimizer_spec, self._opt = optimizer, opt
            self._set_update(opt)
            if job:
                self.job, self.fingerprint = job, _fingerprint(job)

    def _set_update(self, opt: optax.GradientTransformation | None) -> None:
        self._update_fn, self._update_in_place = _jit_update(opt) if opt else (None, None)
        self._compiled = set()

    def _store_new(self, new: dict[SliceKey, np.ndarray], adopt: bool) -> None:
        for key, value in new.items():
            # JAX adopts an aligned buffer as it is; a caller's buffer is copied
            array = jax.device_put(value) if adopt else jax.numpy.array(value)
            self.values[key] = array
            self.versions[key] = 0
            self.specs[key] = (value.dtype, value.shape)
            self._opt_state[key] = self._opt.init(array)

    # -- get ---------------------------------------------------------------

    async def wait_for_put(self, keys: list[SliceKey], wait_s: float) -> None:
        """Wait until every slice of ``keys`` has been put (by owners elsewhere).

        Raises WireError(DEADLINE_EXCEEDED) naming the missing slices after ``wait_s``.
        """
        if all(k in self.specs for k in keys):
            return
        try:
            async with self._progress:
                await asyncio.wait_for(self._progress.wait_for(lambda: all(k in self.specs for k in keys)), wait_s)
        except TimeoutError:
            missing = [slice_name(k) for k in keys if k not in self.specs]
            raise _abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"shard {self.shard}: waited {wait_s:.1f} s for {len(missing)} slices to be put "
                f"({', '.join(missing[:5])}): has their owner started?",
            ) from None

    async def read(
        self,
        keys: list[SliceKey],
        group: int,
        step: int,
        wait_s: float,
        wait_for_put: bool = False,
        job: str = "",
    ) -> tuple[int, dict[SliceKey, jax.Array]]:
        """The values of ``keys`` (all slices when empty) once ``group`` has completed
        ``step`` steps, waiting at most ``wait_s`` in all (see Get); ``job``: the
        reader's job fingerprint, refused when the shard holds another job's."""
        self.check_job(job)
        keys = keys or sorted(self.values)
        started = time.monotonic()
        if wait_for_put:
            await self.wait_for_put(keys, wait_s)
        for key in keys:
            self.expect(key)
        await self.wait_for_step(group, step, max(0.0, wait_s - (time.monotonic() - started)))
        async with self._lock:  # not in the middle of an update, which replaces values batch by batch
            self._check_intact()
            values = self.values
            return self.group_step(group), {k: values[k] for k in keys}

    async def wait_for_step(self, group: int, step: int, wait_s: float) -> int:
        """Wait until ``group`` has completed ``step`` steps; returns its step.

        Raises WireError(DEADLINE_EXCEEDED) naming the group and step after ``wait_s``.
        """
        if self.group_step(group) >= step:
            return self.group_step(group)
        try:
            async with self._progress:
                await asyncio.wait_for(self._progress.wait_for(lambda: self.group_step(group) >= step), wait_s)
        except TimeoutError:
            raise _abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"shard {self.shard}: waited {wait_s:.1f} s for group {group} to complete step {step}, "
                f"it has completed {self.group_step(group)}",
            ) from None
        return self.group_step(group)

    # -- update --------------------------------------------------------------

    async def update(self, head: UpdateHeader, sums: Gradients) -> UpdateResult:
        """Add one process's row-weighted gradient sum (``head`` names group, step,
        process, workers, rows) to its group's step; once the whole group has
        reported, apply the averaged gradient. Waits for the group (at most
        ``head.wait_s``), then, under a staleness bound, for the slowest group, and
        returns the fresh values. A slice's sum may come as the tuple of the
        process's workers' parts (``Parts``): they are added inside the update.

        A contribution that was already added (a retried RPC) is acknowledged and not
        added again; a step that is already complete answers with current values.
        """
        self._check_current(head)
        wait_s = head.wait_s
        sums = {k: v if isinstance(v, tuple) else (v,) for k, v in sums.items()}  # parts, added when applied
        group, step, process = head.group, head.step, head.process
        pending = self.groups[group].round if group in self.groups else None
        completes = (pending.workers if pending else 0) + head.workers >= head.workers_per_group
        if self.nonfinite == "reject" and not completes:
            # the contribution that completes a step is checked inside the jitted update
            await asyncio.to_thread(self._check_finite, head.group, head.step, sums)
            self._check_current(head)  # a Restore may have run meanwhile
        state = self.groups.get(group) or GroupState()
        if step < state.step:
            if step + 1 < state.step:
                raise _abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"shard {self.shard}: group {group} step {step} was applied long ago (the group has completed "
                    f"{state.step} steps): re-sync",
                )
            # a retry of the last applied step: acknowledged, never added twice
            if head.staleness >= 0 and head.worker_groups > 1:
                await self._hold_for_slowest(group, state.step, head, wait_s)
            async with self._lock:
                self._check_current(head)
                values = dict(self.values)
            metrics, rows = state.last_metrics
            return UpdateResult(state.step, values, False, self.slowest_step(head.worker_groups), dict(metrics), rows)
        rnd = self._validate_update(state, head, sums)
        created = group not in self.groups
        if rnd is None:
            rnd = state.round = Round(step, head.workers_per_group)
        self.groups[group] = state
        if process not in rnd.contributions:
            self._add(rnd, process, head.workers, head.rows, sums, dict(head.metrics))
            if rnd.workers == rnd.workers_per_group:
                # a task of its own: a handler cancelled meanwhile cannot leave the round full but unapplied
                applying = asyncio.get_running_loop().create_task(
                    self._apply(group, state, rnd, process, head.checkpoint_every)
                )
                applying.add_done_callback(mark_retrieved)
                try:
                    await asyncio.shield(applying)
                except WireError:
                    if not rnd.contributions:  # refused alone: leave no trace
                        state.round = None
                        if created:
                            del self.groups[group]
                    raise
        deadline = time.monotonic() + wait_s
        try:
            if not rnd.done.done():  # the contribution that completed the step has its answer already
                await asyncio.wait_for(asyncio.shield(rnd.done), wait_s)
        except TimeoutError:
            n = head.group_processes
            missing = sorted(set(range(group * n, group * n + n)) - set(rnd.contributions)) if n else "unknown"
            raise _abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"shard {self.shard}: group {group} step {step} is incomplete after {wait_s:.1f} s: "
                f"{rnd.workers} of {rnd.workers_per_group} workers reported (processes {sorted(rnd.contributions)}); "
                f"missing processes: {missing}",
            ) from None
        result = rnd.done.result()
        if head.staleness >= 0 and head.worker_groups > 1:
            await self._hold_for_slowest(group, result.step, head, max(0.0, deadline - time.monotonic()))
        return dataclasses.replace(result, slowest_step=self.slowest_step(head.worker_groups))

    def check_job(self, fingerprint: str) -> None:
        """A request of another job than the one whose parameters the shard holds is
        FAILED_PRECONDITION (not checked when either is unknown)."""
        if fingerprint and self.fingerprint and fingerprint != self.fingerprint:
            raise _abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"shard {self.shard} holds the parameters of job {json.loads(self.job).get('name')} "
                f"({self.fingerprint}), the request is of another job ({fingerprint}): start the shards fresh",
            )

    def _check_current(self, head: UpdateHeader) -> None:
        """The shard is intact, of the update's job and at its epoch: checked again
        after every wait, since a Restore may have rolled the shard back during it."""
        self._check_intact()
        self.check_job(head.job)
        if head.epoch != self.epoch:
            raise _abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"shard {self.shard} is at epoch {self.epoch} (restored from a checkpoint), the update was made "
                f"at epoch {head.epoch}: re-sync",
            )

    def slowest_step(self, worker_groups: int) -> int:
        """The completed steps of the slowest of groups 0..worker_groups-1."""
        return min((self.group_step(g) for g in range(max(worker_groups, 1))), default=0)

    async def _hold_for_slowest(self, group: int, step: int, head: UpdateHeader, wait_s: float) -> None:
        """Bounded staleness (SSP): a group may start ``step`` only while it is at most
        ``staleness`` steps ahead of the slowest group."""
        groups, bound = head.worker_groups, head.staleness
        if step - self.slowest_step(groups) <= bound:
            return
        try:
            async with self._progress:
                await asyncio.wait_for(
                    self._progress.wait_for(lambda: step - self.slowest_step(groups) <= bound), wait_s
                )
        except TimeoutError:
            behind = sorted(g for g in range(groups) if step - self.group_step(g) > bound)
            raise _abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"shard {self.shard}: group {group} may not start step {step} with staleness {bound}: "
                f"groups {behind} are further behind and did not advance for {wait_s:.1f} s",
            ) from None

    def _validate_update(self, state: GroupState, head: UpdateHeader, sums) -> Round | None:
        step, process, workers, rows, wpg = head.step, head.process, head.workers, head.rows, head.workers_per_group
        where = f"group {head.group} step {step}"
        if step > state.step:
            raise _abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"shard {self.shard}: {where} is ahead of the group, which has completed {state.step} steps",
            )
        if wpg < 1 or workers < 1 or workers > wpg:
            raise _abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{where}: workers={workers} of workers_per_group={wpg} is impossible",
            )
        if rows < workers:
            raise _abort(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: {rows} rows cannot come from {workers} workers")
        if rows > MAX_ROWS:  # the mean divides by the rows: beyond this, a float64 no longer counts them exactly
            raise _abort(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: {rows} rows is more than the limit of 2^53")
        if head.worker_groups and head.group >= head.worker_groups:
            raise _abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"{where}: group {head.group} of {head.worker_groups} groups"
            )
        if len(head.metrics) > MAX_METRICS or any(len(name) > 100 for name in head.metrics):
            raise _abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{where}: at most {MAX_METRICS} metrics of names up to 100 characters",
            )
        if head.staleness < -1:
            raise _abort(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: staleness {head.staleness} (use -1 for none)")
        missing = sorted(set(self.values) - set(sums))
        if missing:
            names = ", ".join(slice_name(k) for k in missing[:5])
            raise _abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{where}: the update lacks {len(missing)} slices of shard {self.shard} ({names}): "
                "send a gradient for every slice the shard holds",
            )
        rnd = state.round
        if rnd is not None:
            if rnd.workers_per_group != wpg:
                raise _abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{where}: workers_per_group={wpg} disagrees with {rnd.workers_per_group} from other processes",
                )
            if process not in rnd.contributions and rnd.workers + workers > wpg:
                raise _abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{where}: {rnd.workers} + {workers} workers exceed workers_per_group={wpg}",
                )
        return rnd

    def _check_finite(self, group: int, step: int, sums: dict[SliceKey, tuple[np.ndarray, ...]]) -> None:
        for key, parts in sums.items():
            if not all(np.isfinite(p).all() for p in parts):
                raise _nonfinite(group, step, slice_name(key))

    def _add(self, rnd: Round, process: int, workers: int, rows: int, sums: dict, metrics: dict[str, float]) -> None:
        rnd.parts[process] = sums  # kept as received, no copy: the update adds them up
        rnd.contributions[process] = (workers, rows)
        rnd.metrics[process] = metrics

    async def _apply(self, group: int, state: GroupState, rnd: Round, last: int, checkpoint_every: int) -> None:
        """Add up the contributions, check them, and apply the optimizer (jitted); a
        non-finite sum is refused (the last contribution is taken back) or skipped,
        as the policy says, and then nothing has changed. A checkpoint that falls on
        the new step is taken here, under the lock, so it is never missed."""
        async with self._lock:
            if rnd.done.done() or self.groups.get(group) is not state or state.round is not rnd:
                return  # a restore replaced the state while this waited: its waiters were told to re-sync
            try:
                self._check_intact()  # another group's update may have failed halfway while this one waited
                grads = {key: tuple(p for sums in rnd.parts.values() for p in sums[key]) for key in self.values}
                if self.nbytes() <= INLINE_UPDATE_BYTES and self._in_place(list(self.values)) in self._compiled:
                    finite = self._update_in_batches(grads, np.float32(rnd.rows))  # less than a thread hop
                else:
                    finite = await asyncio.to_thread(self._update_in_batches, grads, np.float32(rnd.rows))
            except Exception as err:
                # every waiter gets the error and the step is cleared: sent again, it can still complete
                if isinstance(err, WireError):
                    failed = err
                else:
                    log.exception("shard %d: the update of group %d step %d failed", self.shard, group, rnd.step)
                    failed = WireError(
                        grpc.StatusCode.DATA_LOSS if self.damage else grpc.StatusCode.INTERNAL,
                        f"shard {self.shard}: the update of group {group} step {rnd.step} failed ({err!r})",
                    )
                rnd.done.set_exception(failed)
                rnd.done.exception()  # retrieved: waiters that left do not warn
                state.round = None
                raise failed from None
            if not finite:
                if self.nonfinite == "reject":
                    sums = rnd.parts.pop(last)
                    del rnd.contributions[last]
                    rnd.metrics.pop(last, None)
                    bad = [k for k, ps in sums.items() if not all(np.isfinite(p).all() for p in ps)]
                    raise _nonfinite(group, rnd.step, slice_name(bad[0]) if bad else "the summed contributions")
                self.skipped_nonfinite += 1
            else:
                for key in self.versions:
                    self.versions[key] += 1
            rnd.parts = {}
            state.step = rnd.step + 1
            state.round = None
            state.last = sorted(rnd.contributions)
            metrics: dict[str, float] = {}
            for reported in rnd.metrics.values():
                for name, value in reported.items():
                    metrics[name] = metrics.get(name, 0.0) + value
            state.last_metrics = (metrics, rnd.rows)
            self.updates_applied += 1
            rnd.done.set_result(UpdateResult(state.step, dict(self.values), True, 0, metrics, rnd.rows))
            if group == 0 and checkpoint_every and state.step % checkpoint_every == 0:
                self._checkpoint_now()
        async with self._progress:
            self._progress.notify_all()

    def _in_place(self, keys: list[SliceKey]) -> bool:
        """Whether these slices can be updated in place: no reader holds their values."""
        return all(_references(self.values[k]) <= _STORE_ONLY for k in keys)

    def _batches(self) -> list[list[SliceKey]]:
        """The slices in batches of about ``update_batch_bytes`` (a small shard: one)."""

        def nbytes(key: SliceKey) -> int:
            dtype, shape = self.specs[key]
            return dtype.itemsize * math.prod(shape)

        return batched(self.values, nbytes, self.update_batch_bytes)

    def _update_in_batches(self, grads: dict, rows: np.float32) -> bool:
        """Apply the jitted update, replacing values and optimizer state; returns
        False (and changes nothing) when the summed gradients are not all finite.

        A small shard is one batch: one call, with the finite check fused. A large
        shard goes a batch of about ``update_batch_bytes`` at a time, after a finite
        check over all batches. Each batch is updated in place (its buffers donated
        to XLA) unless a reader (an answer being sent, a Get, a checkpoint being
        written) still holds them, in which case that batch gets new buffers and the
        reader keeps the old ones. So a shard needs no second copy of its state.
        A non-finite sum makes the jitted update hand back the old values and state
        (written over themselves when donated), so an update in place can still be
        refused. Readers take their snapshot under the update lock, never halfway
        through.
        """
        batches = [keys for keys in self._batches() if keys]
        if len(batches) > 1 and not all(bool(_all_finite({k: grads[k] for k in keys})) for keys in batches):
            return False
        changed = False  # once a batch is replaced or donated, a failure cannot be taken back
        donated: list = []  # this batch's inputs, when given to XLA to write over
        try:
            for keys in batches:
                in_place = self._in_place(keys)
                olds = ({k: self._opt_state[k] for k in keys}, {k: self.values[k] for k in keys})
                donated = jax.tree.leaves(olds) if in_place else []
                update = self._update_in_place if in_place else self._update_fn
                values, states, finite = update({k: grads[k] for k in keys}, *olds, rows)
                self._compiled.add(in_place)
                # the outputs replace the inputs either way: donated inputs are gone,
                # and a refused update's outputs are the old values and state
                self.values.update(values)
                self._opt_state.update(states)
                if not finite:
                    if len(batches) > 1:
                        raise RuntimeError("a batch was not finite after the check over all batches")
                    return False  # a single batch: the values are the old ones
                changed = True
        except Exception as err:
            # an error before XLA ran (tracing, compiling) leaves donated inputs as they were
            if changed or any(leaf.is_deleted() for leaf in donated):
                self.damage = f"an update failed after it had changed part of the values ({err!r})"
            raise
        return True

    # -- checkpoints ---------------------------------------------------------

    def snapshot(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The state as tensors and JSON metadata: values, optimizer state, versions,
        each group's step (its data position) and last contributors, the epoch."""
        tensors: dict[str, np.ndarray] = {}
        slices = []
        for index, key in enumerate(sorted(self.values)):
            tensors[f"value/{index}"] = np.asarray(self.values[key])
            for leaf_index, leaf in enumerate(jax.tree.leaves(self._opt_state[key])):
                tensors[f"opt/{index}/{leaf_index}"] = np.asarray(leaf)
            slices.append({"key": key[0], "slice": key[1], "version": self.versions[key]})
        meta = {
            "shard": self.shard,
            "shards": self.shards,
            "epoch": self.epoch,
            "optimizer": self.optimizer_spec,
            "job": self.job,
            "slices": slices,
            "groups": {str(g): {"step": st.step, "last": st.last} for g, st in self.groups.items()},
            "updates_applied": self.updates_applied,
        }
        return tensors, meta

    def _loaded(self, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> tuple:
        """The arrays and optimizer of a snapshot (see ``snapshot``), built without
        touching the state: off the event loop, in a thread. ``_install`` puts them in."""
        if meta["shard"] != self.shard or meta["shards"] != self.shards:
            raise ValueError(
                f"checkpoint of shard {meta['shard']} of {meta['shards']} cannot load into shard "
                f"{self.shard} of {self.shards}"
            )
        values, versions, states = {}, {}, {}
        opt = build_optimizer(json.loads(meta["optimizer"])) if meta["optimizer"] else None
        for index, entry in enumerate(meta["slices"]):
            key = (entry["key"], int(entry["slice"]))
            value = jax.numpy.array(tensors[f"value/{index}"])
            shapes = jax.eval_shape(opt.init, value)
            template = jax.tree.structure(shapes)
            # in the form opt.init gives (a scalar may come back from the file as shape (1,))
            leaves = [
                jax.numpy.array(tensors[f"opt/{index}/{i}"]).reshape(leaf.shape)
                for i, leaf in enumerate(jax.tree.leaves(shapes))
            ]
            values[key], versions[key] = value, int(entry["version"])
            states[key] = jax.tree.unflatten(template, leaves)
        return values, versions, states, opt

    def _install(self, loaded: tuple, meta: dict[str, Any]) -> None:
        """Replace the whole state with a loaded snapshot (under the update lock)."""
        values, versions, states, opt = loaded
        self._fail_rounds(f"shard {self.shard} was restored from a checkpoint: re-sync")
        self._generation += 1
        self.values, self.versions, self._opt_state = values, versions, states
        self.damage = ""  # a checkpoint is a state to trust again
        self.specs = {k: (np.dtype(np.asarray(v).dtype), tuple(v.shape)) for k, v in values.items()}
        self.optimizer_spec, self._opt = meta["optimizer"], opt
        self.job = meta.get("job", "")
        self.fingerprint = _fingerprint(self.job)
        self._set_update(opt)
        self.groups = {
            int(g): GroupState(step=int(st["step"]), last=list(st["last"])) for g, st in meta["groups"].items()
        }
        self.updates_applied = int(meta.get("updates_applied", 0))

    def _fail_rounds(self, message: str) -> None:
        for state in self.groups.values():
            if state.round is not None and not state.round.done.done():
                state.round.done.set_exception(WireError(grpc.StatusCode.FAILED_PRECONDITION, message))
                state.round.done.exception()  # retrieved: waiters that left do not warn
            state.round = None

    def checkpoint_steps(self) -> list[int]:
        return checkpoint.complete_steps(self.checkpoint_dir, self.shards) if self.checkpoint_dir else []

    async def load_newest(self) -> int | None:
        """Load the newest complete checkpoint, if any (a restarted shard); its epoch
        goes up by one so that every stub re-syncs. Returns group 0's step."""
        async with self._saving:
            steps = await asyncio.to_thread(self.checkpoint_steps)
            if steps:
                await self._roll_back(steps[-1], None)
        return steps[-1] if steps else None

    async def restore(self, step: int, epoch: int) -> None:
        """Roll back to the complete checkpoint of ``step`` and take on ``epoch``.

        Under the save lock: a checkpoint write in flight finishes first, so that the
        steps after ``step`` (an abandoned history) are dropped with whatever it
        wrote, and writes queued behind the restore are skipped (see ``_write``).
        """
        async with self._saving:
            steps = await asyncio.to_thread(self.checkpoint_steps)
            if step not in steps:
                raise _abort(
                    grpc.StatusCode.NOT_FOUND,
                    f"shard {self.shard} has no complete checkpoint of step {step} (it has {steps}): "
                    "restore to one of those",
                )
            await self._roll_back(step, epoch)

    async def _roll_back(self, step: int, epoch: int | None) -> None:
        """Load the checkpoint of ``step`` and drop the later ones (an abandoned history);
        ``epoch`` None: the checkpoint's plus one. The caller holds the save lock; the
        state is replaced under the update lock, then waiters look again."""
        tensors, meta = await asyncio.to_thread(checkpoint.load_shard, self.checkpoint_dir, step, self.shard)
        loaded = await asyncio.to_thread(self._loaded, tensors, meta)
        async with self._lock:
            self._install(loaded, meta)
            self.epoch = int(meta["epoch"]) + 1 if epoch is None else epoch
            self.saved_step = step
        await asyncio.to_thread(checkpoint.drop_after, self.checkpoint_dir, step)
        async with self._progress:
            self._progress.notify_all()

    def _checkpoint_now(self) -> None:
        """Snapshot the state (the caller holds the update lock: the snapshot is never
        halfway through an update) and write it in the background."""
        if self.checkpoint_dir is None or self.damage:
            return
        step = self.group_step(0)
        tensors, meta = self.snapshot()  # numpy views: the update never writes over them
        task = asyncio.get_running_loop().create_task(self._write(step, tensors, meta, self._generation))
        self._saves.add(task)
        task.add_done_callback(self._saves.discard)

    async def _write(self, step: int, tensors: dict[str, np.ndarray], meta: dict[str, Any], generation: int) -> None:
        async with self._saving:  # one write at a time, in step order
            if step <= self.saved_step or generation != self._generation:
                return  # saved already, or taken before a restore: of the history it abandoned
            try:
                await asyncio.to_thread(
                    checkpoint.save_shard, self.checkpoint_dir, step, self.shard, self.shards, tensors, meta
                )
                await asyncio.to_thread(checkpoint.prune, self.checkpoint_dir, self.keep, self.shards)
                self.saved_step = step
            except OSError:
                log.exception("shard %d: checkpoint of step %d failed", self.shard, step)

    async def flush_checkpoints(self, final: bool = False) -> None:
        """Wait for pending writes; with ``final``, also save the current state (a
        graceful shutdown) unless that step is saved already."""
        if final and self.checkpoint_dir is not None and self.values and self.group_step(0) > self.saved_step:
            async with self._lock:
                self._checkpoint_now()
        while self._saves:
            await asyncio.gather(*self._saves, return_exceptions=True)


def _forms(tree: Any) -> list[tuple[tuple[int, ...], np.dtype]]:
    return [(tuple(x.shape), np.dtype(x.dtype)) for x in jax.tree.leaves(tree)]


def _fingerprint(job: str) -> str:
    """The fingerprint of a job identity ('' for none); INVALID_ARGUMENT for one
    that is not an identity."""
    if not job:
        return ""
    try:
        fingerprint = json.loads(job)["fingerprint"]
    except (ValueError, TypeError, KeyError, RecursionError):
        raise _abort(grpc.StatusCode.INVALID_ARGUMENT, "the Put's job is not a psfw job identity (JSON)") from None
    if not isinstance(fingerprint, str) or not fingerprint:
        raise _abort(grpc.StatusCode.INVALID_ARGUMENT, "the Put's job identity has no fingerprint")
    return fingerprint


def _spec(optimizer: str) -> Any:
    try:
        return json.loads(optimizer)
    except (ValueError, RecursionError) as err:
        raise _abort(grpc.StatusCode.INVALID_ARGUMENT, f"the Put's optimizer spec is not JSON: {err}") from None


def _nonfinite(group: int, step: int, what: str) -> WireError:
    return _abort(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"group {group} step {step}: the gradient of {what} has NaN or Inf values (policy: reject)",
    )


def _references(array: Any) -> int:
    return sys.getrefcount(array)


# How many references ``_references(store.values[key])`` sees when the store's dict is
# the only holder (the count differs between Python versions): measured, not assumed.
_PROBE = {"probe": object()}
_STORE_ONLY = _references(_PROBE["probe"])


def _jit_update(opt: optax.GradientTransformation):
    """The jitted update, and the same with the old values and state donated (the
    new ones are written over them)."""
    update = _make_update(opt)
    return jax.jit(update), jax.jit(update, donate_argnums=(1, 2))


@jax.jit
def _all_finite(parts: dict) -> jax.Array:
    """Whether the sums of every slice's parts are all finite."""
    sums = [functools.reduce(jax.numpy.add, ps) for ps in parts.values()]
    return jax.numpy.all(jax.numpy.stack([jax.numpy.isfinite(s).all() for s in sums]))


def _make_update(opt: optax.GradientTransformation):
    def update(parts, states, params, rows):
        # the contributions' parts are added here, fused with the update by XLA
        sums = {key: functools.reduce(jax.numpy.add, ps) for key, ps in parts.items()}
        finite = jax.numpy.all(jax.numpy.stack([jax.numpy.isfinite(s).all() for s in sums.values()]))
        grads = jax.tree.map(lambda g: g / rows.astype(g.dtype), sums)
        updates = {}
        new_states = {}
        for key in params:  # one optimizer state per slice: every optimizer is element-wise
            updates[key], new_states[key] = opt.update(grads[key], states[key], params[key])
        # a non-finite sum changes nothing: the old values and state come out again
        # (fused into the same pass), which is what lets a donated update be refused
        keep = functools.partial(jax.tree.map, lambda new, old: jax.numpy.where(finite, new, old))
        return keep(optax.apply_updates(params, updates), params), keep(new_states, states), finite

    return update
