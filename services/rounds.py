"""A shard's round protocol: each group's step in progress at the shard, from an
Update's contribution to the answer its waiters get.

A round holds one contribution per process: its workers, rows, metrics x rows, and
its gradient sum per slice (a tuple of parts where the transport fused the sum, see
psfw.runtime.transport.Capabilities). ``ShardRounds.update`` acknowledges a
contribution (once per process: a retry is never added twice), holds the group for
the slowest group under the staleness bound, and, once the round is full, adds the
contributions up and runs the update kernel under the store's lock; then every
waiter gets the fresh values. The state it changes is the store's (``ShardStore``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import TYPE_CHECKING

import grpc
import numpy as np

from psfw.base.errors import WireError, mark_retrieved
from psfw.protocol.layout import SliceKey
from psfw.protocol.messages import Gradients, Parts, RowBlock, UpdateHeader
from psfw.protocol.wire import slice_name
from psfw.services.kernel import PartlyApplied, unshared
from psfw.services.request_checks import check_update, incomplete, nonfinite, refusal
from psfw.services.round_state import (  # noqa: F401 (the state's names, as the protocol's users know them)
    Contribution,
    GroupState,
    Reports,
    Round,
    UpdateResult,
    bounded,
)
from psfw.services.slice_rounds import SliceRounds
from psfw.services.table_rows import RowUpdate

if TYPE_CHECKING:
    from psfw.services.store import ShardStore

# a shard this small updates on the event loop (less than a thread hop), a larger one in
# a thread; also where an OS process holds several shards: their memory-bound updates each
# use every core, so one after the other beats side by side (docs/performance.md)
INLINE_UPDATE_BYTES = 8 << 20
log = logging.getLogger("psfw.server")


class ShardRounds:
    """The round protocol over one shard's state: ``update`` is the Update verb."""

    def __init__(self, store: ShardStore) -> None:
        self.store = store
        self.slices = SliceRounds(self)  # the pipelined Updates' half

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
        store = self.store
        bad_rows = self.heard(head)
        sums = {k: v if isinstance(v, tuple) else (v,) for k, v in sums.items()}  # parts, added when applied
        await self._check_finite(head, sums, bad_rows)
        state = await self.group_of(head)
        if head.step < state.step:
            return await self.acknowledge(state, head)
        rnd = check_update(store.shard, state, head, store.values, sums)
        if rnd is None:
            rnd = state.round = Round(head.step, head.workers_per_group)
        if rnd.progress is not None:  # pipelined Updates have joined this round: slice by slice
            self.keep(state, head)
            await self.slices.add_whole(state, rnd, head, sums)
        else:
            await self._contribute(state, rnd, head, sums)
        return await self.answer(rnd, head)

    def heard(self, head: UpdateHeader) -> str | None:
        """What every Update's header goes through first: the shard is current and
        of its job, the process is seen, an early end is noted, its table rows are
        checked; returns the first table whose pushed rows are not finite (None:
        all are)."""
        store = self.store
        self.check_current(head)
        store.reports.seen(head.group, head.process)
        if head.stop_at:  # an early end of the job (train.stop_after): every group's answers carry it
            store.stop_at = min(store.stop_at or head.stop_at, head.stop_at)
        store.tables.check_pull(head.pull)
        return store.tables.check_push(head.push)

    async def group_of(self, head: UpdateHeader) -> GroupState:
        """The Update's group (admitted if it is new), marked present; a group that
        left meanwhile no longer holds the others."""
        store = self.store
        state = store.groups.get(head.group) or store.presence.admit(head)
        store.presence.report(head)
        if store.presence.sweep():  # another group left: a group it held goes on
            await store.notify()
        return state

    def keep(self, state: GroupState, head: UpdateHeader) -> bool:
        """Keep the group's state in the store; whether it is new there."""
        groups, group = self.store.groups, head.group
        created = group not in groups
        groups[group] = state
        if created and group >= head.worker_groups > 0:
            self.store.presence.joined(group, state.step)
        return created

    async def _check_finite(self, head: UpdateHeader, sums: dict[SliceKey, Parts], bad_rows: str | None) -> None:
        """Under the "reject" policy, a contribution that is not finite is refused
        before it is added. The one that completes a step is checked inside the
        jitted update instead (its refusal takes it back)."""
        store = self.store
        if store.nonfinite != "reject":
            return
        if bad_rows is not None:
            raise nonfinite(head.group, head.step, f"table {bad_rows}")
        pending = store.groups[head.group].round if head.group in store.groups else None
        completes = (pending.workers if pending else 0) + head.workers >= head.workers_per_group
        pipelined = pending is not None and pending.progress is not None  # no slice of it can be taken back
        if (pipelined or not completes) and store.kernel is not None:
            bad = await asyncio.to_thread(store.kernel.first_nonfinite, sums)
            if bad is not None:
                raise nonfinite(head.group, head.step, slice_name(bad))
            self.check_current(head)  # a Restore may have run meanwhile

    async def _contribute(self, state: GroupState, rnd: Round, head: UpdateHeader, sums: dict) -> None:
        """Add the process's contribution to ``rnd`` once; the one that fills the
        round applies it."""
        groups, group, process = self.store.groups, head.group, head.process
        created = self.keep(state, head)
        if process in rnd.contributions:
            return  # a retry: acknowledged, not added twice
        rnd.contributions[process] = Contribution(head.workers, head.rows, sums, dict(head.metrics), head.push)
        if rnd.workers != rnd.workers_per_group:
            return
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
                    del groups[group]
            raise

    async def answer(self, rnd: Round, head: UpdateHeader) -> UpdateResult:
        """Wait for the round's result, then for the slowest group under the
        staleness bound; the answer carries the rows the Update pulls."""
        store = self.store
        deadline = time.monotonic() + head.wait_s
        try:
            if not rnd.done.done():  # the contribution that completed the step has its answer already
                await asyncio.wait_for(asyncio.shield(rnd.done), head.wait_s)
        except TimeoutError:
            raise incomplete(store.shard, head.group, rnd, head) from None
        result = rnd.done.result()
        if bounded(head):
            await self._hold_for_slowest(head.group, result.step, head, max(0.0, deadline - time.monotonic()))
        rows = await self._pulled(head)
        slowest = store.slowest_step(head.worker_groups)
        return dataclasses.replace(result, slowest_step=slowest, table_rows=rows, stop_at=store.stop_at)

    async def _pulled(self, head: UpdateHeader) -> dict[str, RowBlock]:
        """The table rows an Update pulls, as they are now (after its step)."""
        if not head.pull:
            return {}
        async with self.store.lock:
            self.check_current(head)
            return self.store.tables.read(head.pull)

    async def acknowledge(self, state: GroupState, head: UpdateHeader) -> UpdateResult:
        """A retry of the last applied step: acknowledged with the current values,
        never added twice. An older step is FAILED_PRECONDITION (re-sync)."""
        store = self.store
        if head.step + 1 < state.step:
            raise refusal(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"shard {store.shard}: group {head.group} step {head.step} was applied long ago (the group has "
                f"completed {state.step} steps): re-sync",
            )
        if bounded(head):
            await self._hold_for_slowest(head.group, state.step, head, head.wait_s)
        async with store.lock:
            self.check_current(head)
            values = dict(store.values)
            table_rows = store.tables.read(head.pull)
        metrics, rows = state.last_metrics
        slowest = store.slowest_step(head.worker_groups)
        return UpdateResult(
            state.step, values, False, slowest, dict(metrics), rows, table_rows=table_rows, stop_at=store.stop_at
        )

    def check_current(self, head: UpdateHeader) -> None:
        """The shard is intact, of the update's job and at its epoch: checked again
        after every wait, since a Restore may have rolled the shard back during it."""
        store = self.store
        store.check_intact()
        store.check_job(head.job)
        if head.epoch != store.epoch:
            raise refusal(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"shard {store.shard} is at epoch {store.epoch} (restored from a checkpoint), the update was made "
                f"at epoch {head.epoch}: re-sync",
            )

    async def _hold_for_slowest(self, group: int, step: int, head: UpdateHeader, wait_s: float) -> None:
        """Bounded staleness (SSP): a group may start ``step`` only while it is at most
        ``staleness`` steps ahead of the slowest group counted. A group that sends no
        Update for the job's group timeout stops counting (``GroupPresence``): the
        wait looks again when the next one could."""
        store, groups, bound = self.store, head.worker_groups, head.staleness
        presence, swept = store.presence, []

        def ready() -> bool:
            presence.waits(group)  # held here, it is not quiet
            swept.extend(presence.sweep())  # a group that left holds no one back
            return step - store.slowest_step(groups) <= bound

        deadline = time.monotonic() + wait_s
        while not await store.wait_until(
            ready, min(max(0.0, deadline - time.monotonic()), presence.next_change_s() + 0.01)
        ):
            if time.monotonic() >= deadline:
                behind = sorted(g for g in presence.counted() if step - store.group_step(g) > bound)
                raise refusal(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"shard {store.shard}: group {group} may not start step {step} with staleness {bound}: "
                    f"groups {behind} are further behind and did not advance for {wait_s:.1f} s",
                )
        if swept:  # the other groups it held look again
            await store.notify()

    async def _apply(self, group: int, state: GroupState, rnd: Round, last: int, checkpoint_every: int) -> None:
        """Add up the contributions, check them, and apply the optimizer (jitted); a
        non-finite sum is refused (the last contribution is taken back) or skipped,
        as the policy says, and then nothing has changed. A checkpoint that falls on
        the new step is taken here, under the lock, so it is never missed."""
        store = self.store
        async with store.lock:
            if rnd.done.done() or store.groups.get(group) is not state or state.round is not rnd:
                return  # a restore replaced the state while this waited: its waiters were told to re-sync
            try:
                row_plans, finite = await self._run_update(rnd)
            except Exception as err:
                # every waiter gets the error and the step is cleared: sent again, it can still complete
                failed = self.failure(err, group, rnd)
                rnd.fail(failed)
                state.round = None
                raise failed from None
            if not finite:
                if store.nonfinite == "reject":
                    taken = rnd.contributions.pop(last)
                    bad = store.kernel.first_nonfinite(taken.sums)
                    raise nonfinite(group, rnd.step, slice_name(bad) if bad else "the summed contributions")
                store.skipped_nonfinite += 1
            else:
                store.tables.commit(row_plans)
                for key in store.versions:
                    store.versions[key] += 1
            self.close(state, rnd)
            if group == 0 and checkpoint_every and state.step % checkpoint_every == 0:
                store.checkpoints.save_now()
        await store.notify()

    async def _run_update(self, rnd: Round) -> tuple[dict[str, RowUpdate] | None, bool]:
        """The round's table plans and whether its dense update was finite (the
        caller holds the lock)."""
        store = self.store
        store.check_intact()  # another group's update may have failed halfway while this one waited
        grads = rnd.gradients(store.values)
        row_plans = store.tables.plan([c.push for c in rnd.contributions.values()], float(rnd.rows))
        if row_plans is None:
            return None, False  # a table's update is not finite: the dense parameters stay as they are too
        if not store.values:
            return row_plans, True  # a shard that holds nothing still counts the group's steps
        inline = store.nbytes() <= INLINE_UPDATE_BYTES and unshared(store.values, list(store.values)) in (
            store.kernel.compiled
        )
        if inline:
            return row_plans, self._run_kernel(grads, np.float32(rnd.rows))  # less than a thread hop
        return row_plans, await asyncio.to_thread(self._run_kernel, grads, np.float32(rnd.rows))

    def failure(self, err: Exception, group: int, rnd: Round) -> WireError:
        """What the round's waiters are told when its update raised ``err``."""
        if isinstance(err, WireError):
            return err
        store = self.store
        log.exception("shard %d: the update of group %d step %d failed", store.shard, group, rnd.step)
        return WireError(
            grpc.StatusCode.DATA_LOSS if store.damage else grpc.StatusCode.INTERNAL,
            f"shard {store.shard}: the update of group {group} step {rnd.step} failed ({err!r})",
        )

    def close(self, state: GroupState, rnd: Round) -> None:
        """The group's step is done (applied or skipped): its waiters get the result."""
        store = self.store
        state.step, state.round = rnd.step + 1, None
        state.last = sorted(rnd.contributions)
        metrics = rnd.metric_sums()
        state.last_metrics = (metrics, rnd.rows)
        store.updates_applied += 1
        rnd.done.set_result(UpdateResult(state.step, dict(store.values), True, 0, metrics, rnd.rows))
        if rnd.progress is not None:  # a pipelined Update that joined a round applied whole
            for key, ready in rnd.progress.ready.items():
                if not ready.done():
                    ready.set_result(store.values[key])
        for contribution in rnd.contributions.values():
            contribution.sums, contribution.push = {}, {}  # the old gradients are freed now, not with the round

    def _run_kernel(self, grads: dict, rows: np.float32) -> bool:
        """The kernel's update of every slice (see UpdateKernel.apply); a failure that
        changed part of the values leaves the shard damaged."""
        store = self.store
        try:
            return store.kernel.apply(
                grads,
                store.values,
                store.opt_state,
                rows,
                store.kernel.batches(store.specs),
                lambda keys: unshared(store.values, keys),
            )
        except PartlyApplied as err:
            store.damage = str(err)
            raise
