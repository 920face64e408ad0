"""A pipelined round: each slice applied, and answered, as soon as every process of
the group has sent its part of it, while the rest of the Updates still arrive.

Between hosts a worker's link carries the gradients up and the parameters down; when
a shard answers only once the group's whole push has arrived, a step costs the push
and then the pull. Every stub sends its slices in the layout's order, so the first
slices of every process arrive first: the shard adds and applies them (the optimizer
is element-wise, one state per slice) and their values travel down while the later
slices still travel up. A round turns pipelined when its first pipelined Update
joins (a whole Update that joins it later adds every slice at once); it closes once
every slice is applied and every request has ended (their table rows are in): then
the step counts, the table rows are updated and the checkpoint that falls on it is
taken, as in a whole round.

Exactly once: a process's part of a slice is added once (a retried Update adds only
the slices its first attempt did not). A slice applied cannot be taken back: the stub
sends a step whose gradients are not all finite as a whole Update (whose refusal
leaves nothing behind); a slice whose sum is not finite all the same (a client that
marks such a step pipelined, a sum that overflows) keeps its values, checked inside
the slice's jitted update, and the step counts as skipped; an update that fails after
some slices were applied leaves the shard damaged (restore it from a checkpoint).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import grpc
import numpy as np

from psfw.base.errors import mark_retrieved
from psfw.protocol.layout import SliceKey
from psfw.protocol.messages import Gradients, Parts, UpdateHeader
from psfw.protocol.wire import slice_name
from psfw.services.kernel import unshared
from psfw.services.request_checks import check_update, incomplete, nonfinite, refusal
from psfw.services.round_state import Contribution, GroupState, Progress, Round

if TYPE_CHECKING:
    from psfw.services.rounds import ShardRounds

log = logging.getLogger("psfw.server")


class SliceRounds:
    """The pipelined half of the round protocol, over ``rounds``' state."""

    def __init__(self, rounds: ShardRounds):
        self.rounds, self.store = rounds, rounds.store

    async def open(self, head: UpdateHeader) -> tuple[GroupState, Round | None]:
        """A pipelined Update's first message (``head``: its header; its table
        rows come in ``rows_in``): the checks every Update gets, then its process
        joins the group's round, slice by slice from now on. The round is None for
        a step the group has completed (a retry: acknowledged once the request has
        arrived). A job of several groups is refused: another group's checkpoint
        would see a step half applied."""
        rounds, store = self.rounds, self.store
        if head.worker_groups != 1 or head.max_groups:
            raise refusal(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"group {head.group} step {head.step}: a pipelined update is for a job of one group: send it whole",
            )
        rounds.heard(head)
        state = await rounds.group_of(head)
        if head.step < state.step:
            return state, None
        rnd = check_update(store.shard, state, head, (), {})  # every slice is checked at the end
        if rnd is None:
            rnd = state.round = Round(head.step, head.workers_per_group)
        rounds.keep(state, head)
        if rnd.progress is None:
            rnd.progress = Progress.of(store.values, rnd.contributions)
        if head.process not in rnd.contributions:
            rnd.contributions[head.process] = Contribution(head.workers, head.rows, {}, dict(head.metrics))
        return state, rnd

    async def add(self, state: GroupState, rnd: Round, head: UpdateHeader, key: SliceKey, parts: Parts) -> None:
        """The process's part of one slice, added once; applies every slice that
        is complete now."""
        self.rounds.check_current(head)
        arrived = rnd.progress.arrived[key]
        if head.process in arrived or rnd.done.done():
            return  # a retry's: added before
        rnd.contributions[head.process].sums[key] = parts
        arrived.add(head.process)
        await self._advance(state, rnd, head)

    async def add_whole(self, state: GroupState, rnd: Round, head: UpdateHeader, sums: Gradients) -> None:
        """A whole Update that joins a pipelined round: every slice it has not
        added yet, and its table rows."""
        progress = rnd.progress
        contribution = rnd.contributions.setdefault(
            head.process, Contribution(head.workers, head.rows, {}, dict(head.metrics))
        )
        for key, parts in sums.items():
            if head.process not in progress.arrived[key]:
                contribution.sums[key] = parts
                progress.arrived[key].add(head.process)
        if head.process not in progress.ended:
            contribution.push = head.push
            progress.ended.add(head.process)
        await self._advance(state, rnd, head)

    def rows_in(self, rnd: Round, head: UpdateHeader) -> None:
        """The process's table rows (``head``'s: all of them), checked and kept
        before any of its slices is added, so that a refusal leaves nothing applied."""
        progress, store = rnd.progress, self.store
        if head.process in progress.ended:
            return
        store.tables.check_pull(head.pull)
        bad_rows = store.tables.check_push(head.push)
        if bad_rows is not None and store.nonfinite == "reject":
            raise nonfinite(head.group, head.step, f"table {bad_rows}")
        rnd.contributions[head.process].push = head.push
        progress.ended.add(head.process)

    async def end(self, state: GroupState, rnd: Round, head: UpdateHeader) -> None:
        """The process's request has arrived whole: it must have sent every slice
        the shard holds."""
        progress, store = rnd.progress, self.store
        self.rows_in(rnd, head)  # a request without slices
        missing = sorted(k for k, got in progress.arrived.items() if head.process not in got)
        if missing and not rnd.done.done():
            names = ", ".join(slice_name(k) for k in missing[:5])
            raise refusal(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"group {head.group} step {head.step}: the update lacks {len(missing)} slices of shard {store.shard} "
                f"({names}): send a gradient for every slice the shard holds",
            )
        await self._advance(state, rnd, head)

    async def value(self, rnd: Round, head: UpdateHeader, key: SliceKey, deadline: float, taking: asyncio.Future):
        """The slice's value after the step, once the group's slice is applied
        (until ``deadline``); ``taking``, the reading of the rest of the request,
        raises here if it fails meanwhile."""
        ready = rnd.progress.ready[key]
        watch = {ready} if taking.done() else {ready, taking}
        while not ready.done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._late(rnd, head, key)
            done, _ = await asyncio.wait(watch, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if taking in done:
                if taking.exception() is not None:
                    raise taking.exception()
                watch = {ready}  # the request is in: the rest of the group may still be on its way
        self.rounds.check_current(head)
        return ready.result()

    def _late(self, rnd: Round, head: UpdateHeader, key: SliceKey):
        """The refusal when a slice's wait runs out: who has not sent it."""
        waiting = sorted(set(rnd.contributions) - rnd.progress.arrived[key])
        if rnd.workers != rnd.workers_per_group or not waiting:
            return incomplete(self.store.shard, head.group, rnd, head)
        return refusal(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"shard {self.store.shard}: group {head.group} step {rnd.step}: {slice_name(key)} still waits for "
            f"processes {waiting} after {head.wait_s:.1f} s",
        )

    def _complete(self, rnd: Round) -> list[SliceKey]:
        """The slices every process of the group has sent and that wait to be applied."""
        if rnd.workers != rnd.workers_per_group:
            return []
        everyone, progress = set(rnd.contributions), rnd.progress
        return [k for k, got in progress.arrived.items() if k not in progress.applied and got >= everyone]

    def _closes(self, rnd: Round) -> bool:
        """Whether the round is done: every slice applied, every request ended."""
        progress = rnd.progress
        return (
            not rnd.done.done()
            and rnd.workers == rnd.workers_per_group
            and len(progress.applied) == len(progress.arrived)
            and progress.ended >= set(rnd.contributions)
        )

    async def _advance(self, state: GroupState, rnd: Round, head: UpdateHeader) -> None:
        """Apply what is complete, and close the round when it is done: in a task of
        its own, so that a handler cancelled meanwhile cannot leave it half done."""
        if not self._complete(rnd) and not self._closes(rnd):
            return
        applying = asyncio.get_running_loop().create_task(self._apply(head.group, state, rnd, head.checkpoint_every))
        applying.add_done_callback(mark_retrieved)
        await asyncio.shield(applying)

    async def _apply(self, group: int, state: GroupState, rnd: Round, checkpoint_every: int) -> None:
        store = self.store
        closed = False
        async with store.lock:
            if rnd.done.done() or store.groups.get(group) is not state or state.round is not rnd:
                return  # a restore replaced the state while this waited: its waiters were told to re-sync
            try:
                store.check_intact()
                for key in self._complete(rnd):
                    self._apply_slice(group, rnd, key)
                if self._closes(rnd):
                    self._close(group, state, rnd, checkpoint_every)
                    closed = True
            except Exception as err:
                applied = len(rnd.progress.applied)
                if applied and not store.damage:  # a slice applied cannot be taken back
                    store.damage = (
                        f"the update of group {group} step {rnd.step} failed after {applied} of its slices were "
                        f"applied ({err!r})"
                    )
                failed = self.rounds.failure(err, group, rnd)
                rnd.fail(failed)
                state.round = None
                raise failed from None
        if closed:
            await store.notify()

    def _apply_slice(self, group: int, rnd: Round, key: SliceKey) -> None:
        """One slice's update (the caller holds the lock); its waiters get its value."""
        store, progress = self.store, rnd.progress
        parts = tuple(p for c in rnd.contributions.values() for p in c.sums.pop(key))
        in_place = unshared(store.values, [key])
        value, opt_state, finite = store.kernel.apply_slice(
            parts, store.values[key], store.opt_state[key], np.float32(rnd.rows), in_place
        )
        store.values[key], store.opt_state[key] = value, opt_state
        progress.finite[key] = finite  # not read now: the loop goes on while XLA computes
        progress.applied.add(key)
        progress.ready[key].set_result(value)

    def _close(self, group: int, state: GroupState, rnd: Round, checkpoint_every: int) -> None:
        """The step is done: the table rows, the versions, the waiters' result and
        the checkpoint that falls on it (the caller holds the lock)."""
        store, progress = self.store, rnd.progress
        row_plans = store.tables.plan([c.push for c in rnd.contributions.values()], float(rnd.rows))
        if row_plans is not None:
            store.tables.commit(row_plans)
        kept = [key for key, finite in progress.finite.items() if not bool(finite)]
        if kept or row_plans is None:
            store.skipped_nonfinite += 1
            what = ", ".join(slice_name(k) for k in kept[:5]) or "its table rows"
            log.warning(
                "shard %d: group %d step %d: the summed gradients of %s were not finite: kept as they were (the "
                "other slices of a pipelined step are applied)",
                store.shard,
                group,
                rnd.step,
                what,
            )
        for key in store.versions:
            store.versions[key] += 1
        self.rounds.close(state, rnd)
        if group == 0 and checkpoint_every and state.step % checkpoint_every == 0:
            store.checkpoints.save_now()
