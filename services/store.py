"""One parameter-server shard's state: slices, versions, optimizer state, and the
contributions of each group's step in progress.

Every method validates fully before it changes anything, so a rejected request
leaves the shard exactly as it was. All methods run on the server's event loop; the
optimizer update itself runs in a thread under a lock (JAX releases the GIL).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import jax
import numpy as np
import optax

from psfw.compute.optimizers import build_optimizer
from psfw.layout import SliceKey
from psfw.proto import ps_pb2 as pb
from psfw.wire import WireError, slice_name

NONFINITE_POLICIES = ("reject", "skip")


@dataclass
class Round:
    """The contributions to one group step that is not complete yet."""

    step: int
    workers_per_group: int
    contributions: dict[int, tuple[int, int]] = field(default_factory=dict)  # process -> (workers, rows)
    sums: dict[SliceKey, np.ndarray] = field(default_factory=dict)
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    reply: asyncio.Task | None = None  # the encoded answer, built once for every waiter

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
    updated_at: float = 0.0


@dataclass(frozen=True)
class UpdateResult:
    step: int  # the group's completed steps after the update
    values: dict[SliceKey, jax.Array]  # a snapshot right after the update
    round: Round | None  # the round that produced it (None: an acknowledged old step)
    slowest_step: int = 0  # the slowest group's completed steps when the answer left


def _abort(code: grpc.StatusCode, message: str) -> WireError:
    return WireError(code, message)


class ShardStore:
    """The slices one shard holds and the server-side optimizer that updates them."""

    def __init__(self, shard: int = 0, shards: int = 1, nonfinite: str = "reject"):
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite policy {nonfinite!r}: use 'reject' or 'skip'")
        self.shard, self.shards, self.nonfinite = shard, shards, nonfinite
        self.values: dict[SliceKey, jax.Array] = {}
        self.versions: dict[SliceKey, int] = {}
        self.specs: dict[SliceKey, tuple[np.dtype, tuple[int, ...]]] = {}
        self.groups: dict[int, GroupState] = {}
        self.optimizer_spec = ""
        self.skipped_nonfinite = 0
        self.updates_applied = 0
        self.started = time.monotonic()
        self._opt: optax.GradientTransformation | None = None
        self._opt_state: dict[SliceKey, Any] = {}
        self._update_fn = None
        self._lock = asyncio.Lock()
        self._progress = asyncio.Condition()

    # -- reading -------------------------------------------------------------

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
        return sum(int(np.prod(s)) * d.itemsize for d, s in self.specs.values())

    def digest(self) -> str:
        """A hash of values, versions, group steps and optimizer state (for tests and
        operators: equal digests mean equal state)."""
        import hashlib

        h = hashlib.sha256()
        for key in sorted(self.values):
            h.update(repr((key, self.versions[key])).encode())
            h.update(np.asarray(self.values[key]).tobytes())
            for leaf in jax.tree.leaves(self._opt_state.get(key)):
                h.update(np.asarray(leaf).tobytes())
        h.update(repr(sorted((g, s.step) for g, s in self.groups.items())).encode())
        return h.hexdigest()

    # -- put ---------------------------------------------------------------

    async def put(self, arrays: dict[SliceKey, np.ndarray], optimizer: str) -> int:
        """Store the initial values of new slices (version 0).

        A retried Put of identical values is acknowledged; a different value for a
        held slice is ALREADY_EXISTS. The first Put fixes the shard's optimizer.
        """
        if not arrays:
            raise _abort(grpc.StatusCode.INVALID_ARGUMENT, "Put carries no slices")
        opt = self._opt
        if not self.optimizer_spec:
            if not optimizer:
                raise _abort(grpc.StatusCode.INVALID_ARGUMENT, "the first Put must name the optimizer (JSON spec)")
            try:
                opt = build_optimizer(json.loads(optimizer))
            except (ValueError, TypeError, AttributeError) as err:
                raise _abort(grpc.StatusCode.INVALID_ARGUMENT, f"optimizer spec {optimizer!r}: {err}") from None
        elif optimizer and json.loads(optimizer) != json.loads(self.optimizer_spec):
            raise _abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"shard {self.shard} already trains with optimizer {self.optimizer_spec}, the Put asks for {optimizer}",
            )
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
        if not self.optimizer_spec:
            self.optimizer_spec, self._opt = optimizer, opt
            self._update_fn = jax.jit(_make_update(opt))
        for key, value in new.items():
            array = jax.numpy.array(value)  # a private copy: the request buffer is not ours
            self.values[key] = array
            self.versions[key] = 0
            self.specs[key] = (value.dtype, value.shape)
            self._opt_state[key] = self._opt.init(array)
        async with self._progress:
            self._progress.notify_all()
        return len(arrays)

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

    async def update(self, head: pb.UpdateRequest, sums: dict[SliceKey, np.ndarray], wait_s: float) -> UpdateResult:
        """Add one process's row-weighted gradient sum (``head`` names group, step,
        process, workers, rows) to its group's step; once the whole group has
        reported, apply the averaged gradient. Waits for the group (at most
        ``wait_s``), then, under a staleness bound, for the slowest group, and
        returns the fresh values.

        A contribution that was already added (a retried RPC) is acknowledged and not
        added again; a step that is already complete answers with current values.
        """
        if self.nonfinite == "reject":
            await asyncio.to_thread(self._check_finite, head.group, head.step, sums)
        group, step, process = head.group, head.step, head.process
        state = self.groups.get(group) or GroupState()
        if step < state.step:
            return UpdateResult(state.step, dict(self.values), None, self.slowest_step(head.worker_groups))
        rnd = self._validate_update(state, head, sums)
        if rnd is None:
            rnd = state.round = Round(step, head.workers_per_group)
        self.groups[group] = state
        if process not in rnd.contributions:
            self._add(rnd, process, head.workers, head.rows, sums)
            if rnd.workers == rnd.workers_per_group:
                await self._apply(group, state, rnd)
        deadline = time.monotonic() + wait_s
        try:
            await asyncio.wait_for(asyncio.shield(rnd.done), wait_s)
        except TimeoutError:
            raise _abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"shard {self.shard}: group {group} step {step} is incomplete after {wait_s:.1f} s: "
                f"{rnd.workers} of {rnd.workers_per_group} workers reported "
                f"(processes {sorted(rnd.contributions)}); the group's other processes are missing",
            ) from None
        result = rnd.done.result()
        if head.staleness >= 0 and head.worker_groups > 1:
            await self._hold_for_slowest(group, result.step, head, max(0.0, deadline - time.monotonic()))
        return dataclasses.replace(result, slowest_step=self.slowest_step(head.worker_groups))

    def slowest_step(self, worker_groups: int) -> int:
        """The completed steps of the slowest of groups 0..worker_groups-1."""
        return min((self.group_step(g) for g in range(max(worker_groups, 1))), default=0)

    async def _hold_for_slowest(self, group: int, step: int, head: pb.UpdateRequest, wait_s: float) -> None:
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

    def _validate_update(self, state: GroupState, head: pb.UpdateRequest, sums) -> Round | None:
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
        if head.worker_groups and head.group >= head.worker_groups:
            raise _abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"{where}: group {head.group} of {head.worker_groups} groups"
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

    def _check_finite(self, group: int, step: int, sums: dict[SliceKey, np.ndarray]) -> None:
        for key, value in sums.items():
            if not np.isfinite(value).all():
                raise _abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"group {group} step {step}: the gradient of {slice_name(key)} has NaN or Inf values "
                    "(policy: reject)",
                )

    def _add(self, rnd: Round, process: int, workers: int, rows: int, sums: dict[SliceKey, np.ndarray]) -> None:
        if not rnd.contributions:
            rnd.sums = dict(sums)  # the first contribution is kept as received, no copy
        else:
            for key, value in sums.items():
                total = rnd.sums[key]
                if total.flags.writeable and total.base is None:
                    np.add(total, value, out=total)
                else:
                    rnd.sums[key] = total + value
        rnd.contributions[process] = (workers, rows)

    async def _apply(self, group: int, state: GroupState, rnd: Round) -> None:
        async with self._lock:
            grads = rnd.sums
            if self.nonfinite == "skip" and not all(np.isfinite(v).all() for v in grads.values()):
                self.skipped_nonfinite += 1
                values, opt_state = self.values, self._opt_state
            else:
                values, opt_state = await asyncio.to_thread(
                    self._update_fn, grads, self._opt_state, self.values, np.float32(rnd.rows)
                )
                for key in values:
                    self.versions[key] += 1
            self.values, self._opt_state = dict(values), dict(opt_state)
            rnd.sums = {}
            state.step = rnd.step + 1
            state.round = None
            self.updates_applied += 1
            state.updated_at = time.monotonic()
            rnd.done.set_result(UpdateResult(state.step, dict(self.values), rnd))
        async with self._progress:
            self._progress.notify_all()


def _make_update(opt: optax.GradientTransformation):
    def update(sums, states, params, rows):
        grads = jax.tree.map(lambda g: g / rows.astype(g.dtype), sums)
        updates = {}
        new_states = {}
        for key in params:  # one optimizer state per slice: every optimizer is element-wise
            updates[key], new_states[key] = opt.update(grads[key], states[key], params[key])
        return optax.apply_updates(params, updates), new_states

    return update
