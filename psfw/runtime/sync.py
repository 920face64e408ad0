"""Where the shards are, as a stub finds them: agreeing on an epoch and a step,
holding this job, restored to a common checkpoint when they disagree."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import grpc

from psfw.base.errors import PsfwError, ShardError, WaitTimeout
from psfw.base.identity import differences, summary
from psfw.runtime.process_setup import ProcessSetup

log = logging.getLogger(__name__)
# a worker process that sent an Update this recently may still run (started twice): watch it
# this long, every WATCH_EVERY_S; a running one reports again (a restarted one never does)
RECENT_S, WATCH_S, WATCH_EVERY_S = 30.0, 5.0, 0.25


class ShardSync:
    """A stub's view of its shards' state, for the worker process ``setup`` describes."""

    def __init__(self, setup: ProcessSetup):
        self.clients, self.layout, self.cache = setup.clients, setup.layout, setup.cache
        self.group, self.process, self.wait_s = setup.group, setup.process, setup.wait_s
        self.identity: dict[str, Any] | None = setup.identity
        self.resume, self.warmup_steps = setup.resume, setup.warmup_steps
        self.joins, self.leads = setup.joins, setup.leads

    async def can_retry(self, step: int, epoch: int) -> bool:
        """Whether the shards are still where this process left them (same epoch, the
        group at ``step`` or just past it), so the step can simply be sent again."""
        replies = await self.describe_all()
        steps = {group_step(r, self.group) for r in replies}
        return {r.epoch for r in replies} == {epoch} and steps <= {step, step + 1}

    async def describe_all(self) -> list:
        """Every shard's description; waits (bounded) for shards that are down."""
        deadline = time.monotonic() + self.wait_s
        delay = 0.05
        while True:
            try:
                return list(await asyncio.gather(*(c.describe() for c in self.clients)))
            except ShardError as err:
                if err.code != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def refuse_second_start(self) -> None:
        """Refuse to join as this process while another start of it still runs (it
        sends Updates): before anything is sent that could disturb it. A process that
        reported lately is watched for ``WATCH_S``; one that was stopped stays quiet."""
        last = reports_of(await self.describe_all(), self.group, self.process)
        if last is None or last[1] > RECENT_S:
            return
        deadline = time.monotonic() + WATCH_S
        while time.monotonic() < deadline:
            await asyncio.sleep(WATCH_EVERY_S)
            now = reports_of(await self.describe_all(), self.group, self.process)
            if now is not None and now[0] > last[0]:
                raise PsfwError(
                    f"process {self.process} of group {self.group} is already running against these shards "
                    f"(last report {now[1]:.0f} s ago): stop it first, or start this one as another --process"
                )

    async def settle(self) -> list:
        """Describe the shards until they agree on an epoch and, for this group, on a
        step; restore them to their newest common checkpoint when they cannot agree
        (a shard restarted from a checkpoint, or this process died mid-step)."""
        deadline = time.monotonic() + self.wait_s
        while True:
            replies = await self.describe_all()
            epochs = {r.epoch for r in replies}
            # a joining group's first Update may have reached some shards only: the others take it when it comes
            knows = [r for r in replies if not self.joins or has_group(r, self.group)] or replies
            steps = {group_step(r, self.group) for r in knows}
            sizes = [len(self.layout.shard_slices(i)) for i in range(len(replies))]
            # a shard with no slices in the layout (more shards than slices) holds nothing to lose
            held = [len(r.slices) == n for r, n in zip(replies, sizes, strict=True)]
            lost = [i for i, (r, n) in enumerate(zip(replies, sizes, strict=True)) if n and not r.slices]
            # before any step, an empty shard is one whose owners' Puts are still on their way
            trained = any(g.step for r in replies for g in r.groups)
            if lost and trained and any(h and n for h, n in zip(held, sizes, strict=True)) and len(epochs) == 1:
                raise PsfwError(
                    f"shards {lost} lost their state (restarted without a checkpoint) while others hold theirs: "
                    "give the shards a shared --checkpoint-dir and set train.checkpoint_every"
                )
            if len(epochs) == 1 and (len(steps) == 1 or not all(held) or self.one_apart(steps)):
                return replies
            common = set.intersection(*(set(r.checkpoint_steps) for r in replies))
            if not common:
                raise PsfwError(
                    f"the shards disagree (epochs {sorted(epochs)}, steps {sorted(steps)} of group {self.group}) "
                    "and share no complete checkpoint to restore"
                )
            target, epoch = max(common), max(epochs) + (1 if len(epochs) == 1 else 0)
            for i, r in enumerate(replies):
                if r.epoch != epoch or group_step(r, 0) != target:
                    await self.clients[i].restore(target, epoch)
            log.warning("process %d: shards restored to step %d (epoch %d)", self.process, target, epoch)
            if time.monotonic() > deadline:
                raise PsfwError(f"the shards did not settle within {self.wait_s:.0f} s")

    async def start(self, replies: list) -> tuple[int, bool]:
        """Where this process's group starts on the settled shards (``replies``), and
        whether it joins the running job now. A group the job started with starts
        where the shards hold it (0: fresh). A group that joins starts where the
        slowest group active stands, or where it stands already: its first process
        sends the first Update, and the others wait until the shards know the group
        (``wait_s`` bounds the wait), so that the whole group starts at one step."""
        if not self.joins:
            return min(group_step(r, self.group) for r in replies), False
        known = [group_step(r, self.group) for r in replies if has_group(r, self.group)]
        if known:
            return min(known), True
        where = job_step(replies)
        if self.leads or not where:
            return where, True
        deadline = time.monotonic() + self.wait_s
        while True:
            self.cache.doing(f"waiting for the first process of group {self.group} to join at step {where}")
            await asyncio.sleep(min(0.2, self.wait_s / 10))
            replies = await self.describe_all()
            if all(has_group(r, self.group) for r in replies):
                return min(group_step(r, self.group) for r in replies), True
            if time.monotonic() > deadline:
                raise WaitTimeout(
                    f"group {self.group} process {self.process}: the group's first process did not join the job "
                    f"within {self.wait_s:.0f} s: start it too"
                )

    def one_apart(self, steps: set[int]) -> bool:
        """Whether shards one step apart for this group can simply go on.

        Group 0's checkpoints fall on its own step boundaries, so its shards always
        agree after a restore; another group runs on its own clock, and a checkpoint
        may catch its last update on some shards only. Sending that step again is
        safe: the shards that applied it acknowledge it without adding it twice."""
        return self.group != 0 and max(steps) - min(steps) <= 1

    def check_job(self, replies: list, start: int, steps: int) -> None:
        """Refuse shards that hold another job's parameters, and joining this job
        where this group has advanced already (a finished or running job) unless
        resuming was asked for: both in one line that says what to do."""
        if self.identity is None:
            return
        name = ours = self.identity["name"]
        for shard, reply in enumerate(replies):
            if not reply.job:
                continue  # fresh, or put by a tool that names no job
            held = json.loads(reply.job)
            name = held.get("name", ours)  # the same settings may come from another file
            if held.get("fingerprint") != self.identity["fingerprint"]:
                what = "; ".join(differences(held, self.identity))
                raise PsfwError(
                    f"shard {shard} holds job {summary(held, group_step(reply, 0))}; this job differs: {what}: "
                    "start the shards fresh, or run the config they hold"
                )
        if start and not self.resume and not self.joins:  # a group that joins comes where the job stands
            state = f"finished, {steps} steps" if start >= steps else f"of {steps} steps"
            raise PsfwError(
                f"the shards hold this job ({name if name == ours else f'{name}, the settings of {ours}'}) with "
                f"group {self.group} at step {start} "
                f"({state}): pass --resume to continue it, or start the shards fresh"
            )
        if start > steps:  # nothing to train, and no step the record could truthfully name
            raise PsfwError(
                f"--resume: the shards hold this job ({self.identity['name']}) with group {self.group} at step "
                f"{start} already, and the config asks for {steps} steps: raise train.epochs/train.steps to train on"
            )
        if start == steps:
            log.warning(
                "process %d: the shards hold this job with group %d at step %d of %d: nothing left to train",
                self.process,
                self.group,
                start,
                steps,
            )

    async def await_warmup(self) -> None:
        """Wait for group 0's ``warmup_steps``, however long they take, as long as
        group 0 advances (``wait_s`` bounds the time without progress)."""
        last, since = -1, time.monotonic()
        while True:
            done = min(group_step(r, 0) for r in await self.describe_all())
            if done >= self.warmup_steps:
                return
            if done != last:  # advancing (or rolled back to a checkpoint and going again)
                last, since = done, time.monotonic()
                self.cache.doing(f"waiting for group 0's {self.warmup_steps} warmup steps (at {done})")
            elif time.monotonic() - since > self.wait_s:
                raise WaitTimeout(
                    f"group {self.group} process {self.process}: group 0 has completed {done} of its "
                    f"{self.warmup_steps} warmup steps and did not advance for {self.wait_s:.0f} s"
                )
            await asyncio.sleep(min(0.5, self.wait_s / 4))


def group_step(reply, group: int) -> int:
    """A group's completed steps in a shard's Describe answer."""
    return next((g.step for g in reply.groups if g.group == group), 0)


def has_group(reply, group: int) -> bool:
    """Whether a shard's Describe answer knows ``group`` (it has sent an Update there)."""
    return any(g.group == group for g in reply.groups)


def job_step(replies: list) -> int:
    """Where a running job stands: the completed steps of the slowest group that is
    not gone (0: no group has trained)."""
    steps: dict[int, int] = {}
    gone: set[int] = set()
    for reply in replies:
        for g in reply.groups:
            steps[g.group] = min(steps.get(g.group, g.step), g.step)
            if g.gone:
                gone.add(g.group)
    active = [step for group, step in steps.items() if group not in gone]
    return min(active) if active else max(steps.values(), default=0)


def reports_of(replies: list, group: int, process: int) -> tuple[int, float] | None:
    """A process's Updates summed over the shards and the age of its latest (None:
    it sent none since the shards started)."""
    seen = [r for reply in replies for g in reply.groups if g.group == group for r in g.reports if r.process == process]
    if not seen:
        return None
    return sum(r.updates for r in seen), min(r.age_s for r in seen)
