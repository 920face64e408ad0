"""The checks a request passes before it may change a shard, and the refusals that
say why it may not: an Update's against its group's round, a Put's against the
slices held, a job's identity and an optimizer spec.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import grpc
import jax
import numpy as np

from psfw.base.errors import Reason, WireError
from psfw.protocol.layout import SliceKey
from psfw.protocol.messages import UpdateHeader
from psfw.protocol.wire import slice_name

if TYPE_CHECKING:
    from psfw.services.rounds import GroupState, Round

MAX_ROWS = 2**53  # the mean divides by the rows: beyond this, a float64 no longer counts them exactly
MAX_METRICS = 64


def refusal(code: grpc.StatusCode, message: str) -> WireError:
    """A refused request. The shard's own waits that ran out are answers, not lost
    connections: they carry Reason.SHARD_WAIT, and a client does not retry them."""
    return WireError(code, message, Reason.SHARD_WAIT if code == grpc.StatusCode.DEADLINE_EXCEEDED else Reason.NONE)


def nonfinite(group: int, step: int, what: str) -> WireError:
    return refusal(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"group {group} step {step}: the gradient of {what} has NaN or Inf values (policy: reject)",
    )


def check_update(shard: int, state: GroupState, head: UpdateHeader, held: Iterable[SliceKey], sums) -> Round | None:
    """Refuse an Update that cannot be added to its group's step (a WireError that
    says why); returns the round in progress, if any."""
    step, process, workers, rows, wpg = head.step, head.process, head.workers, head.rows, head.workers_per_group
    where = f"group {head.group} step {step}"
    if step > state.step:
        raise refusal(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"shard {shard}: {where} is ahead of the group, which has completed {state.step} steps",
        )
    if wpg < 1 or workers < 1 or workers > wpg:
        raise refusal(
            grpc.StatusCode.INVALID_ARGUMENT, f"{where}: workers={workers} of workers_per_group={wpg} is impossible"
        )
    if rows < workers:
        raise refusal(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: {rows} rows cannot come from {workers} workers")
    if rows > MAX_ROWS:
        raise refusal(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: {rows} rows is more than the limit of 2^53")
    check_group(head)
    if len(head.metrics) > MAX_METRICS or any(len(name) > 100 for name in head.metrics):
        raise refusal(
            grpc.StatusCode.INVALID_ARGUMENT, f"{where}: at most {MAX_METRICS} metrics of names up to 100 characters"
        )
    if head.staleness < -1:
        raise refusal(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: staleness {head.staleness} (use -1 for none)")
    missing = sorted(set(held) - set(sums))
    if missing:
        names = ", ".join(slice_name(k) for k in missing[:5])
        raise refusal(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{where}: the update lacks {len(missing)} slices of shard {shard} ({names}): "
            "send a gradient for every slice the shard holds",
        )
    rnd = state.round
    if rnd is not None:
        if rnd.workers_per_group != wpg:
            raise refusal(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{where}: workers_per_group={wpg} disagrees with {rnd.workers_per_group} from other processes",
            )
        if process not in rnd.contributions and rnd.workers + workers > wpg:
            raise refusal(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{where}: {rnd.workers} + {workers} workers exceed workers_per_group={wpg}",
            )
    return rnd


def check_group(head: UpdateHeader) -> None:
    """Refuse an Update of a group the job does not take (beyond ``worker_groups``
    unless ``max_groups`` lets it join) or whose group settings are impossible."""
    group, groups, most, where = head.group, head.worker_groups, head.max_groups, f"group {head.group} step {head.step}"
    if most < -1:
        raise refusal(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: max_groups {most} (use -1 for any number)")
    if not math.isfinite(head.group_timeout_s) or head.group_timeout_s < 0:
        raise refusal(
            grpc.StatusCode.INVALID_ARGUMENT, f"{where}: group_timeout_s {head.group_timeout_s} (use 0 for none)"
        )
    if not groups or group < groups or most == -1 or group < most:
        return
    if most <= groups:
        raise refusal(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{where}: the job has groups 0..{groups - 1} (cluster.worker_groups) and takes no other: to let "
            "groups join a running job, set cluster.max_groups",
        )
    raise refusal(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"{where}: the job takes groups 0..{most - 1} (cluster.max_groups): raise it to let more groups join",
    )


def incomplete(shard: int, group: int, rnd: Round, head: UpdateHeader) -> WireError:
    """The wait for the rest of the group ran out: who reported, who did not."""
    n = head.group_processes
    missing = sorted(set(range(group * n, group * n + n)) - set(rnd.contributions)) if n else "unknown"
    return refusal(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"shard {shard}: group {group} step {rnd.step} is incomplete after {head.wait_s:.1f} s: "
        f"{rnd.workers} of {rnd.workers_per_group} workers reported (processes {sorted(rnd.contributions)}); "
        f"missing processes: {missing}",
    )


def training(groups: Mapping[int, GroupState]) -> str:
    """Why new slices can no longer be put ('' while they can): every Update carries
    every slice the shard holds, so a slice added once a step is open or done
    could never be added up with the others."""
    for group, state in sorted(groups.items()):
        if state.round is not None:
            return f"group {group} has step {state.round.step} open"
        if state.step:
            return f"group {group} has completed {state.step} steps"
    return ""


def check_put(
    shard: int,
    values: Mapping[SliceKey, jax.Array],
    specs: Mapping[SliceKey, tuple[np.dtype, tuple[int, ...]]],
    arrays: Mapping[SliceKey, np.ndarray],
    groups: Mapping[int, GroupState],
) -> dict[SliceKey, np.ndarray]:
    """The slices of a Put that are new to the shard. A retried Put of identical
    values is acknowledged; a different value for a held slice is ALREADY_EXISTS, a
    value that is not finite INVALID_ARGUMENT, a new slice once a step is open or
    done FAILED_PRECONDITION."""
    new = {}
    for key, value in arrays.items():
        if key in values:
            same = specs[key] == (value.dtype, value.shape) and np.array_equal(np.asarray(values[key]), value)
            if not same:
                raise refusal(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"shard {shard} already holds {slice_name(key)} with other values: "
                    "a parameter is put once, by its owner",
                )
            continue
        if not np.isfinite(value).all():
            raise refusal(grpc.StatusCode.INVALID_ARGUMENT, f"initial value of {slice_name(key)} is not finite")
        new[key] = value
    busy = training(groups) if new else ""
    if busy:
        raise refusal(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"shard {shard} is already training ({busy}): slices can only be put before the "
            f"first update, and {slice_name(next(iter(new)))} is new; every owner puts its parameters "
            "before any worker updates (restart the job to add parameters)",
        )
    return new


def fingerprint_of(job: str) -> str:
    """The fingerprint of a job identity ('' for none); INVALID_ARGUMENT for one
    that is not an identity."""
    if not job:
        return ""
    try:
        fingerprint = json.loads(job)["fingerprint"]
    except (ValueError, TypeError, KeyError, RecursionError):
        raise refusal(grpc.StatusCode.INVALID_ARGUMENT, "the Put's job is not a psfw job identity (JSON)") from None
    if not isinstance(fingerprint, str) or not fingerprint:
        raise refusal(grpc.StatusCode.INVALID_ARGUMENT, "the Put's job identity has no fingerprint")
    return fingerprint


def parse_spec(optimizer: str) -> Any:
    """An optimizer spec's JSON; INVALID_ARGUMENT for one that is not JSON."""
    try:
        return json.loads(optimizer)
    except (ValueError, RecursionError) as err:
        raise refusal(grpc.StatusCode.INVALID_ARGUMENT, f"the Put's optimizer spec is not JSON: {err}") from None


def same_form(new: Any, old: Any) -> bool:
    """Whether two optimizer states have the same tree, shapes and dtypes."""

    def forms(tree: Any) -> list[tuple[tuple[int, ...], np.dtype]]:
        return [(tuple(x.shape), np.dtype(x.dtype)) for x in jax.tree.leaves(tree)]

    return jax.tree.structure(new) == jax.tree.structure(old) and forms(new) == forms(old)


def bounded_wait(wait_s: float) -> float:
    """The wait a request asked for, bounded; 0 means the default of 60 s."""
    return min(wait_s, 3600.0) if wait_s > 0 else 60.0
